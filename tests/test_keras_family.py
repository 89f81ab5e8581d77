"""The Keras family on the fold template: what only its hooks decide (issue 29).

One TensorFlow subprocess (TensorFlow never enters the pytest process): a phased fold (head,
then every layer) interrupted at the boundary between its phases, where only the head phase's
BackupAndRestore backup exists, resumes to the same bits as an uninterrupted fold, best epoch
included; and a fold checkpoint written before issue 29 (its weights named under ``weights``)
still loads and predicts as a served model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
from pathlib import Path
import h5py
import numpy as np
import backbones
from backbones.base import FoldJob
from backbones.callbacks import Callback
from backbones.fold import checkpoint_weights
from oof.config import RunConfig

out = Path(sys.argv[1])
weights = out / "tiny.weights.h5"  # a 'pretrained' application: two phases
# --lr 1.0 wrecks the full phase: the best epoch is the head's, trained before the interruption
cfg = RunConfig(backbone="keras/MobileNetV3Small", img_size=32, epochs=2, head_epochs=1,
                pretrained=str(weights), batch_size=8, progress=False, threads=1, lr=1.0,
                head_lr=0.05, freeze_bn=False, predict_weights="last")
family = backbones.get_backend("keras")
family.setup_runtime(cfg, 0)  # threads before TensorFlow's first op
import keras
keras.applications.MobileNetV3Small(include_top=False, weights=None,
                                    input_shape=(32, 32, 3)).save_weights(str(weights))
spec, family = backbones.resolve(cfg)
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
y = np.arange(40) % 3

def job(name):
    d = out / name
    return FoldJob(spec=spec, cfg=cfg, fold=0, classes=["a", "b", "c"], x_train=x[:24],
                   y_train=y[:24], x_val=x[24:33], y_val=y[24:33], x_test=x[33:],
                   checkpoint_path=d / family.checkpoint_name(0), work_dir=d / "work",
                   history_path=d / "history.csv", seed=3)

class Interrupt(Callback):  # the full phase's first epoch begins: its backup does not exist
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt

straight = family.train_fold(job("straight"))
try:
    family.train_fold(job("resumed"), [Interrupt()])
    raise SystemExit("not interrupted")
except KeyboardInterrupt:
    pass
backups = sorted(p.name for p in (out / "resumed" / "work" / "backup").iterdir())
resumed = family.train_fold(job("resumed"))

def best_ckpt(name):
    path = out / name / family.checkpoint_name(0, best=True)
    if not path.exists():
        return None
    with h5py.File(path, "r") as fh:
        return [np.asarray(fh[k]).tolist() for k in sorted(_datasets(fh))][:3]

def _datasets(fh):
    found = []
    fh.visititems(lambda k, v: found.append(k) if isinstance(v, h5py.Dataset) else None)
    return found

# a checkpoint of a run before issue 29: the same file, its metadata under the old key
old = out / "old" / "fold0.weights.h5"
old.parent.mkdir()
old.write_bytes(job("straight").checkpoint_path.read_bytes())
with h5py.File(old, "a") as fh:
    meta = json.loads(fh.attrs["foldstack"])
    meta["weights"] = meta.pop("predict_weights")
    fh.attrs["foldstack"] = json.dumps(meta)
run_meta = {"backbone": spec.to_dict(), "classes": ["a", "b", "c"], "train_seed": 3,
            "config": {"tta": "none", "tta_scales": [], "tta_augment": 0, "augment": "none"}}
served = family.load_predictor(run_meta, old, 1)
print("RESULT" + json.dumps({
    "backups_at_interruption": backups,
    "same_val": bool(np.array_equal(straight.val_proba, resumed.val_proba)),
    "same_test": bool(np.array_equal(straight.test_proba, resumed.test_proba)),
    "resumed_from": resumed.info["resumed_from_epoch"],
    "best_epochs": [straight.info["best_epoch"], resumed.info["best_epoch"]],
    "best_ckpt_same": best_ckpt("resumed") is not None
                      and best_ckpt("resumed") == best_ckpt("straight"),
    "old_key": [checkpoint_weights(meta), served.meta.get("predict_weights")],
    "served_gap": float(np.abs(served.predict_proba(x[24:33]) - straight.val_proba).max()),
}))
"""


@pytest.mark.slow
def test_phased_fold_resumes_at_a_phase_boundary_and_old_checkpoints_load(
        tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    r = json.loads(line[len("RESULT"):])
    assert r["backups_at_interruption"] == ["head"]  # the boundary: no backup of 'full' yet
    assert r["resumed_from"] == 1
    # the head phase's weights come back before 'full' starts: the same bits as never stopped
    assert r["same_val"] and r["same_test"]
    # the best epoch (the head's, before the interruption) is still the published best
    assert r["best_epochs"] == [0, 0] and r["best_ckpt_same"]
    assert r["old_key"] == ["last", "last"]
    assert r["served_gap"] < 1e-6
