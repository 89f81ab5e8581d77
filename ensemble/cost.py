"""What a run costs to serve: forward passes per image and, when measured, milliseconds per image.

A level-1 run predicts an image with each of its K fold models on each of its V TTA views: K x V
passes. Training records ``passes_per_image`` (and ``ms_per_image``, measured at its prediction
batch size and thread count) in ``meta.json``; a run written before that has its passes computed
from its config by the rule of ``recipe``'s ``tta_views`` (``tta_view_count``; the two are
checked against each other in tests/test_stack_cost.py) and no milliseconds (shown blank, never 0).
A stack costs the sum of the runs it serves (the stacker itself is negligible).

A run can be served another way than as trained (``Variant``): by its ``--refit-full`` model
(one model: V passes, recorded in ``meta['refit']``) and/or by a subset of its TTA views (passes
and milliseconds scale with the views kept: every view is one pass of each model).
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
    return Cost(None if k is None else k * view_count(meta), ms)


@dataclass(frozen=True)
class Variant:
    """How a run is served: ``models`` 'folds' (its K fold models, as trained) or 'refit' (its
    one ``--refit-full`` model), on ``views`` (TTA view names kept; None: all of them)."""

    models: str = "folds"
    views: tuple[str, ...] | None = None

    @property
    def label(self) -> str:
        """'folds', 'refit', 'folds:identity', 'refit:hflip'... (shown after the run name)."""
        return self.models + ("" if self.views is None else ":" + "+".join(self.views))

    def to_dict(self) -> dict[str, Any]:
        return {"models": self.models, "views": None if self.views is None else list(self.views)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Variant:
        """A recorded variant (stacker.json, manifest); None (older records): the fold models."""
        if not d:
            return cls()
        if d.get("models", "folds") not in ("folds", "refit"):
            raise ValueError(f"variant models {d.get('models')!r}: 'folds' or 'refit'")
        views = d.get("views")
        return cls(str(d.get("models", "folds")), None if views is None else tuple(views))


def view_count(meta: dict[str, Any]) -> int:
    """The TTA views a run averages (its config's, by ``tta_view_count``)."""
    cfg = meta.get("config") or {}
    return tta_view_count(cfg.get("tta", "none"), cfg.get("tta_scales"), cfg.get("tta_augment", 0))


def variant_cost(meta: dict[str, Any], variant: Variant, n_folds: int | None = None) -> Cost:
    """The cost of serving a run (its ``meta.json``) as ``variant``: the refit's recorded cost
    for 'refit' (unknown without a finished refit), scaled by the share of views kept."""
    if variant.models == "refit":
        refit = meta.get("refit") or {}
        ms = refit.get("ms_per_image")
        base = Cost(None if refit.get("passes_per_image") is None
                    else int(refit["passes_per_image"]), None if ms is None else float(ms))
    else:
        base = meta_cost(meta, n_folds)
    if variant.views is None:
        return base
    share = len(variant.views) / view_count(meta)
    return Cost(None if base.passes is None else round(base.passes * share),
                None if base.ms_per_image is None else base.ms_per_image * share)


def run_cost(run: Run) -> Cost:
    """A loaded run's cost (its K is the number of folds in its OOF if meta lacks it), as it
    is served (a run loaded as a variant, ``ensemble.variants``, costs its variant's)."""
    return variant_cost(run.meta, getattr(run, "variant", Variant()), len(np.unique(run.folds)))


def total_cost(runs: list[Run]) -> Cost:
    """The cost of serving ``runs`` together."""
    out = Cost(0, 0.0)
    for r in runs:
        out = out + run_cost(r)
    return out
