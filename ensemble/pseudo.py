"""Leak-free pseudo-label sources: for fold k, only models that never saw fold k's labels.

Fold k's pseudo-labels are the chosen stacker, fitted on the OOF rows of the other folds, applied
to each input run's fold-k test predictions: a level-1 run's fold-k model (trained without fold
k), or a stack's own fold-k row, made the same way one level down (``Run.fold_k_only``). So at any
level, fold k's row comes only from level-1 fold-k models and stackers fitted without fold k. The
submission's own test probabilities (every fold model, a stacker fitted on all rows) would leak
fold k's labels back into fold k's training side; ``oof.pseudo`` explains why and stores the
result. A stack written before stacks kept such rows (issue 28) holds fold stacker k applied to
the fold-mean test instead, which includes models trained on fold k: no source is made from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ensemble.evaluate import cross_val_level2, level1_matrix
from oof.errors import RunMismatchError
from oof.pseudo import write_pseudo_source
from oof.rundir import Run


def stale_stacks(runs: list[Run]) -> str | None:
    """Why these runs' fold-k test rows cannot make a leak-free source, or None if they can."""
    stale = [r for r in runs if not r.fold_k_only()]
    if not stale:
        return None
    return "\n  ".join(
        f"{r.name} ({r.path}): a level-{r.meta.get('level')} stack written by an older stack.py: "
        "row k of its test_folds.parquet is fold stacker k applied to the fold-mean test, made "
        "with models trained on fold k, so pseudo-labels from it would leak fold k's labels into "
        "fold k; rerun the stack.py command that wrote it (its config.yaml) to rewrite it"
        for r in stale)


def fold_k_test_matrix(runs: list[Run]) -> np.ndarray:
    """(K, n_test, R*C): the runs' fold-k-only test rows side by side, in run order."""
    why = stale_stacks(runs)
    if why:
        raise RunMismatchError("no leak-free pseudo-labels from these runs:\n  " + why)
    return np.concatenate([r.test_per_fold() for r in runs], axis=2)


def fold_test_proba(runs: list[Run], stacker: Any) -> np.ndarray:
    """(K, n_test, C): fold k's test probabilities from fold-k models and a fold-k stacker."""
    X, _ = level1_matrix(runs)
    ref = runs[0]
    level2 = cross_val_level2("pseudo", stacker, X, ref.y, ref.folds, len(ref.classes),
                              X_test_folds=fold_k_test_matrix(runs))
    assert level2.fold_k_test is not None  # given X_test_folds, cross_val_level2 fills it
    return level2.fold_k_test


def source_runs(runs: list[Run]) -> list[str]:
    """Every run whose predictions went into a stack: its inputs, then the runs they stacked."""
    names = [n for r in runs for n in (r.name, *r.meta.get("stacked_runs", []))]
    return list(dict.fromkeys(names))


def write_stack_pseudo_source(stack_dir: Path, runs: list[Run], method: str, proba: np.ndarray,
                              level: int = 2) -> Path:
    """Store a stack folder's pseudo-label source (``oof.pseudo.PSEUDO_FILE``): ``proba`` is
    ``fold_test_proba`` of its runs (``Level2.fold_k_test`` of the chosen method)."""
    ref = runs[0]
    return write_pseudo_source(stack_dir, method, source_runs(runs), ref.classes,
                               ref.fingerprint, ref.test_ids, proba, level)
