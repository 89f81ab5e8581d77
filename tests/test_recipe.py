"""The training recipe: fine-tuning phases and the one LR curve both frameworks follow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from oof.config import RunConfig
from oof.errors import ConfigError
from recipe import lr_factor, phase_lengths, plan_phases
from recipe.phases import phase_of

ROOT = Path(__file__).resolve().parents[1]


def test_pretrained_default_is_head_then_full_with_layer_decay() -> None:
    head, full = plan_phases(RunConfig(pretrained="w.safetensors", epochs=6))
    assert (head.name, head.first_epoch, head.epochs, head.train_backbone) == ("head", 0, 1,
                                                                               False)
    assert head.warmup_epochs == 0 and head.layer_decay is None
    assert (full.name, full.first_epoch, full.epochs, full.train_backbone) == ("full", 1, 5, True)
    assert full.layer_decay == 0.8 and head.lr == full.lr == 1e-3  # the fine-tuning default
    assert [phase_of([head, full], e).name for e in range(6)] == ["head"] + ["full"] * 5


def test_from_scratch_is_one_phase_and_keys_override() -> None:
    (only,) = plan_phases(RunConfig(epochs=4))
    assert (only.name, only.epochs, only.layer_decay, only.lr) == ("full", 4, None, 2e-3)
    assert plan_phases(RunConfig(epochs=4, pretrained="auto", lr=3e-3))[1].lr == 3e-3
    head, full = plan_phases(RunConfig(epochs=4, head_epochs=2, head_lr=0.01, layer_decay=1))
    assert head.lr == 0.01 and full.epochs == 2 and full.layer_decay is None
    (head_only,) = plan_phases(RunConfig(epochs=2, head_epochs=2, pretrained="auto"))
    assert head_only.name == "head"  # a linear probe of the pretrained features
    assert len(plan_phases(RunConfig(epochs=1, pretrained="auto"))) == 1  # no room for a head


def test_bad_phase_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="--head-epochs 5: more than --epochs 3"):
        plan_phases(RunConfig(epochs=3, head_epochs=5))


def test_lr_curve_warms_up_then_anneals() -> None:
    total, warmup = phase_lengths(10, 1.0, 20)
    assert (total, warmup) == (200, 20)
    curve = [lr_factor(s, total, warmup, "cosine") for s in range(total)]
    assert curve[0] == pytest.approx(1 / 20) and curve[19] == 1.0
    assert all(a >= b for a, b in zip(curve[19:], curve[20:]))
    assert curve[-1] == pytest.approx(0.01, abs=1e-3)
    assert lr_factor(150, total, warmup, "constant") == 1.0
    assert lr_factor(199, total, warmup, "onecycle") < 1e-3
    step = [lr_factor(s, total, warmup, "step") for s in range(total)]
    assert step[20] == 1.0 and step[20 + 90] == pytest.approx(0.1)
    assert step[20 + 135] == pytest.approx(0.01) and step[-1] == pytest.approx(0.01)
    cyclic = [lr_factor(s, total, warmup, "cyclic") for s in range(total)]
    restarts = [s for s in range(21, total) if cyclic[s] > cyclic[s - 1] + 0.5]
    assert len(restarts) == 2 and min(cyclic[20:]) == pytest.approx(0.01, abs=2e-3)
    with pytest.raises(ValueError, match="schedule 'plateau'"):
        lr_factor(30, total, warmup, "plateau")


KERAS_CURVE = """
import json, sys
from backbones.keras.optim import WarmupSchedule
out = {}
for schedule in ("cosine", "onecycle", "cyclic", "step", "constant"):
    s = WarmupSchedule(0.5, 120, 17, schedule)
    out[schedule] = [float(s(step)) for step in range(130)]
