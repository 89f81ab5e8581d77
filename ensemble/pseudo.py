"""Leak-free pseudo-label sources: for fold k, only models that never saw fold k's labels.

Fold k's pseudo-labels are the chosen stacker, fitted on the OOF rows of the other folds, applied
to each run's fold-k test predictions (the fold-k models trained without fold k). The submission's
own test probabilities (every fold model, a stacker fitted on all rows) would leak fold k's labels
back into fold k's training side; ``oof.pseudo`` explains why and stores the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import clone

from ensemble.evaluate import full_proba, level1_matrix
from oof.pseudo import write_pseudo_source
from oof.rundir import Run


def fold_test_proba(runs: list[Run], stacker: Any) -> np.ndarray:
    """(K, n_test, C): fold k's test probabilities from fold-k models and a fold-k stacker."""
    X, _ = level1_matrix(runs)
    y, folds, n_classes = runs[0].y, runs[0].folds, len(runs[0].classes)
    per_run = [r.test_per_fold() for r in runs]
    k_count = per_run[0].shape[0]
    out = np.empty((k_count, len(runs[0].test_ids), n_classes))
    for k in range(k_count):
        fit = folds != k
        est = clone(stacker).fit(X[fit], y[fit])
        out[k] = full_proba(est, np.hstack([p[k] for p in per_run]), n_classes)
    return out


def write_stack_pseudo_source(stack_dir: Path, runs: list[Run], stacker: Any,
                              method: str) -> Path:
    """Compute and store the stack folder's pseudo-label source (``oof.pseudo.PSEUDO_FILE``)."""
    ref = runs[0]
    return write_pseudo_source(stack_dir, method, [r.name for r in runs], ref.classes,
                               ref.fingerprint, ref.test_ids, fold_test_proba(runs, stacker))
