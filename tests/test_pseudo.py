"""Pseudo-label sources: fold k's pseudo-labels never come from a model that saw fold k.

The planted leak: training labels are random (nothing to learn), and every test image is a copy of
a training image. Each fold model memorises its training rows, so a copy of a row it trained on is
predicted with that row's label. A student that learns the pseudo-labelled copies (it memorises
too) then scores its held-out rows by their copies' pseudo-labels. With the submission's
probabilities as the source (every fold model) the student's OOF accuracy on random labels is near
1: a pure leak. With the per-fold source it stays at chance, as it must.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ensemble.pseudo import fold_test_proba, write_stack_pseudo_source
from ensemble.stackers import LogRegStacker, MeanBlend
from oof.errors import ConfigError, DataError
from oof.folds import make_folds
from oof.pseudo import PSEUDO_FILE, check_source, load_pseudo_source
from oof.rundir import write_run

K, N, C = 4, 240, 4
CLASSES = ["a", "b", "c", "d"]


def memorising_runs(tmp_path: Path, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    ids = [f"r{i:03d}" for i in range(N)]
    labels = [CLASSES[i] for i in rng.integers(0, C, N)]  # random: no signal to learn
    folds = make_folds(ids, labels, K, seed)
    y = np.array([CLASSES.index(lab) for lab in labels])
    test_ids = np.array([f"copy_{i}" for i in ids], dtype=object)  # test row i copies train row i
    runs = []
    for r in range(2):
        oof = rng.dirichlet(np.ones(C), N)  # held-out rows: an honest model can only guess
        per_fold = np.empty((K, N, C))
        for j in range(K):
            per_fold[j] = rng.dirichlet(np.ones(C), N)
            seen = folds.fold != j  # fold-j model trained on these rows and memorised them
            per_fold[j, seen] = 0.1 / (C - 1)
            per_fold[j, np.flatnonzero(seen), y[seen]] = 0.9
        runs.append(write_run(tmp_path / f"run{r}", f"run{r}", CLASSES, folds, oof, test_ids,
                              per_fold, {"level": 1}))
    return runs


def student_oof_accuracy(runs: list, proba_for_fold, threshold: float = 0.6) -> float:
    """A memorising student: a held-out row gets its copy's pseudo-label, else a guess."""
    rng = np.random.default_rng(1)
    folds, y = runs[0].folds, runs[0].y
    hits = []
    for k in range(K):
        p = proba_for_fold(k)
        picked = p.max(axis=1) >= threshold
        for row in np.flatnonzero(folds == k):
            guess = p[row].argmax() if picked[row] else rng.integers(0, C)
            hits.append(guess == y[row])
    return float(np.mean(hits))


def test_naive_source_leaks_and_per_fold_source_does_not(tmp_path: Path) -> None:
    runs = memorising_runs(tmp_path)
    stack_dir = tmp_path / "stack-mean"
    write_stack_pseudo_source(stack_dir, runs, "mean", fold_test_proba(runs, MeanBlend()))
    source = load_pseudo_source(stack_dir)
    order = check_source(source, CLASSES, runs[0].fingerprint, runs[0].test_ids)
    assert (order == np.arange(N)).all()

    naive = MeanBlend().fit(np.hstack([r.oof for r in runs]), runs[0].y).predict_proba(
        np.hstack([r.test for r in runs]))  # what the submission holds: every fold model
    leaky = student_oof_accuracy(runs, lambda k: naive)
    honest = student_oof_accuracy(runs, lambda k: source.proba[k])
    assert leaky > 0.9, f"the planted leak must show with the naive source ({leaky:.3f})"
    assert honest < 1 / C + 0.12, f"per-fold pseudo-labels must not leak ({honest:.3f})"
    info = source.describe(0.6)
    assert info["source_runs"] == ["run0", "run1"] and len(info["per_fold"]) == K


def test_fold_stacker_is_fitted_without_the_fold(tmp_path: Path) -> None:
    """A stacker that learns (logreg) still gives fold k's rows from fold-k inputs only."""
    runs = memorising_runs(tmp_path, seed=3)
    proba = fold_test_proba(runs, LogRegStacker(random_state=0))
    assert proba.shape == (K, N, C)
    np.testing.assert_allclose(proba.sum(axis=2), 1.0, atol=1e-9)
    assert student_oof_accuracy(runs, lambda k: proba[k], threshold=0.0) < 1 / C + 0.12


def test_source_mismatches_and_damage_are_named(tmp_path: Path) -> None:
    runs = memorising_runs(tmp_path)
    with pytest.raises(ConfigError, match="no pseudo_by_fold.parquet"):
        load_pseudo_source(tmp_path)
    path = write_stack_pseudo_source(tmp_path / "s", runs, "mean",
                                     fold_test_proba(runs, MeanBlend()))
    source = load_pseudo_source(tmp_path / "s")
    with pytest.raises(ConfigError, match="made on folds"):
        check_source(source, CLASSES, "0000", runs[0].test_ids)
    with pytest.raises(ConfigError, match="class order"):
        check_source(source, CLASSES[::-1], runs[0].fingerprint, runs[0].test_ids)
    with pytest.raises(ConfigError, match="test ids differ"):
        check_source(source, CLASSES, runs[0].fingerprint, runs[0].test_ids[:-1])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match=PSEUDO_FILE):
        load_pseudo_source(tmp_path / "s")
