"""The backbone contract, run over every built-in family (as timm's tests run every model).

Each case trains one tiny fold through ``backend.train_fold`` in its own subprocess: torch and
tensorflow never share a process, and the check also proves a family never loads the other one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# (backbone name, input size, framework it must report, framework it must never load)
CASES = [
    pytest.param("timm/resnet10t", 32, "torch", "tensorflow", id="timm/resnet10t"),
    pytest.param("keras/MobileNetV3Small", 32, "tensorflow", "torch", id="keras/MobileNetV3Small"),
]

CONTRACT_SCRIPT = r"""
import json, sys
from pathlib import Path

import numpy as np

import backbones
from backbones.base import FoldJob, FoldResult
from oof.config import RunConfig

name, size, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
cfg = RunConfig(backbone=name, img_size=size, epochs=1, batch_size=8, progress=False,
                threads=1)
spec, backend = backbones.resolve(cfg)
rng = np.random.default_rng(0)
classes = ["ant", "bee", "cicada"]

def images(n):
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)

job = FoldJob(
    spec=spec, cfg=cfg, fold=0, classes=classes,
    x_train=images(24), y_train=np.arange(24) % 3, x_val=images(9), y_val=np.arange(9) % 3,
    x_test=images(5), checkpoint_path=out / "checkpoints" / backend.checkpoint_name(0),
    work_dir=out / "work", history_path=out / "fold0_history.csv", seed=0,
)
result = backend.train_fold(job)
print(json.dumps({
    "spec": spec.to_dict(),
    "backend_framework": backend.framework,
    "versions": backend.versions(),
    "is_fold_result": isinstance(result, FoldResult),
    "val_shape": list(np.shape(result.val_proba)),
    "test_shape": list(np.shape(result.test_proba)),
    "val_sums": np.asarray(result.val_proba, dtype=float).sum(axis=1).tolist(),
    "test_sums": np.asarray(result.test_proba, dtype=float).sum(axis=1).tolist(),
    "finite": bool(np.isfinite(result.val_proba).all() and np.isfinite(result.test_proba).all()),
    "history": result.history,
    "checkpoint": str(job.checkpoint_path),
    "modules": sorted(m for m in ("torch", "tensorflow") if m in sys.modules),
}, default=str))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size", "framework", "foreign"), CASES)
def test_backbone_contract(tmp_path: Path, name: str, size: int, framework: str,
                           foreign: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", CONTRACT_SCRIPT, name, str(size), str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])

    spec = r["spec"]  # preprocessing travels with the model
    assert spec["name"] == name and spec["family"] == name.split("/")[0]
    assert spec["framework"] == framework == r["backend_framework"]
    assert spec["input_size"] == size
    assert len(spec["mean"]) == 3 and len(spec["std"]) == 3
    assert all(s > 0 for s in spec["std"])
    assert spec["preprocessing"]
    assert r["versions"]

    assert r["is_fold_result"]
    assert r["val_shape"] == [9, 3] and r["test_shape"] == [5, 3]
    assert r["finite"]
    assert all(abs(s - 1) < 1e-5 for s in r["val_sums"] + r["test_sums"])
    assert len(r["history"]) == 1
    for row in r["history"]:
        assert {"epoch", "loss", "accuracy"} <= set(row)
    checkpoint = Path(r["checkpoint"])
    assert checkpoint.is_file() and checkpoint.stat().st_size > 0
    assert not [p for p in checkpoint.parent.iterdir() if p.name.endswith(".tmp")]
    assert (tmp_path / "fold0_history.csv").is_file()
    assert foreign not in r["modules"], f"{name} loaded {foreign}"


def test_triton_kept_out_without_a_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No GPU driver: ``import triton`` fails fast instead of loading libtriton; with one, or
    with FOLDSTACK_LOAD_TRITON=1, nothing is touched."""
    import backbones

    monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.setattr(backbones, "GPU_DEVICE_FILES", (str(tmp_path / "no-such-device"),))
    assert backbones.keep_triton_out_without_gpu()
    with pytest.raises(ImportError):
        import triton  # noqa: F401
    monkeypatch.delitem(sys.modules, "triton")
    monkeypatch.setenv("FOLDSTACK_LOAD_TRITON", "1")
    assert not backbones.keep_triton_out_without_gpu()
    assert "triton" not in sys.modules
    monkeypatch.delenv("FOLDSTACK_LOAD_TRITON")
    (tmp_path / "nvidiactl").touch()
    monkeypatch.setattr(backbones, "GPU_DEVICE_FILES", (str(tmp_path / "nvidiactl"),))
    assert not backbones.keep_triton_out_without_gpu()
    assert "triton" not in sys.modules


@pytest.mark.skipif(any(os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia",
                                                    "/dev/kfd")), reason="a GPU driver is here")
def test_timm_backend_on_cpu_never_loads_triton() -> None:
    """The timm backend (timm -> torchvision -> torch._dynamo) runs with triton absent."""
    code = ("import sys, backbones.timm.model as tb, torch.utils._triton as t;"
            "m = tb.create_model; print(sys.modules.get('triton'), t.has_triton_package())")
    env = {k: v for k, v in os.environ.items() if k != "FOLDSTACK_LOAD_TRITON"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["None", "False"]