s.set_lengths(60, 5)  # a reused traced step, another fold's length
out["relength"] = [float(s(step)) for step in range(60)]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_keras_schedule_follows_the_recipe_curve() -> None:
    """TensorFlow evaluates the curve in-graph; it must equal ``recipe.lr_factor`` step by step."""
    proc = subprocess.run([sys.executable, "-c", KERAS_CURVE], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keras_curves = json.loads(proc.stdout.strip().splitlines()[-1])
    relength = keras_curves.pop("relength")
    assert relength == pytest.approx([0.5 * lr_factor(s, 60, 5, "constant") for s in range(60)])
    assert set(keras_curves) == {"cosine", "onecycle", "cyclic", "step", "constant"}
    for schedule, values in keras_curves.items():
        expected = [0.5 * lr_factor(step, 120, 17, schedule) for step in range(130)]
        assert values == pytest.approx(expected, rel=1e-5, abs=1e-7), schedule  # float32


TIMM_PHASES = r"""
import dataclasses, json, sys
from pathlib import Path
import numpy as np
import torch, timm
from backbones.timm import data as tdata, model as tmodel, train as ttrain
from backbones.base import FoldJob
from oof.config import RunConfig
from recipe import plan_phases

path = sys.argv[1]
torch.manual_seed(5)
source = timm.create_model("resnet10t", pretrained=False)
for m in source.modules():  # non-trivial BatchNorm statistics, as pretrained weights have
    if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
torch.save(source.state_dict(), path)
cfg = RunConfig(backbone="timm/resnet10t", pretrained=path, img_size=32, epochs=3,
                batch_size=16, progress=False, augment="none")
spec = tmodel.resolve_spec("resnet10t", cfg)
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
y = rng.integers(0, 4, 64)
job = FoldJob(spec, cfg, 0, ["a", "b", "c", "d"], x, y, x[:8], y[:8], x[:8], Path("unused"),
              Path("unused"), Path("unused"), seed=0)
loader = tdata.make_loader(x, y, cfg, 0, torch.device("cpu"))
trainer = ttrain.build_trainer(job, len(loader))
body = lambda: {k: v.clone() for k, v in trainer.model.state_dict().items()
                if not k.startswith("fc.")}
before = body()
head_before = trainer.model.fc.weight.detach().clone()
out = {"phase": trainer.phase.name}
trainer.train_epoch(loader, 0)
after_head = body()
out["backbone_unchanged"] = all(torch.equal(before[k], after_head[k]) for k in before)
out["head_changed"] = not torch.equal(head_before, trainer.model.fc.weight)
out["matches_file"] = torch.equal(after_head["conv1.0.weight"],
                                  source.state_dict()["conv1.0.weight"])
full = plan_phases(cfg)[1]
trainer.start_phase(full)
scales = sorted({round(g.get("lr_scale", 1.0), 6) for g in trainer.optimizer.param_groups})
out["scales"] = scales
trainer.train_epoch(loader, 1)
after_full = body()
out["backbone_trained"] = not torch.equal(before["conv1.0.weight"], after_full["conv1.0.weight"])
bn_keys = [k for k in before if k.startswith(("bn1.", "layer1.0.bn1."))
           and not k.endswith("num_batches_tracked")]
out["bn_frozen"] = all(torch.equal(before[k], after_full[k]) for k in bn_keys) and len(bn_keys) == 8
out["bn_eval_in_train_mode"] = not trainer.model.bn1.training and trainer.model.layer1.training
# --freeze-bn false: BatchNorm statistics and affine weights train with the rest
trainer.start_phase(plan_phases(dataclasses.replace(cfg, freeze_bn=False))[1])
trainer.train_epoch(loader, 2)
after_free = body()
out["bn_stats_moved"] = not torch.equal(before["bn1.running_mean"], after_free["bn1.running_mean"])
out["bn_weight_moved"] = not torch.equal(before["bn1.weight"], after_free["bn1.weight"])
names = ("adamw", "sgd", "adam", "nadam", "rmsprop", "lamb", "lion", "adamax")
out["optimizers"], out["fused"] = {}, {}
for name in names:
    trainer.cfg = RunConfig(optimizer=name)
    trainer.start_phase(full)
    out["optimizers"][name] = type(trainer.optimizer).__name__
    out["fused"][name] = bool(trainer.optimizer.defaults.get("fused"))
print(json.dumps(out))
"""


@pytest.mark.slow
def test_timm_head_phase_freezes_backbone_and_full_phase_decays_by_layer(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", TIMM_PHASES, str(tmp_path / "w.pth")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["phase"] == "head"
    # the head phase leaves every backbone tensor, BatchNorm statistics included, as loaded
    assert out["backbone_unchanged"] and out["matches_file"] and out["head_changed"]
    # then every layer trains, the deepest with the smallest LR scale (0.8 per layer group),
    # but BatchNorm stays frozen (statistics, scale and shift; inference mode) by default...
    assert out["backbone_trained"] and out["bn_frozen"] and out["bn_eval_in_train_mode"]
    # ... and trains with the rest when asked to
    assert out["bn_stats_moved"] and out["bn_weight_moved"]
    scales = out["scales"]
    assert len(scales) >= 4 and scales[-1] == 1.0 and scales[0] < 0.8 ** 3, scales
    # every optimizer name of the shared vocabulary is one of timm's
    assert out["optimizers"]["adamw"] == "AdamW" and out["optimizers"]["sgd"] == "SGD"
    assert out["optimizers"]["lamb"] == "Lamb" and out["optimizers"]["lion"] == "Lion"
    assert len(set(out["optimizers"].values())) == 8
    # torch's fused kernels where it has them (CPU too: a 5x faster AdamW step)
    assert {n for n, fused in out["fused"].items() if fused} == {"adamw", "adam", "sgd"}


TIMM_SIZES = r"""
import json
import torch
from backbones.timm.model import create_model, resolve_spec
from oof.config import RunConfig
out = {}
for name, size in [("vit_tiny_patch16_224", 32), ("resnet10t", 40)]:
    model = create_model(resolve_spec(name, RunConfig(img_size=size)), 3).eval()
    out[name] = list(model(torch.zeros(2, 3, size, size)).shape)
heads = {}
for pool in ("avg", "max", "avgmax", "catavgmax"):
    for hidden in (0, 24):
        cfg = RunConfig(img_size=32, head_pool=pool, head_hidden=hidden, head_activation="gelu",
                        head_dropout=0.3)
        model = create_model(resolve_spec("resnet10t", cfg), 5).eval()
        head = model.get_classifier()
        x = torch.rand(2, 3, 32, 32)
        heads[f"{pool}-{hidden}"] = {
            "out": list(model(x).shape), "head": type(head).__name__,
            "in": (head[0] if hidden else head).in_features, "pool": model.global_pool.pool_type,
            "layers": [type(m).__name__ for m in head] if hidden else [],
            "drop": model.drop_rate}
out["heads"] = heads
print(json.dumps(out))
"""


@pytest.mark.slow
def test_timm_models_are_built_at_the_run_image_size_with_the_configured_head() -> None:
    """A ViT built for 224 px crashed at any other size: img_size now reaches create_model.
    Heads: every pooling, dropout, and the optional hidden layer."""
    proc = subprocess.run([sys.executable, "-c", TIMM_SIZES], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["vit_tiny_patch16_224"] == [2, 3] and out["resnet10t"] == [2, 3]
    heads = out["heads"]
    assert all(h["out"] == [2, 5] and h["drop"] == 0.3 for h in heads.values())
    assert [heads[f"{p}-0"]["pool"] for p in ("avg", "max", "avgmax", "catavgmax")] == [
        "avg", "max", "avgmax", "catavgmax"]
    assert heads["catavgmax-0"]["in"] == 2 * heads["avg-0"]["in"]  # avg and max concatenated
    assert heads["avg-24"]["layers"] == ["Linear", "BatchNorm1d", "GELU", "Dropout", "Linear"]
    assert heads["avg-0"]["head"] == "Linear"


KERAS_PHASES = r"""
import dataclasses, json, sys
from pathlib import Path
import numpy as np
import keras
from backbones.keras import compiled as kc, data as kd, model as km
from backbones.base import FoldJob
from oof.config import RunConfig
from recipe import plan_phases

app = "MobileNetV3Small"
base = getattr(keras.applications, app)(include_top=False, weights=None, input_shape=(32, 32, 3))
path = str(Path(sys.argv[1]) / "base.weights.h5")
base.save_weights(path)
cfg = RunConfig(backbone="keras/" + app, pretrained=path, img_size=32, epochs=2, batch_size=16,
                progress=False, augment="none")
spec = km.resolve_spec(app, cfg)
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
y = rng.integers(0, 4, 64)
job = FoldJob(spec, cfg, 0, ["a", "b", "c", "d"], x, y, x[:8], y[:8], x[:8], Path("unused"),
              Path("unused"), Path("unused"), seed=0)
head, full = plan_phases(cfg)
model = kc.fresh_model(job, km.DEFAULT_BN_MOMENTUM)
ds, steps, batches = kd.make_train_dataset(x, y, 4, cfg, 0)
application = km.application_of(model)
before = [w.copy() for w in application.get_weights()]  # kernels and BatchNorm statistics
head_before = model.get_layer("logits").get_weights()[0].copy()
kc.compile_phase(model, job, steps, head)
out = {"head_trainable": len(model.trainable_variables),
       "zero_head": not head_before.any(),
       "uniform": bool(np.allclose(model.predict(x[:4], verbose=0), 0.25, atol=1e-6))}
model.fit(ds, epochs=1, callbacks=[batches], verbose=0)
after = application.get_weights()
out["backbone_unchanged"] = all(np.array_equal(a, b) for a, b in zip(before, after))
out["head_changed"] = not np.array_equal(head_before, model.get_layer("logits").get_weights()[0])
kc.compile_phase(model, job, steps, full)
out["scales"] = sorted(set(round(s, 6) for s in model.optimizer.lr_scales))
out["optimizer"] = type(model.optimizer).__name__
model.fit(ds, initial_epoch=1, epochs=2, callbacks=[batches], verbose=0)
out["backbone_trained"] = not all(np.array_equal(a, b) for a, b in
                                  zip(before, application.get_weights()))
bns = [ly for ly in km._iter_layers(application) if isinstance(ly, keras.layers.BatchNormalization)]
bn_before = [w.copy() for ly in bns for w in ly.get_weights()]
model.fit(ds, initial_epoch=1, epochs=2, callbacks=[batches], verbose=0)
# BatchNorm frozen by default with pretrained weights: statistics, scale and shift as loaded
out["bn_frozen"] = len(bns) > 10 and all(
    np.array_equal(a, b) for a, b in zip(bn_before, [w for ly in bns for w in ly.get_weights()]))
kc.compile_phase(model, job, steps, plan_phases(dataclasses.replace(cfg, freeze_bn=False))[1])
model.fit(ds, initial_epoch=1, epochs=2, callbacks=[batches], verbose=0)
out["bn_trained"] = not all(
    np.array_equal(a, b) for a, b in zip(bn_before, [w for ly in bns for w in ly.get_weights()]))
print("PHASES" + json.dumps(out))
"""


@pytest.mark.slow
def test_keras_head_phase_freezes_application_and_full_phase_decays_by_layer(
        tmp_path: Path) -> None:
    """The Keras equivalent of the timm phases: frozen application (BatchNorm statistics too)
    while the head trains, then every layer with per-variable LR scales."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", KERAS_PHASES, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PHASES"))
    out = json.loads(line[len("PHASES"):])
    assert out["head_trainable"] == 2  # the logits kernel and bias, nothing of the application
    assert out["zero_head"] and out["uniform"]  # the new head starts at uniform predictions
    assert out["backbone_unchanged"] and out["head_changed"]
    assert out["backbone_trained"] and out["optimizer"] == "LayerScaledAdamW"
    assert out["bn_frozen"] and out["bn_trained"]  # --freeze-bn: the default, and false
    scales = out["scales"]
    assert len(scales) >= 8 and scales[-1] == 1.0 and scales[0] < 0.8 ** 10, scales
