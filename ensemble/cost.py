"""What a run costs to serve: forward passes per image and, when measured, milliseconds per image.

A level-1 run predicts an image with each of its K fold models on each of its V TTA views: K x V
passes. Training records ``passes_per_image`` (and ``ms_per_image``, measured at its prediction
batch size and thread count) in ``meta.json``; a run written before that has its passes computed
from its config by the rule of ``recipe``'s ``tta_views`` (``tta_view_count``; the two are
checked against each other in tests/test_stack_cost.py) and no milliseconds (shown blank, never 0).
A stack costs the sum of the runs it serves (the stacker itself is negligible).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oof.rundir import META_FILE, Run

TTA_FLIP_VIEWS = {"none": 0, "hflip": 1, "flips": 3}  # views added to the image itself


def tta_view_count(tta: str, scales: list[float] | None, augment_views: int) -> int:
    """Views ``tta_views`` averages: the image, its flips, one per zoom, N augmented views."""
    return 1 + TTA_FLIP_VIEWS.get(str(tta or "none"), 0) + len(scales or []) + int(
        augment_views or 0)


@dataclass(frozen=True)
class Cost:
    """Passes per image and milliseconds per image (None: not measured)."""

    passes: int | None
    ms_per_image: float | None

    def __add__(self, other: Cost) -> Cost:
        def plus(a: Any, b: Any) -> Any:
            return None if a is None or b is None else a + b
        return Cost(plus(self.passes, other.passes), plus(self.ms_per_image, other.ms_per_image))

    def row(self) -> dict[str, Any]:
        """The table cells ``passes`` and ``ms_per_image``."""
        ms = None if self.ms_per_image is None else round(float(self.ms_per_image), 3)
        return {"passes": self.passes, "ms_per_image": ms}


def meta_cost(meta: dict[str, Any], n_folds: int | None = None) -> Cost:
    """The cost recorded in (or computed from) one run's ``meta.json``.

    A stack's meta records the sum over its inputs; an older stack without it is summed from
    its inputs' meta.json files where they are still on disk (else unknown).
    """
    ms = meta.get("ms_per_image")
    ms = None if ms is None else float(ms)
    if meta.get("passes_per_image") is not None:
        return Cost(int(meta["passes_per_image"]), ms)
    if int(meta.get("level", 1)) >= 2:
        total = Cost(0, 0.0)
        for inp in meta.get("inputs", []):
            p = Path(str(inp.get("path", ""))) / META_FILE
            try:
                total = total + meta_cost(json.loads(p.read_text()))
            except (OSError, ValueError):
                return Cost(None, None)
        return total
    cfg = meta.get("config") or {}
    k = int(meta.get("folds") or cfg.get("folds") or n_folds or 0) or None
    views = tta_view_count(cfg.get("tta", "none"), cfg.get("tta_scales"),
                           cfg.get("tta_augment", 0))
    return Cost(None if k is None else k * views, ms)


def run_cost(run: Run) -> Cost:
    """A loaded run's cost (its K is the number of folds in its OOF if meta lacks it)."""
    return meta_cost(run.meta, len(np.unique(run.folds)))


def total_cost(runs: list[Run]) -> Cost:
    """The cost of serving ``runs`` together."""
    out = Cost(0, 0.0)
    for r in runs:
        out = out + run_cost(r)
    return out
