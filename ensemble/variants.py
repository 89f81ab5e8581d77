"""A run served another way than as trained: by its refit model and/or on some of its TTA views.

A stack under a budget (issue 30 item 3) may serve a run by its ``--refit-full`` model (one
model, V passes per image instead of K x V) or on a subset of its TTA views (stored alone by
``--tta-save-views``). Each such variant is loaded as a ``VariantRun``: a ``Run`` whose OOF,
test and per-fold test rows are the ones that variant gives, so level 2 (CV, fit, submission,
pseudo-label source) treats it like any run.

- 'refit': the refit model has NO OOF of its own. Its OOF here is the run's (each OOF row is
  exactly one fold model's prediction, so it estimates what one model trained like them does);
  its test rows are the refit's; its per-fold test rows stay the fold models' (fold k's rows
  from models that never saw fold k: the leak-free pseudo-label source).
- views: OOF and test rows are the mean of the kept views' stored rows. Valid only where the run
  averages probabilities over views (a family that averages features, the probe, is offered
  single views only: the mean of its views' rows is not what it predicts).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ensemble.cost import Variant
from oof.errors import RunMismatchError
from oof.rundir import REFIT_DIR, REFIT_MARKER, Run, load_run

FOLDS = Variant()
REFIT_NOTE = ("refit model: no OOF of its own; the OOF shown is its run's K fold models' "
              "(each OOF row is one fold model's prediction), its ECE too: a refit model is "
              "more confident than one fold model, so it can serve overconfident "
              "(docs/stacking.md)")


@dataclass
class VariantRun(Run):
    """A run as ``variant`` serves it (see the module docstring)."""

    variant: Variant = field(default_factory=Variant)
    fold_test: np.ndarray | None = None  # (K, n_test, C); None: the run's own

    def test_per_fold(self) -> np.ndarray:
        return super().test_per_fold() if self.fold_test is None else self.fold_test


def has_refit(run: Run) -> bool:
    """Whether the run holds a finished ``--refit-full`` model."""
    return bool(run.meta.get("refit")) and (run.path / REFIT_DIR / REFIT_MARKER).exists()


def _view_index(names: list[str], views: tuple[str, ...], where: str) -> list[int]:
    unknown = [v for v in views if v not in names]
    if unknown or not views:
        raise RunMismatchError(f"{where}: no TTA view(s) {unknown or '(none kept)'}; the run "
                               f"stored {names}")
    return [names.index(v) for v in views]


def variant_run(run: Run, variant: Variant) -> Run:
    """``run`` as ``variant`` serves it; the run itself for its fold models on all views."""
    if variant == FOLDS:
        return run
    where = f"run {run.name!r} ({run.path}) served as {variant.label}"
    oof, test, per_fold = run.oof, run.test, None
    if variant.views is not None:
        got, got_test = run.views_oof(), run.views_test_per_fold()
        if got is None or got_test is None:
            raise RunMismatchError(f"{where}: no per-view rows (views_oof.parquet); train it "
                                   "with --tta-save-views")
        idx = _view_index(got[0], variant.views, where)
        oof = got[1][idx].mean(axis=0)
        per_fold = got_test[1][idx].mean(axis=0)
        test = per_fold.mean(axis=0)
    if variant.models == "refit":
        if not has_refit(run):
            raise RunMismatchError(f"{where}: no finished refit model; train it with "
                                   "run_folds.py --refit-full")
        if variant.views is None:
            refit = run.refit_test()
        else:
            got_refit = run.refit_views_test()
            if got_refit is None:
                raise RunMismatchError(f"{where}: its refit has no per-view test rows "
                                       "(refit/views_test.parquet); rerun with --tta-save-views")
            refit = got_refit[1][_view_index(got_refit[0], variant.views, where)].mean(axis=0)
        assert refit is not None  # has_refit
        test = refit
    return VariantRun(run.path, run.name, run.classes, run.ids, run.labels, run.y, run.folds,
                      oof, run.test_ids, test, run.fingerprint, run.meta, variant, per_fold)


def run_variants(run: Run) -> list[Variant]:
    """The ways ``run`` can be served: its fold models, its refit model when it has one, and
    either on each subset of its stored TTA views (single views only where the views' mean
    is not the run's OOF)."""
    out = [FOLDS]
    refit = has_refit(run)
    if refit:
        out.append(Variant("refit"))
    got = run.views_oof() if int(run.meta.get("level", 1)) == 1 else None
    if got is None or len(got[0]) < 2:
        return out
    names, views = got
    mean_of_views = np.allclose(views.mean(axis=0), run.oof, rtol=0, atol=1e-6, equal_nan=True)
    sizes = range(1, len(names)) if mean_of_views else [1]
    refit_views = refit and run.refit_views_test() is not None
    for size in sizes:
        for kept in itertools.combinations(names, size):
            out.append(Variant("folds", kept))
            if refit_views:
                out.append(Variant("refit", kept))
    return out


def load_variant_run(record: dict[str, Any]) -> Run:
    """A stack's input as its ``stacker.json`` names it (path, variant: absent = fold models)."""
    return variant_run(load_run(Path(record["path"])), Variant.from_dict(record.get("variant")))
