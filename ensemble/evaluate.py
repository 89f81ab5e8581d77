"""Honest level-2 scores: cross-validation over the STORED folds of the level-1 runs.

The stacker that predicts fold k is fitted on the level-1 OOF rows of the other folds only, so no
row is ever scored by a stacker that saw its label (the ``cv="prefit"`` trap of
``sklearn/ensemble/_stacking.py``). Using the stored folds, not fresh ones, matters too: a row's
level-1 OOF prediction came from models that did not see that row, and the same partition keeps
each level-2 fold model away from the labels of its held-out fold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import clone

from oof.errors import RunMismatchError
from oof.metrics import scores
from oof.rundir import Run


def level1_matrix(runs: list[Run]) -> tuple[np.ndarray, np.ndarray]:
    """Runs side by side: OOF (n, R*C) and fold-mean test (n_test, R*C), in run order."""
    return np.hstack([r.oof for r in runs]), np.hstack([r.test for r in runs])


def full_proba(est: Any, X: np.ndarray, n_classes: int) -> np.ndarray:
    """``predict_proba`` laid out over all ``n_classes`` (a class unseen in fit gets 0)."""
    p = est.predict_proba(X)
    if p.shape[1] == n_classes:
        return p
    out = np.zeros((len(X), n_classes))
    out[:, np.asarray(est.classes_, dtype=np.int64)] = p
    return out


def describe(est: Any, run_names: list[str]) -> dict[str, Any]:
    """What a fitted stacker learned, in words a report can show."""
    info: dict[str, Any] = {}
    if hasattr(est, "weights_"):
        info["weights"] = {n: round(float(w), 4) for n, w in zip(run_names, est.weights_)}
    for attr, key in (("best_size_", "ensemble_size"), ("C_", "C"),
                      ("best_iteration_", "boosting_rounds"), ("n_iter_", "lbfgs_iterations")):
        if hasattr(est, attr):
            info[key] = float(getattr(est, attr)) if attr == "C_" else int(getattr(est, attr))
    return info


@dataclass
class Level2:
    """One stacker's honest level-2 OOF and the fold stackers' test predictions."""

    method: str
    oof: np.ndarray  # (n, C), row i predicted by the stacker not fitted on fold(i)
    test_per_fold: np.ndarray  # (K, n_test, C): fold stacker k applied to the fold-mean test
    scores: dict[str, float]
    seconds: float
    folds: list[dict[str, Any]] = field(default_factory=list)
    # (K, n_test, C): fold stacker k applied to the inputs' fold-k test rows, so only models
    # that never saw fold k made row k (the pseudo-label source); None without those rows
    fold_k_test: np.ndarray | None = None


def cross_val_level2(
    method: str, stacker: Any, X: np.ndarray, y: np.ndarray, folds: np.ndarray, n_classes: int,
    X_test: np.ndarray | None = None, run_names: list[str] | None = None,
    X_test_folds: np.ndarray | None = None,
) -> Level2:
    """Level-2 OOF by CV over the stored fold column ``folds`` (values 0..K-1).

    ``X_test_folds`` (K, n_test, features): the inputs' fold-k-only test rows
    (``Run.fold_k_only``); fold stacker k predicts its row k into ``Level2.fold_k_test``.
    """
    ks = np.unique(folds)
    if len(ks) < 2:
        raise RunMismatchError(f"level-2 CV needs at least 2 folds; the runs have {len(ks)}")
    # A fold stacker fitted without a class would read the runs' C-column blocks as blocks of
    # fewer classes: refuse (grouped folds made before make_folds refused this could do it).
    per_fold = np.bincount(folds.astype(np.int64) * n_classes + np.asarray(y, dtype=np.int64),
                           minlength=(int(ks.max()) + 1) * n_classes).reshape(-1, n_classes)
    total = per_fold.sum(axis=0)
    unseen = {int(k): np.flatnonzero((total > 0) & (total == per_fold[k])).tolist() for k in ks}
    unseen = {k: c for k, c in unseen.items() if c}
    if unseen:
        raise RunMismatchError(
            "level-2 CV: every row of class index(es) " + "; ".join(
                f"{c} is in fold {k}" for k, c in unseen.items())
            + ", so the stacker scoring that fold would never see the class; the stored folds "
            "put a class in one fold: make new folds (a new --out)")
    oof = np.full((len(y), n_classes), np.nan)
    n_test = 0 if X_test is None else len(X_test)
    test_pf = np.full((int(ks.max()) + 1, n_test, n_classes), np.nan)
    fold_k = None if X_test_folds is None else np.full(
        (int(ks.max()) + 1, X_test_folds.shape[1], n_classes), np.nan)
    info = []
    start = time.perf_counter()
    # Each fold's rows are gathered in file order (ascending indices) into two buffers reused
    # across folds: np.take with mode="clip" copies straight into them (mode="raise" buffers
    # internally), where a permuted copy of X cost 622 MB more at 1.5M rows and random-order
    # reads, and fresh temporaries per fold paid the kernel's first touch of every page again.
    sizes = np.bincount(folds.astype(np.int64))[ks]
    fit_buffer = np.empty((len(y) - int(sizes.min()), X.shape[1]), dtype=X.dtype)
    held_buffer = np.empty((int(sizes.max()), X.shape[1]), dtype=X.dtype)
    for k in ks:
        held = np.flatnonzero(folds == k)
        fit = np.flatnonzero(folds != k)
        t0 = time.perf_counter()
        X_fit = np.take(X, fit, axis=0, out=fit_buffer[: len(fit)], mode="clip")
        est = clone(stacker).fit(X_fit, y[fit])
        X_held = np.take(X, held, axis=0, out=held_buffer[: len(held)], mode="clip")
        oof[held] = full_proba(est, X_held, n_classes)
        if X_test is not None:
            test_pf[k] = full_proba(est, X_test, n_classes)
        if fold_k is not None:
            fold_k[k] = full_proba(est, X_test_folds[k], n_classes)
        info.append({"fold": int(k), "rows_fitted": len(fit), "rows_scored": len(held),
                     "seconds": round(time.perf_counter() - t0, 3),
                     **describe(est, run_names or [])})
    return Level2(method, oof, test_pf, scores(y, oof), time.perf_counter() - start, info,
                  fold_k)
