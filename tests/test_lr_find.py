"""The LR range test: the suggestion read from a loss curve, and the end-to-end command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recipe.lr_find import lr_ramp, save, suggest

ROOT = Path(__file__).resolve().parents[1]


def synthetic_curve(lrs: np.ndarray) -> list[float]:
    """Flat, then a descent steepest near 1e-3, a minimum near 1e-2, then divergence."""
    x = np.log10(lrs)
    return list(2.0 - 1.5 / (1 + np.exp(-(x + 3) * 3)) + np.where(x > -2, (x + 2) ** 2 * 8, 0))


def test_suggestion_is_the_steepest_descent_and_divergence_is_cut() -> None:
    lrs = lr_ramp(1e-6, 1.0, 120)
    result = suggest(list(lrs), synthetic_curve(lrs))
    assert 3e-4 < result.suggested_lr < 3e-3, result.suggested_lr
    assert 3e-3 < result.min_loss_lr < 3e-2
    assert result.diverged_at is not None and result.diverged_at > result.min_loss_lr
    assert len(result.smoothed) < len(lrs)  # the curve stops where the loss exploded


def test_nan_losses_end_the_curve_and_bad_ramps_are_refused(tmp_path: Path) -> None:
    lrs = lr_ramp(1e-5, 1.0, 50)
    losses = synthetic_curve(lrs)[:30] + [math.nan] * 20
    result = suggest(list(lrs), losses)
    assert result.diverged_at == pytest.approx(lrs[30])
    data, plot = save(result, tmp_path / "lr_find", "test")
    assert json.loads(data.read_text())["suggested_lr"] == result.suggested_lr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="need 0 < start < end"):
        lr_ramp(1.0, 1e-3)
    with pytest.raises(ValueError, match="diverged within the first steps"):
        suggest([1e-3, 1e-2, 1e-1], [1.0, math.inf, math.inf])


@pytest.mark.slow
@pytest.mark.parametrize(("backbone", "size"), [("timm/resnet10t", "16"),
                                                ("keras/MobileNetV3Small", "32")])
def test_lr_find_command_writes_curve_and_suggestion_and_trains_nothing(
        demo_subset: Path, tmp_path: Path, backbone: str, size: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run_folds.py"), "--data", str(demo_subset), "--out",
         str(tmp_path / "runs"), "--backbone", backbone, "--img-size", size, "--batch-size", "16",
         "--lr-find", "--progress", "false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "suggested --lr" in proc.stdout
    found = json.loads(next((tmp_path / "runs").rglob("lr_find/lr_find.json")).read_text())
    assert 1e-5 < found["suggested_lr"] < 1.0 and len(found["losses"]) == 100
    assert all(math.isfinite(v) for v in found["losses"][:50])  # small LRs train normally
    assert next((tmp_path / "runs").rglob("lr_find/lr_find.png")).stat().st_size > 1000
    assert not list((tmp_path / "runs").rglob("meta.json"))
    assert not list((tmp_path / "runs").rglob("oof.parquet"))
