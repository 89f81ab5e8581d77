"""Shape properties of the training side (issue 28): every batch size that cuts a fold's rows.

A batch of one image is where BatchNorm breaks: torch refuses a training-mode layer that sees one
value per channel (``Expected more than 1 value per channel when training``: a 1x1 feature map of
one image), Keras normalises the image to its own mean. A run of 1,601 images at 32 px died in
fold 2 because precise BatchNorm walked its 1,281 training rows in chunks of 256 and the last
chunk held one image; the same walk weighted a short last chunk like a full one.

The cases are drawn so that a fold's training rows are 1 or batch+1 modulo each batch size in play
(the training batch, the prediction batch and its TTA views, the precise-BatchNorm chunk, shrunk
through ``recipe.batches.BN_CHUNK`` so cases stay tiny, and the LR range test's batches). Every
case runs the real code: the real function on real tensors (demo scans decoded by the image
cache), ``train_fold`` and ``run_folds`` on real image files for the end-to-end part, and the
Keras functions on a tiny real Keras model in one TensorFlow subprocess (TensorFlow never enters
the pytest process). A case either completes with a sane OOF (every row, finite, rows summing to
1, not worse than the uniform guess) or is refused with a ConfigError/DataError naming its
cause, leaving nothing half-written. Settings are derandomized so CI sees the same cases.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from oof.errors import ConfigError, DataError
from recipe import batches
from recipe.batches import PooledMoments, bn_chunks, check_train_batches, train_batches

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16  # px: resnet10t's last feature map is 1x1 here, as at 32 px
QUICK = {"deadline": None, "derandomize": True,
         "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


@st.composite
def rows_cut_by(draw: st.DrawFn, max_size: int = 9, most: int = 40,
                least: int = 1) -> tuple[int, int]:
    """(rows, size) with rows 1, or size+1, or otherwise 1 modulo size most of the time."""
    size = draw(st.integers(2, max_size))
    rest = draw(st.sampled_from([1, 1, 1, 0, 2, size - 1]))
    rows = size * draw(st.integers(0, max(0, (most - rest) // size))) + rest
    return max(least, rows), size


# ------------------------------------------------------------------ the rules, framework-free


@settings(max_examples=200, **QUICK)
@given(n=st.integers(0, 3000), size=st.integers(1, 300))
def test_bn_chunks_cover_every_row_once_and_never_hold_one_image(n: int, size: int) -> None:
    chunks = bn_chunks(n, size)
    if n < 2:
        assert chunks == []
        return
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(a == b for (_, a), (b, _) in zip(chunks, chunks[1:]))  # contiguous, no overlap
    lengths = [b - a for a, b in chunks]
    step = max(2, size)
    assert min(lengths) >= 2 and max(lengths) <= step + 1
    if n % step != 1:  # the plain chunks whenever no lone image is left over
        assert chunks == [(a, min(a + step, n)) for a in range(0, n, step)]


@settings(max_examples=60, **QUICK)
@given(data=st.data(), n=st.integers(2, 60), channels=st.integers(1, 4),
       positions=st.sampled_from([1, 4, 9]))
def test_pooled_moments_equal_one_pass_over_all_values(data: st.DataObject, n: int,
                                                       channels: int, positions: int) -> None:
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=6)))
    rng = np.random.default_rng(n * 31 + channels)
    x = rng.normal(3.0, 2.0, size=(n, positions, channels)) * rng.uniform(0.1, 5, channels)
    pooled = PooledMoments()
    for a, b in zip([0, *cuts], [*cuts, n]):
        part = x[a:b].reshape(-1, channels)
        pooled.add(len(part), part.mean(axis=0), part.var(axis=0))
    flat = x.reshape(-1, channels)
    np.testing.assert_allclose(pooled.mean, flat.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pooled.var, flat.var(axis=0), rtol=1e-10)
    if len(flat) > 1:
        np.testing.assert_allclose(pooled.unbiased_var, flat.var(axis=0, ddof=1), rtol=1e-10)


@settings(max_examples=100, **QUICK)
@given(n=st.integers(0, 600), batch_size=st.integers(1, 300), bn=st.sampled_from([0, 14]))
def test_training_batches_never_one_image_where_batchnorm_trains(n: int, batch_size: int,
                                                                  bn: int) -> None:
    batch, steps = train_batches(n, batch_size)
    assert batch * steps <= n and (n == 0 or n - batch * steps < batch_size)
    assert batch == min(n, batch_size)
    try:
        check_train_batches(n, batch_size, bn, "timm/resnet10t", 3)
    except DataError as exc:
        assert bn and n < 2 and "fold 3" in str(exc) and "BatchNorm" in str(exc)
    except ConfigError as exc:
        assert bn and batch_size == 1 and n >= 2 and "--batch-size 1" in str(exc)
    else:
        assert batch >= 2 or not bn


# ------------------------------------------------------------------ timm, on real tensors


class Held:
    """A fixture's values behind a short repr: hypothesis prints every argument of a failing
    case, and a model or an image array would bury the case itself."""

    def __init__(self, label: str, **values: object) -> None:
        self.label = label
        self.__dict__.update(values)

    def __repr__(self) -> str:
        return self.label


@pytest.fixture(scope="module")
def scans(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Held:
    """Demo scans decoded at SIZE px by the image cache (``x``), and their labels (``y``)."""
    import pandas as pd

    from oof.images import cached_images

    train = pd.read_csv(demo_dir / "train.csv", dtype=str).head(300)
    paths = [str(demo_dir / "train" / c / i) for i, c in zip(train["Id"], train["Category"])]
    x = cached_images(paths, SIZE, tmp_path_factory.mktemp("scan_cache"), progress=False)
    classes = sorted(set(train["Category"]))
    return Held(f"{len(x)} demo scans at {SIZE} px", x=np.asarray(x),
                y=np.array([classes.index(c) for c in train["Category"]]))


@pytest.fixture(scope="module")
def held_trainer() -> Held:
    """A resnet10t Trainer at SIZE px on the CPU, one thread (its 14 BatchNorm layers train)."""
    import torch

    from backbones.timm import model as tb
    from backbones.timm.train import Trainer
    from oof.config import RunConfig

    torch.set_num_threads(1)
    cfg = RunConfig(backbone="timm/resnet10t", img_size=SIZE, epochs=1, progress=False,
                    threads=1)
    spec = tb.resolve_spec("resnet10t", cfg)
    torch.manual_seed(0)
    return Held("resnet10t trainer",
                trainer=Trainer(tb.create_model(spec, 10), spec, cfg, torch.device("cpu"), 1))


def _bn_layers(model):  # noqa: ANN001, ANN202 - torch stays out of the module's imports
    from torch import nn

    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _one_pass_first_bn(trainer, images: np.ndarray):  # noqa: ANN001, ANN202
    """The first BatchNorm layer's statistics from ONE training-mode pass over every image
    (its input depends on no other BatchNorm layer, so they are the exact target)."""
    import copy

    import torch

    model = copy.deepcopy(trainer.model).eval()
    first = _bn_layers(model)[0]
    first.reset_running_stats()
    first.momentum = 1.0
    first.train()
    with torch.no_grad():
        model(trainer.to_input(torch.from_numpy(np.array(images))))
    return first.running_mean.numpy(), first.running_var.numpy()


def test_timm_precise_bn_with_one_leftover_image_at_the_last_layer(
        held_trainer: Held, scans: Held) -> None:
    """The crash of issue 28 exactly: 257 training rows at 32 px, default chunks of 256, the
    last BatchNorm layer (1x1 feature map) met one image: ValueError before the fix."""
    import cv2

    assert batches.BN_CHUNK == 256
    x = np.stack([cv2.resize(im, (32, 32)) for im in np.resize(scans.x, (257, SIZE, SIZE, 3))])
    assert held_trainer.trainer.recalibrate_batchnorm(x) == 14
    layers = _bn_layers(held_trainer.trainer.model)
    assert all(np.isfinite(m.running_var.numpy()).all() for m in layers)
    mean, var = _one_pass_first_bn(held_trainer.trainer, x)
    np.testing.assert_allclose(layers[0].running_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layers[0].running_var.numpy(), var, rtol=1e-4, atol=1e-5)


@settings(max_examples=10, **QUICK)
@example(case=(13, 4))  # 3 full chunks and a lone image
@example(case=(11, 4))  # a short last chunk of 3
@example(case=(1, 4))
@given(case=rows_cut_by(max_size=9, most=40))
def test_timm_precise_bn_weighs_every_image_the_same(
        held_trainer: Held, scans: Held, case: tuple[int, int]) -> None:
    """Running mean and variance equal one pass over every image, whatever the chunks."""
    n, chunk = case
    x = scans.x[:n]
    layers = _bn_layers(held_trainer.trainer.model)
    before = [m.running_var.clone() for m in layers]
    done = held_trainer.trainer.recalibrate_batchnorm(x, chunk)
    if n < 2:  # no estimate from one image: the trained statistics stay
        assert done == 0
        assert all(np.array_equal(b.numpy(), m.running_var.numpy())
                   for b, m in zip(before, layers))
        return
    assert done == 14 and all(m.momentum == 0.1 and not m.training for m in layers)
    assert all(np.isfinite(m.running_var.numpy()).all() and (m.running_var.numpy() >= 0).all()
               for m in layers)
    mean, var = _one_pass_first_bn(held_trainer.trainer, x)
    np.testing.assert_allclose(layers[0].running_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layers[0].running_var.numpy(), var, rtol=1e-4, atol=1e-5)


@settings(max_examples=8, **QUICK)
@example(case=(9, 8))
@given(case=rows_cut_by(max_size=8, most=30))
def test_timm_predictions_do_not_depend_on_the_batch(
        held_trainer: Held, scans: Held, case: tuple[int, int]) -> None:
    """Any prediction batch, a lone last image included, and every TTA view (random views are
    keyed by the image's row): the probabilities of one batch holding every image."""
    from recipe.tta import tta_views

    n, batch = case
    views = tta_views("hflip", [1.15], 1, "light", SIZE, seed=5)
    x = scans.x[:n]
    got = held_trainer.trainer.predict(x, views, batch_size=batch)
    whole = held_trainer.trainer.predict(x, views, batch_size=n)
    assert got.shape == (n, 10) and np.isfinite(got).all()
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(got, whole, atol=1e-5)


def test_timm_ema_keeps_frozen_batchnorm_statistics(
        scans: Held) -> None:
    """With --ema the EMA copy predicts; its BatchNorm layers frozen by --freeze-bn keep their
    statistics like the trained model's (the copy's own flags still said trainable)."""
    import torch

    from backbones.timm import model as tb
    from backbones.timm.train import Trainer
    from oof.config import RunConfig
    from recipe import plan_phases

    cfg = RunConfig(backbone="timm/resnet10t", img_size=SIZE, epochs=1, progress=False,
                    threads=1, ema=True, freeze_bn=True)
    spec = tb.resolve_spec("resnet10t", cfg)
    trainer = Trainer(tb.create_model(spec, 10), spec, cfg, torch.device("cpu"), 1)
    trainer.start_phase(plan_phases(cfg)[-1])
    before = [m.running_mean.clone() for m in _bn_layers(trainer.predict_model)]
    assert trainer.recalibrate_batchnorm(scans.x[:20], 8) == 0
    after = [m.running_mean for m in _bn_layers(trainer.predict_model)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize(("name", "options", "refused"), [
    ("resnet10t", {}, True),
    ("resnet10t", {"freeze_bn": True}, False),  # no BatchNorm layer trains
    ("resnet10t", {"freeze_bn": True, "head_hidden": 8}, True),  # but the head's does
    ("test_vit", {}, False),  # LayerNorm only: a batch of one image is fine
])
def test_batch_size_one_refused_where_batchnorm_trains(name: str, options: dict,
                                                       refused: bool) -> None:
    from backbones import get_backend
    tb = get_backend("timm")
    from oof.config import RunConfig

    cfg = RunConfig(backbone=f"timm/{name}", img_size=32, batch_size=1, **options)
    if refused:
        with pytest.raises(ConfigError, match=f"--batch-size 1: timm/{name} has "):
            tb.resolve_spec(name, cfg)
    else:
        assert tb.resolve_spec(name, cfg).name == f"timm/{name}"


# ------------------------------------------------------------------ timm, one fold end to end

MIXING = {"none": {}, "mixup": {"mixup_alpha": 0.4}, "cutmix": {"cutmix_alpha": 1.0}}


@st.composite
def fold_cases(draw: st.DrawFn) -> dict:
    """Training rows cut by the training batch and the BN chunk, plus the options that touch
    batches: mixing, EMA, TTA, progressive resizing; --batch-size 1 now and then."""
    n, batch = draw(rows_cut_by(max_size=8, most=26))
    chunk = draw(st.sampled_from([c for c in range(2, 10) if n % c in (1, 0)] or [2]))
    if draw(st.integers(0, 5)) == 0:
        batch = 1
    return {"n": n, "batch_size": batch, "chunk": chunk, "mixing": draw(st.sampled_from(
        sorted(MIXING))), "ema": draw(st.booleans()), "tta": draw(st.sampled_from(
            ["none", "hflip"])), "progressive": draw(st.booleans())}


def _nothing_written(job) -> bool:  # noqa: ANN001
    work = list(job.work_dir.rglob("*")) if job.work_dir.exists() else []
    return not job.checkpoint_path.exists() and not job.history_path.exists() and not work


@pytest.mark.slow
@settings(max_examples=10, **QUICK)
@example(case={"n": 9, "batch_size": 8, "chunk": 4, "mixing": "cutmix", "ema": True,
               "tta": "hflip", "progressive": False})
@example(case={"n": 12, "batch_size": 1, "chunk": 11, "mixing": "none", "ema": False,
               "tta": "none", "progressive": False})
@given(case=fold_cases())
def test_timm_fold_trains_or_refuses_at_every_batch_edge(
        scans: Held, tmp_path_factory: pytest.TempPathFactory,
        case: dict) -> None:
    import cv2

    from backbones import get_backend
    tb = get_backend("timm")
    from backbones.base import FoldJob
    from oof.config import RunConfig

    n, bs, chunk = case["n"], case["batch_size"], case["chunk"]
    sizes = [8, SIZE] if case["progressive"] else SIZE
    cfg = RunConfig(backbone="timm/resnet10t", img_size=sizes, epochs=2 if case["progressive"]
                    else 1, batch_size=bs, progress=False, threads=1, ema=case["ema"],
                    tta=case["tta"], **MIXING[case["mixing"]])
    x, y = scans.x, scans.y
    out = tmp_path_factory.mktemp("fold")
    if bs == 1:  # refused with the spec, before any image is decoded or file written
        with pytest.raises(ConfigError, match="--batch-size 1: timm/resnet10t has 14 Batch"):
            tb.resolve_spec("resnet10t", cfg)
        return
    job = FoldJob(spec=tb.resolve_spec("resnet10t", cfg), cfg=cfg, fold=1,
                  classes=[str(c) for c in range(10)], x_train=x[:n], y_train=y[:n],
                  x_val=x[200:211], y_val=y[200:211], x_test=x[250:253],
                  checkpoint_path=out / "fold1.safetensors", work_dir=out / "work",
                  history_path=out / "fold1_history.csv", seed=7,
                  train_images_at=lambda s: np.stack([cv2.resize(im, (s, s)) for im in x[:n]]))
    with mock.patch.object(batches, "BN_CHUNK", chunk):
        if n < 2:
            with pytest.raises(DataError, match="fold 1 has 1 training image: timm/resnet10t "
                               "has 14 BatchNorm layers in training mode"):
                tb.train_fold(job)
            assert _nothing_written(job)
            return
        result = tb.train_fold(job)
    for proba, rows in ((result.val_proba, 11), (result.test_proba, 3)):
        assert proba.shape == (rows, 10) and np.isfinite(proba).all()
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    assert result.info["bn_recalibrated_layers"] == 14
    assert job.checkpoint_path.is_file() and len(result.history) == cfg.epochs
    assert math.isfinite(result.history[-1]["loss"])


@pytest.mark.slow
@settings(max_examples=4, **QUICK)
@example(case=(9, 8))
@example(case=(1, 4))
@given(case=rows_cut_by(max_size=6, most=14))
def test_timm_lr_range_test_at_every_batch_edge(
        scans: Held, tmp_path_factory: pytest.TempPathFactory,
        case: tuple[int, int]) -> None:
    from backbones import get_backend
    tb = get_backend("timm")
    from backbones.base import FoldJob
    from oof.config import RunConfig

    n, bs = case
    cfg = RunConfig(backbone="timm/resnet10t", img_size=SIZE, batch_size=bs, progress=False,
                    threads=1)
    x, y = scans.x, scans.y
    out = tmp_path_factory.mktemp("lr")
    job = FoldJob(spec=tb.resolve_spec("resnet10t", cfg), cfg=cfg, fold=0,
                  classes=[str(c) for c in range(10)], x_train=x[:n], y_train=y[:n],
                  x_val=x[:0], y_val=y[:0], x_test=x[:0], checkpoint_path=Path(os.devnull),
                  work_dir=out / "work", history_path=Path(os.devnull), seed=3)
    lrs = np.geomspace(1e-5, 1e-2, 10)
    if n < 2:
        with pytest.raises(DataError, match="fold 0 has 1 training image: "):
            tb.lr_range_test(job, lrs)
        return
    losses = tb.lr_range_test(job, lrs)
    assert len(losses) == 10 and all(math.isfinite(v) and v > 0 for v in losses)


# ------------------------------------------------------------------ run_folds end to end


@st.composite
def run_cases(draw: st.DrawFn) -> dict:
    """Images per class and K; the batch and BN chunk are chosen from the folds' training rows
    (``pick``) so that one fold's rows are 1 or batch+1 modulo them."""
    per_class = draw(st.sampled_from([2, 3]))
    return {"per_class": per_class, "k": draw(st.integers(2, per_class)),
            "fold": draw(st.integers(0, 2)), "pick": draw(st.integers(0, 3)),
            "tta": draw(st.sampled_from(["none", "hflip"]))}


def _divisors_of_leftover(rows: int) -> list[int]:
    """Sizes s >= 2 with rows % s == 1 (rows is 1 more than a multiple of s)."""
    return [s for s in range(2, rows) if rows % s == 1]


@pytest.mark.slow
@settings(max_examples=4, **QUICK)
@example(case={"per_class": 2, "k": 2, "fold": 0, "pick": 0, "tta": "hflip"})
@example(case={"per_class": 2, "k": 2, "fold": 1, "pick": 2, "tta": "none"})  # batch 1
@given(case=run_cases())
def test_run_folds_completes_or_refuses_at_every_batch_edge(
        demo_dir: Path, tmp_path_factory: pytest.TempPathFactory, case: dict) -> None:
    from oof.config import RunConfig
    from oof.datasets import load_dataset
    from oof.folds import ensure_folds
    from oof.rundir import load_run
    from runner.run import run_folds, run_root_for
    from tests.conftest import write_demo_subset

    work = tmp_path_factory.mktemp("e2e")
    data = write_demo_subset(demo_dir, work / "data", case["per_class"], 7)
    base = {"data": str(data), "out": str(work / "runs"), "folds": case["k"], "epochs": 1,
            "img_size": SIZE, "progress": False, "threads": 1, "tta": case["tta"]}
    dataset = load_dataset(str(data))
    folds = ensure_folds(run_root_for(RunConfig(**base), dataset), list(dataset.train["id"]),
                         list(dataset.train["label"]), case["k"], None)
    rows = len(folds.ids) - int((folds.fold == case["fold"] % case["k"]).sum())
    leftover = _divisors_of_leftover(rows)
    choices = [(rows - 1, 2), (leftover[0] if leftover else 2, rows - 1), (1, rows - 1),
               (leftover[-1] if leftover else 3, leftover[0] if leftover else 2)]
    batch, chunk = choices[case["pick"]]
    cfg = RunConfig(**base, batch_size=batch)
    with mock.patch.object(batches, "BN_CHUNK", chunk):
        if batch == 1:  # refused before the run folder or the image cache is written
            with pytest.raises(ConfigError, match="--batch-size 1: timm/resnet10t has 14 Batch"):
                run_folds(cfg)
            assert sorted(p.name for p in (work / "runs" / "data").iterdir()) == [
                "folds.csv", "folds.json"]  # this test's own, from ensure_folds above
            return
        summary = run_folds(cfg)
    assert summary.complete
    run = load_run(summary.run_dir)
    oof = run.oof
    assert len(oof) == len(folds.ids) and np.isfinite(oof).all()
    np.testing.assert_allclose(oof.sum(axis=1), 1.0, atol=1e-6)
    assert summary.oof_scores["log_loss"] < math.log(10) + 0.2  # no worse than a uniform guess
    assert not list(summary.run_dir.rglob("*.tmp"))


# ------------------------------------------------------------------ Keras, in one subprocess

KERAS_PROPERTIES = r"""
import json, sys
import numpy as np
from hypothesis import HealthCheck, example, given, settings, strategies as st

import keras
from backbones.keras import data as kd, model as km, serving as ks
from oof.config import RunConfig
from oof.errors import ConfigError, DataError
from recipe import plan_phases
from recipe.batches import check_train_batches, train_batches

SIZE = 8
QUICK = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
pool = rng.integers(0, 256, (64, SIZE, SIZE, 3), dtype=np.uint8)

def tiny_model(head_bn=True):
    # a nested 'application' (conv, BatchNorm, conv, BatchNorm at 1x1, dropout) and a head
    # with its own BatchNorm, wrapped like build_model's: uint8 in, probabilities out
    app_in = keras.Input((SIZE, SIZE, 3))
    z = keras.layers.Conv2D(4, 3, strides=2)(app_in)
    z = keras.layers.BatchNormalization(momentum=0.9)(z)
    z = keras.layers.Conv2D(6, 3)(keras.layers.ReLU()(z))
    z = keras.layers.BatchNormalization(momentum=0.9)(z)
    app = keras.Model(app_in, z, name="app")
    inp = keras.Input((SIZE, SIZE, 3), dtype="uint8")
    x = keras.layers.Lambda(lambda t: keras.ops.cast(t, "float32") / 255.0)(inp)
    x = keras.layers.GlobalAveragePooling2D()(app(x))
    x = keras.layers.Dropout(0.3)(x)
    if head_bn:
        x = keras.layers.BatchNormalization(momentum=0.9)(keras.layers.Dense(5)(x))
    out = keras.layers.Dense(3, activation="softmax")(x)
    return keras.Model(inp, out)

MODEL = tiny_model()
BNS = [l for l in km._iter_layers(MODEL) if isinstance(l, keras.layers.BatchNormalization)]

def rows_cut_by(max_size, most):
    @st.composite
    def draw(d):
        size = d(st.integers(2, max_size))
        rest = d(st.sampled_from([1, 1, 1, 0, 2, size - 1]))
        return max(1, size * d(st.integers(0, max(0, (most - rest) // size))) + rest), size
    return draw()

@settings(max_examples=int(sys.argv[1]), **QUICK)
@example(case=(13, 4))
@example(case=(11, 4))
@example(case=(1, 4))
@given(case=rows_cut_by(9, 40))
def recalibration_is_exact(case):
    n, chunk = case
    x = pool[:n]
    before = [l.moving_variance.numpy().copy() for l in BNS]
    done = km.recalibrate_batchnorm(MODEL, x, chunk)
    if n < 2:
        assert done == 0 and all(np.array_equal(b, l.moving_variance.numpy())
                                 for b, l in zip(before, BNS))
        return
    assert done == 3 and all(l.momentum == 0.9 for l in BNS)
    assert all(np.isfinite(l.moving_variance.numpy()).all() for l in BNS)
    got = BNS[0].moving_mean.numpy().copy(), BNS[0].moving_variance.numpy().copy()
    keep = [(l.moving_mean.numpy().copy(), l.moving_variance.numpy().copy()) for l in BNS]
    for l in BNS:
        l.momentum = 0.0
    try:
        MODEL(x, training=True)  # one pass over every image: the first layer's exact target
        want = BNS[0].moving_mean.numpy(), BNS[0].moving_variance.numpy()
    finally:
        for l, (m, v) in zip(BNS, keep):
            l.momentum = 0.9
            l.moving_mean.assign(m)
            l.moving_variance.assign(v)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-6)

@settings(max_examples=int(sys.argv[1]), **QUICK)
@example(case=(9, 8))
@given(case=rows_cut_by(6, 16))
def predictions_do_not_depend_on_the_batch(case):
    # the template's loop (batches x views) over the Keras family's padded batch
    from backbones.fold import predict_views
    from recipe.tta import tta_views
    n, batch = case
    views = tta_views("hflip", [], 1, "light", SIZE, seed=5)  # each view: a predict call
    batch_of = lambda x, size: ks.predict_padded(MODEL, x, size)
    got = predict_views(pool[:n], views, batch_of, 3, batch, np.float64)
    whole = predict_views(pool[:n], views, batch_of, 3, n, np.float64)
    assert got.shape == (n, 3) and np.isfinite(got).all()
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(got, whole, atol=1e-5)

@settings(max_examples=int(sys.argv[1]), **QUICK)
@example(case=(9, 8), mixing=True)
@example(case=(1, 4), mixing=False)
@given(case=rows_cut_by(8, 30), mixing=st.booleans())
def training_batches_follow_the_rule(case, mixing):
    n, bs = case
    cfg = RunConfig(backbone="keras/MobileNetV3Small", img_size=SIZE, batch_size=bs,
                    augment="light", mixup_alpha=0.4 if mixing else 0.0)
    labels = np.arange(n) % 3
    ds, steps, _ = kd.make_train_dataset(pool[:n], labels, 3, cfg, 0)
    sizes = [len(y) for _, y in ds]
    batch, want = train_batches(n, bs)
    assert sizes == [batch] * want == [batch] * steps
    phases = plan_phases(cfg)
    bns = km.training_batchnorms(MODEL, phases)
    assert len(bns) == 3
    frozen = plan_phases(RunConfig(freeze_bn=True))
    assert len(km.training_batchnorms(MODEL, frozen)) == 1  # the head's alone
    try:
        check_train_batches(n, bs, len(bns), "tiny", 0)
    except DataError:
        assert n == 1
    else:
        assert batch >= 2

def batch_size_one_refused():
    try:
        km.resolve_spec("MobileNetV3Small", RunConfig(backbone="keras/MobileNetV3Small",
                                                      img_size=32, batch_size=1))
    except ConfigError as exc:
        assert "--batch-size 1: keras/MobileNetV3Small has " in str(exc), str(exc)
    else:
        raise AssertionError("--batch-size 1 was accepted")

out = {}
for name, prop in [("batch_size_one", batch_size_one_refused),
                   ("recalibration", recalibration_is_exact),
                   ("prediction", predictions_do_not_depend_on_the_batch),
                   ("training_batches", training_batches_follow_the_rule)]:
    try:
        prop()
        out[name] = "ok"
    except Exception as exc:
        import traceback
        out[name] = traceback.format_exc()[-3000:]
print("KERAS" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def keras_results() -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1"}
    env.pop("KERAS_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", KERAS_PROPERTIES, str(KERAS_EXAMPLES)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("KERAS")), None)
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[len("KERAS"):])


KERAS_EXAMPLES = 6


@pytest.mark.parametrize("prop", ["recalibration", "prediction", "training_batches",
                                  "batch_size_one"])
def test_keras_properties(keras_results: dict, prop: str) -> None:
    """Keras: precise BatchNorm equals one pass over every image (per-image weighting, spread
    of the chunk means included), predictions ignore the batch, training batches follow
    ``recipe.batches`` (each property KERAS_EXAMPLES derandomized cases plus its examples)."""
    assert keras_results[prop] == "ok", keras_results[prop]
