"""The loss, one definition for both frameworks (recipe/losses.py): CE or focal, label smoothing,
class weights; and drop-path (stochastic depth), honoured by timm and refused by Keras."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from oof.config import RunConfig
from oof.errors import ConfigError
from recipe.losses import (
    class_weight_vector,
    focal_loss_numpy,
    parse_class_weights,
    smooth,
)

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["ant", "bee", "cat"]


def test_class_weights_parse_and_refuse_clearly() -> None:
    assert parse_class_weights("none", CLASSES) == "none"
    assert parse_class_weights("Balanced", CLASSES) == "balanced"
    assert parse_class_weights("bee=2.5, cat=0.5", CLASSES) == {"bee": 2.5, "cat": 0.5}
    assert parse_class_weights({"ant": 3}, CLASSES) == {"ant": 3}
    for bad, words in [("dog=2", "no such class ['dog']"), ("bee", "has no '='"),
                       ("bee=x", "weight of 'bee' is not a number"),
                       ("bee=0", "must be positive"), ("bee=nan", "must be positive")]:
        with pytest.raises(ConfigError, match=r"--class-weights") as err:
            parse_class_weights(bad, CLASSES)
        assert words in str(err.value), (bad, str(err.value))


def test_balanced_weights_favour_rare_classes_and_average_one() -> None:
    labels = np.array([0] * 8 + [1] * 2 + [2] * 6)
    w = class_weight_vector("balanced", CLASSES, labels)
    np.testing.assert_allclose(w, [16 / 24, 16 / 6, 16 / 18], rtol=1e-6)
    assert w[labels].mean() == pytest.approx(1.0)  # the LR keeps its meaning
    np.testing.assert_array_equal(class_weight_vector("bee=2", CLASSES, labels), [1, 2, 1])
    assert class_weight_vector("none", CLASSES, labels) is None


def test_focal_reference_is_cross_entropy_at_gamma_zero_and_downweights_easy_images() -> None:
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.5, 0.3]])
    onehot = np.eye(3)[[0, 2]]
    ce = -np.log([0.9, 0.3]).mean()
    assert focal_loss_numpy(probs, onehot, 0.0) == pytest.approx(ce)
    easy_share = (-(0.1 ** 2) * np.log(0.9)) / focal_loss_numpy(probs, onehot, 2.0) / 2
    assert easy_share < 0.01  # the confident right answer hardly counts any more
    np.testing.assert_allclose(smooth(onehot, 0.3).sum(1), 1.0)


def _cases() -> list[dict]:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (6, 3))
    hard = np.eye(3)[[0, 1, 2, 2, 1, 0]]
    soft = 0.7 * hard + 0.3 * hard[::-1]  # mixup-like targets
    w = np.array([0.5, 2.0, 1.0])
    return [dict(logits=logits, targets=t, loss=loss, gamma=g, ls=ls, w=cw)
            for t in (hard, soft) for loss, g in (("ce", 0.0), ("focal", 2.0))
            for ls in (0.0, 0.1) for cw in (None, w)]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_timm_loss_matches_the_reference() -> None:
    import torch

    from backbones.timm.train import Trainer

    for case in _cases():
        cfg = RunConfig(loss=case["loss"], focal_gamma=case["gamma"] or 2.0,
                        label_smoothing=case["ls"])
        fake = SimpleNamespace(cfg=cfg, weight_of_class=None if case["w"] is None else
                               torch.tensor(case["w"], dtype=torch.float32))
        target = torch.tensor(case["targets"], dtype=torch.float32)
        if (case["targets"].max(1) == 1).all():  # hard labels go in as class indices
            target = target.argmax(1)
        got = Trainer.loss_fn(fake, torch.tensor(case["logits"], dtype=torch.float32), target)
        want = focal_loss_numpy(_softmax(case["logits"]), case["targets"],
                                case["gamma"] if case["loss"] == "focal" else 0.0, case["ls"],
                                case["w"])
        assert float(got) == pytest.approx(want, rel=1e-5), case


KERAS_LOSS = r"""
import json, sys
import numpy as np
from backbones.keras.data import make_train_dataset
from backbones.keras.optim import make_loss
from oof.config import RunConfig
cases = json.loads(sys.stdin.read())
out = []
for c in cases:
    cfg = RunConfig(loss=c["loss"], focal_gamma=c["gamma"] or 2.0, label_smoothing=c["ls"])
    w = None if c["w"] is None else np.asarray(c["targets"]) @ np.asarray(c["w"])
    out.append(float(make_loss(cfg)(np.asarray(c["targets"], "float32"),
                                    np.asarray(c["probs"], "float32"), sample_weight=w)))
