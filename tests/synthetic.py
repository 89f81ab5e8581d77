"""Synthetic runs written through the real contract (``write_run``) for stacking/analysis tests.

Each run's OOF is built so its quality is known: ``skill`` in 0..1 is how much probability mass
sits on the true class on average, with seeded noise; a run with skill 0 is pure noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from oof.folds import Folds, make_folds, write_folds
from oof.rundir import Run, write_run


def synthetic_folds(root: Path, n: int = 300, k: int = 3, n_classes: int = 4,
                    seed: int = 0) -> Folds:
    """Ids, balanced labels and stored folds under ``root`` (like a real run root)."""
    rng = np.random.default_rng(seed)
    labels = [f"class{c}" for c in rng.permutation(np.arange(n) % n_classes)]
    folds = make_folds([f"img_{i:05d}.png" for i in range(n)], labels, k, seed)
    write_folds(root, folds)
    return folds


def synthetic_proba(y: np.ndarray, n_classes: int, skill: float, rng: np.random.Generator,
                    temperature: float = 1.0) -> np.ndarray:
    """Rows summing to 1 whose true-class logit is raised by ``skill``-scaled signal."""
    logits = rng.normal(size=(len(y), n_classes))
    logits[np.arange(len(y)), y] += 4.0 * skill
    z = logits / temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def synthetic_run(root: Path, name: str, folds: Folds, skill: float, seed: int,
                  n_test: int = 50, temperature: float = 1.0,
                  meta_extra: dict | None = None) -> Run:
    """Write a complete level-1 run named ``name`` under ``root``; return it loaded."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(folds.labels.astype(str)))
    y = np.array([classes.index(lab) for lab in folds.labels.astype(str)])
    oof = synthetic_proba(y, len(classes), skill, rng, temperature)
    y_test = rng.integers(0, len(classes), n_test)
    per_fold = np.stack([synthetic_proba(y_test, len(classes), skill, rng, temperature)
                         for _ in range(folds.k)])
    meta = {"level": 1, "backbone": {"name": f"synthetic/{name}"}, "config": {},
            "y_test_truth": y_test.tolist(), **(meta_extra or {})}
    return write_run(root / name, name, classes, folds, oof,
                     np.array([f"test_{i:04d}.png" for i in range(n_test)], dtype=object),
                     per_fold, meta)
