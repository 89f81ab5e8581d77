"""``--predict-weights last|best``: the fold checkpoint holds exactly the weights that predicted.

Runs the real timm fold trainer in a subprocess (torch never enters the pytest process, which
may hold TensorFlow from the Keras tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys
from pathlib import Path
import numpy as np, torch
from backbones.base import FoldJob
from backbones import get_backend
from backbones.timm.model import create_model, pick_device, resolve_spec
from backbones.timm.train import Trainer
train_fold = get_backend("timm").train_fold
from oof.config import RunConfig

out = Path(sys.argv[1]); mode = sys.argv[2]
cfg = RunConfig(backbone="timm/resnet10t", img_size=16, epochs=4, batch_size=16, lr=0.05,
                progress=False, predict_weights=mode, augment="none")
spec = resolve_spec("resnet10t", cfg)
rng = np.random.default_rng(0)
x = rng.integers(0, 255, (64, 16, 16, 3), dtype=np.uint8); y = np.arange(64) % 3
job = FoldJob(spec, cfg, 0, ["a", "b", "c"], x[:48], y[:48], x[48:], y[48:], x[:5],
              out / "fold0.safetensors", out / "work", out / "hist.csv", seed=1)
res = train_fold(job)
from safetensors.torch import load_model
from backbones.timm.serving import read_checkpoint_meta
model = create_model(spec, 3); load_model(model, str(out / "fold0.safetensors"))
ckpt = {"meta": read_checkpoint_meta(out / "fold0.safetensors")}
trainer = Trainer(model, spec, cfg, pick_device(cfg), 1)
again = trainer.predict(x[48:])
val_losses = [h["val_loss"] for h in res.history]
print(json.dumps({"max_diff": float(np.abs(again - res.val_proba).max()),
                  "best_epoch": res.info["best_epoch"],
                  "argmin": int(np.argmin(val_losses)), "meta": ckpt["meta"]["predict_weights"]}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["last", "best"])
def test_checkpoint_reproduces_oof_rows(tmp_path: Path, mode: str) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), mode], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["max_diff"] < 1e-5  # the saved weights are the ones that predicted
    assert got["best_epoch"] == got["argmin"]
    assert got["meta"] == mode
