"""The LR range test (Leslie Smith; fastai's ``lr_find``), framework-free.

A backend trains one batch per learning rate on a geometric ramp and reports the losses; this
module smooths them, stops the curve where the loss diverges, suggests a peak LR and writes the
plot and the numbers next to the run. The suggestion is the LR of the steepest descent of the
smoothed loss, the usual reading of the curve (fastai's ``steep`` suggestion).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from oof.atomic import write_atomic, write_text

LR_FIND_DIR = "lr_find"


@dataclass
class LRFindResult:
    """The ramp, the raw and smoothed losses, and the suggested peak LR."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggested_lr: float
    min_loss_lr: float
    diverged_at: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def lr_ramp(start: float = 1e-7, end: float = 1.0, steps: int = 100) -> np.ndarray:
    """Learning rates from ``start`` to ``end``, geometrically spaced."""
    if not 0 < start < end or steps < 10:
        raise ValueError(f"lr ramp {start}..{end} in {steps} steps: need 0 < start < end and "
                         ">= 10 steps")
    return np.geomspace(start, end, steps)


def suggest(lrs: list[float], losses: list[float], beta: float = 0.9,
            diverge: float = 4.0) -> LRFindResult:
    """Smooth the losses (bias-corrected EMA), cut at divergence, pick the steepest descent."""
    smoothed: list[float] = []
    avg, best, cut = 0.0, math.inf, len(losses)
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            cut = i
            break
        avg = beta * avg + (1 - beta) * loss
        value = avg / (1 - beta ** (i + 1))
        smoothed.append(value)
        best = min(best, value)
        if i > 10 and value > diverge * best:
            cut = i
            break
    lr, sm = np.log10(np.asarray(lrs[:len(smoothed)], dtype=float)), np.asarray(smoothed)
    if len(sm) < 5:
        raise ValueError("the loss diverged within the first steps: start the ramp lower")
    # skip the noisy start and the diverging end when reading the slope
    lo, hi = max(1, len(sm) // 10), max(len(sm) - 2, 2)
    slope = np.gradient(sm, lr)
    steepest = lo + int(np.argmin(slope[lo:hi]))
    return LRFindResult(
        lrs=[float(x) for x in lrs], losses=[float(x) for x in losses],
        smoothed=[float(x) for x in smoothed], suggested_lr=float(10 ** lr[steepest]),
        min_loss_lr=float(10 ** lr[int(np.argmin(sm))]),
        diverged_at=float(lrs[cut]) if cut < len(lrs) else None)


def save(result: LRFindResult, out_dir: Path, title: str) -> tuple[Path, Path]:
    """``lr_find.json`` and ``lr_find.png`` (loss against LR, suggestion marked), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / "lr_find.json"
    write_text(data, json.dumps(result.to_dict(), indent=1))
    fig, ax = plt.subplots(figsize=(6, 4))
    n = len(result.smoothed)
    ax.plot(result.lrs[:n], result.losses[:n], alpha=0.3, label="loss")
    ax.plot(result.lrs[:n], result.smoothed, label="smoothed")
    ax.axvline(result.suggested_lr, color="C3", ls="--",
               label=f"suggested {result.suggested_lr:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    plot = out_dir / "lr_find.png"
    write_atomic(plot, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return data, plot
