"""The fold template (backbones/fold.py) and the family registry: what every family relies on.

The families' own runs go through tests/test_backbone_contract.py and the run tests; here: the
registry (light registration, unknown names, a package that registers nothing), the shared
checkpoint metadata key, and the one prediction loop keeping the timm family's arithmetic.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import backbones
from backbones.fold import FoldPredictor, checkpoint_weights, predict_each_view, predict_views
from oof.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_a_family_registers_without_importing_its_framework() -> None:
    """Asking for a family's facts (name, checkpoint names, libraries) imports no framework:
    the bundle and the runner read them before choosing what to load."""
    code = ("import sys, backbones; f = backbones.get_backend('timm');"
            "print(f.name, f.framework, f.checkpoint_name(2), f.checkpoint_name(1, best=True),"
            " ','.join(f.libraries), 'torch' in sys.modules, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out == ["timm", "torch", "fold2.safetensors", "fold1.best.safetensors",
                   "torch,torchvision,timm", "False", "False"]


def test_unknown_family_is_refused_with_the_closest_name() -> None:
    with pytest.raises(ConfigError, match=r"unknown family 'tim' \(did you mean timm\?\)"):
        backbones.get_backend("tim")
    with pytest.raises(ConfigError, match=r"--backbone 'kears/B0': unknown family 'kears' "
                                          r"\(did you mean keras/B0\?\)"):
        backbones.split_name("kears/B0")


def test_a_package_that_registers_no_family_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(backbones.FAMILIES, "plain", "json")  # importable, registers nothing
    with pytest.raises(ConfigError, match="json registered no family 'plain'"):
        backbones.get_backend("plain")
    stray = type(backbones.get_backend("timm"))()
    stray.name = "stray"
    with pytest.raises(ConfigError, match="'stray' is not named in backbones.FAMILIES"):
        backbones.register(stray)


def test_checkpoint_metadata_has_one_weights_key_and_old_keras_files_still_read() -> None:
    """Keras checkpoints written before the shared schema say 'weights'; readers see
    'predict_weights' either way."""
    assert checkpoint_weights({"predict_weights": "last"}) == "last"
    assert checkpoint_weights({"weights": "best"}) == "best"  # a Keras checkpoint before
    assert checkpoint_weights({"fold": 0}) is None
    family = backbones.get_backend("timm")
    old = FoldPredictor(family, None, [], {"fold": 1, "weights": "best"}, 16, 3)  # type: ignore[arg-type]
    assert old.meta["predict_weights"] == "best" and old.meta["weights"] == "best"
    new = FoldPredictor(family, None, [], {"predict_weights": "last"}, 16, 3)  # type: ignore[arg-type]
    assert new.meta == {"predict_weights": "last"}


def test_the_one_prediction_loop_keeps_the_timm_arithmetic() -> None:
    """predict_views over the timm model gives the bits of the loop the timm family had before
    the template: float32 softmax summed over the views on torch's side, divided by their count
    in float32, then float64 and each row normalised; any batch size gives the same rows."""
    import torch

    from backbones.timm.model import create_model, resolve_spec
    from backbones.timm.train import Trainer
    from oof.config import RunConfig
    from recipe.tta import tta_views

    torch.set_num_threads(1)
    cfg = RunConfig(backbone="timm/resnet10t", img_size=16, tta="flips", tta_scales=[1.25],
                    threads=1)
    spec = resolve_spec("resnet10t", cfg)
    torch.manual_seed(0)
    trainer = Trainer(create_model(spec, 5), spec, cfg, torch.device("cpu"), 1)
    views = tta_views(cfg.tta, cfg.tta_scales, 0, "none", 16, 0)
    images = np.random.default_rng(0).integers(0, 256, (11, 16, 16, 3), dtype=np.uint8)
    model = trainer.predict_model.eval()
    with torch.no_grad():  # the loop as backbones/timm_backend.py wrote it
        out, rows = [], np.arange(len(images))
        for start in range(0, len(images), 4):
            batch, probs = images[start:start + 4], 0
            for view in views:
                x = trainer.to_input(torch.from_numpy(view(batch, rows[start:start + 4])))
                probs = probs + model(x).float().softmax(1)
            out.append((probs / len(views)).numpy().astype(np.float64))
        want = np.concatenate(out)
        want = want / want.sum(axis=1, keepdims=True)
    family = backbones.get_backend("timm")
    trainer.before_predict()
    got = predict_views(images, views, trainer.predict_batch, 5, 4, family.predict_dtype)
    assert got.dtype == np.float64 and np.array_equal(got, want)
    assert np.array_equal(trainer.predict(images, views, batch_size=4), want)
    assert predict_views(images[:0], views, trainer.predict_batch, 5, 4, np.float32).shape == (0, 5)
    proc = FoldPredictor(family, trainer, views, {}, 16, 5)
    assert np.array_equal(proc.predict_proba(images), predict_views(
        images, views, trainer.predict_batch, 5, family.predict_batch_size, np.float32))
    in_float64 = predict_views(images, views, trainer.predict_batch, 5, 4, np.float64)
    assert not np.array_equal(in_float64, want)  # the accumulation dtype is part of the bits

    # --tta-save-views: the mean and each view alone from one pass per view and batch, each the
    # bits of predict_views over that view
    calls = []

    def counted(batch: np.ndarray, size: int) -> np.ndarray:
        calls.append(len(batch))
        return trainer.predict_batch(batch, size)

    mean, alone = predict_each_view(images, views, counted, 5, 4, family.predict_dtype)
    assert len(calls) == 3 * len(views) and sum(calls) == len(images) * len(views)
    assert np.array_equal(mean, want) and alone.shape == (len(views), 11, 5)
    for v, view in enumerate(views):
        assert np.array_equal(alone[v], predict_views(images, [view], trainer.predict_batch, 5,
                                                      4, family.predict_dtype))
    empty = predict_each_view(images[:0], views, counted, 5, 4, np.float32)
    assert empty[0].shape == (0, 5) and empty[1].shape == (len(views), 0, 5)