# the dataset hands each image its class weight as the sample weight
x = np.zeros((6, 8, 8, 3), np.uint8)
y = np.array([0, 1, 2, 2, 1, 0])
cfg = RunConfig(batch_size=6, augment="none")
ds, steps, batches = make_train_dataset(x, y, 3, cfg, 0, np.array([0.5, 2.0, 1.0], "float32"))
xb, yb, wb = next(iter(ds))
from backbones.keras.model import resolve_spec
from oof.errors import ConfigError
try:
    resolve_spec("MobileNetV3Small", RunConfig(backbone="keras/MobileNetV3Small", drop_path=0.1))
    refused = ""
except ConfigError as exc:
    refused = str(exc)
print("LOSSES" + json.dumps({"losses": out, "weights": sorted(np.asarray(wb).tolist()),
                             "drop_path": refused}))
"""


@pytest.mark.slow
def test_keras_loss_and_sample_weights_match_the_reference() -> None:
    cases = _cases()
    payload = [dict(targets=c["targets"].tolist(), probs=_softmax(c["logits"]).tolist(),
                    loss=c["loss"], gamma=c["gamma"], ls=c["ls"],
                    w=None if c["w"] is None else c["w"].tolist()) for c in cases]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", KERAS_LOSS], input=json.dumps(payload),
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("LOSSES"))
    got = json.loads(line[len("LOSSES"):])
    for case, value in zip(cases, got["losses"], strict=True):
        want = focal_loss_numpy(_softmax(case["logits"]), case["targets"],
                                case["gamma"] if case["loss"] == "focal" else 0.0, case["ls"],
                                case["w"])
        assert value == pytest.approx(want, rel=1e-4), case
    assert got["weights"] == [0.5, 0.5, 1.0, 1.0, 2.0, 2.0]
    assert got["drop_path"].startswith("--drop-path 0.1: keras.applications fix")


def test_drop_path_reaches_timm_and_is_refused_where_it_cannot_be_honoured() -> None:
    from backbones.timm.model import create_model, resolve_spec

    model = create_model(resolve_spec("resnet10t", RunConfig(img_size=32, drop_path=0.2)), 3)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)
    plain = create_model(resolve_spec("resnet10t", RunConfig(img_size=32)), 3)
    assert not [m for m in plain.modules() if type(m).__name__ == "DropPath"]
    with pytest.raises(ConfigError, match=r"--drop-path 0.1: timm/vgg11 has no stochastic"):
        create_model(resolve_spec("vgg11", RunConfig(img_size=32, drop_path=0.1)), 3)


def test_unknown_class_weight_is_refused_before_anything_is_written(
        demo_subset: Path, tmp_path: Path) -> None:
    from oof.config import parse_config
    from runner.run import run_folds

    out = tmp_path / "runs"
    argv = ["--data", str(demo_subset), "--out", str(out), "--backbone", "timm/resnet10t",
            "--class-weights", "3=2,eleven=4"]
    with pytest.raises(ConfigError, match=r"--class-weights 3=2,eleven=4: no such class "
                                          r"\['eleven'\]"):
        run_folds(parse_config(RunConfig, argv, "run_folds.py", ""))
    assert not out.exists()
