"""``run_folds.py --distill-from STACK_DIR``: training targets from a stack's OOF (issue 30 item 4).

A distilled student learns the ensemble's probabilities instead of (or mixed with) the hard
labels (Hinton et al. 2015; AutoGluon's ``distill``). The target of training row i is the
teacher's OUT-OF-FOLD row i, softened by a temperature T (p^(1/T), renormalised) and mixed with
the one-hot label by alpha, the one-hot part smoothed by the run's ``--label-smoothing`` eps::

    target_i = alpha * smooth(onehot(y_i)) + (1 - alpha) * normalise(oof_i ** (1 / T))
    smooth(e) = (1 - eps) * e + eps / C

Label smoothing regularises one-hot labels only: the teacher's probabilities are soft already,
and smoothing them again (as the loss smooths every target it is given) taught the student
targets flatter than the teacher's. A student's fold jobs therefore train with the loss's own
smoothing off (``backbones.base.FoldJob``): the targets carry it.

The teacher's OOF row i was made by models that never trained on row i (level 1: the fold model
that held row i out; level 2: the fold stacker fitted without row i's fold, on such rows), so a
row's target never comes from a model that trained on that row. That holds only on the same
folds: a teacher whose fold fingerprint, ids, fold column, labels or class order differ from
the run root's is refused. The student's own OOF score is still optimistic (its fold-k model
learnt from targets made by models that saw fold k's rows), so its meta.json marks it a student
and a held-out score is the one to trust where there is one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oof.errors import ConfigError, DataError, RunMismatchError
from oof.folds import Folds
from oof.rundir import Run, load_run

STUDENT_NOTE = ("distilled student: its training targets came from the teacher's OOF, made by "
                "models that saw this run's held-out rows, so its OOF score is optimistic; trust "
                "a held-out score")
# Every table marks a student's row by this suffix on its name, with STUDENT_FOOTNOTE under it.
STUDENT_MARK = " [student]"
STUDENT_FOOTNOTE = (f"{STUDENT_MARK.strip()}: a distilled student (run_folds.py --distill-from): "
                    "its OOF score is optimistic (its training targets came from models that saw "
                    "its held-out rows); its held-out score is the one to trust")


def is_student(meta: dict[str, Any]) -> bool:
    """Whether a run's meta.json says it is a distilled student."""
    return bool(meta.get("student"))


def marked(name: str, meta: dict[str, Any]) -> str:
    """``name`` as a table shows it: with STUDENT_MARK for a student."""
    return name + STUDENT_MARK if is_student(meta) else name


def student_entry(meta: dict[str, Any]) -> dict[str, Any]:
    """What a bundle manifest and ``/health`` add to a student run's entry ({} for others)."""
    if not is_student(meta):
        return {}
    teacher = meta.get("teacher") or {}
    return {"student": True, "teacher": teacher.get("run"),
            "student_note": teacher.get("note", STUDENT_NOTE)}


def teacher_runs(meta: dict[str, Any]) -> list[str]:
    """The runs whose predictions made a student's targets: its teacher and the runs the teacher
    stacked ([] for a run that is no student). A student recorded before ``stacked_runs`` was
    kept reads them from the teacher's meta.json where it still is."""
    teacher = meta.get("teacher") or {}
    if not is_student(meta) or not teacher:
        return []
    stacked = teacher.get("stacked_runs")
    if stacked is None:
        path = Path(str(teacher.get("path", ""))) / "meta.json"
        stacked = (json.loads(path.read_text()).get("stacked_runs", []) if path.is_file()
                   else [])
    return list(dict.fromkeys([str(teacher.get("run", "")), *stacked]))


@dataclass
class Teacher:
    """A stack (or run) folder whose OOF rows are a student's targets."""

    path: Path
    run: Run

    def describe(self, alpha: float, temperature: float) -> dict[str, Any]:
        """meta.json's ``teacher``: where the targets came from, to trace and to check."""
        return {"path": str(self.path.resolve()), "run": self.run.name,
                "level": int(self.run.meta.get("level", 1)),
                "method": self.run.meta.get("method"), "fold_fingerprint": self.run.fingerprint,
                "stacked_runs": list(self.run.meta.get("stacked_runs", [])),
                "oof_metrics": self.run.meta.get("oof_metrics"), "alpha": alpha,
                "temperature": temperature, "note": STUDENT_NOTE}


def load_teacher(stack_dir: str | Path, folds: Folds, classes: list[str]) -> Teacher:
    """The teacher at ``stack_dir``, refused unless made on exactly ``folds`` and ``classes``."""
    where = f"--distill-from {stack_dir}"
    try:
        run = load_run(stack_dir)
    except (RunMismatchError, DataError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if run.fingerprint != folds.fingerprint:
        raise ConfigError(f"{where}: made on folds {run.fingerprint}, but this run root's folds "
                          f"are {folds.fingerprint}; a student's targets must be OOF over the "
                          "same folds (else a target may come from a model that trained on its "
                          "row)")
    if run.classes != list(classes):
        raise ConfigError(f"{where}: class order {run.classes} != the dataset's {classes}")
    ids = folds.ids.astype(str)
    if len(run.ids) != len(ids) or (run.ids.astype(str) != ids).any():
        raise ConfigError(f"{where}: its training ids differ from the run root's folds.csv")
    moved = np.flatnonzero(run.folds != folds.fold)
    if len(moved):
        n = int(moved[0])
        raise ConfigError(f"{where}: row {n} (id {ids[n]!r}) is in fold {run.folds[n]} there, "
                          f"fold {folds.fold[n]} in folds.csv")
    relabel = np.flatnonzero(run.labels.astype(str) != folds.labels.astype(str))
    if len(relabel):
        n = int(relabel[0])
        raise ConfigError(f"{where}: row {n} (id {ids[n]!r}) is labelled {run.labels[n]!r} "
                          f"there, {folds.labels[n]!r} in folds.csv")
    bad = np.flatnonzero(~np.isfinite(run.oof).all(axis=1))
    if len(bad):
        raise ConfigError(f"{where}: {len(bad)} OOF rows have no prediction (e.g. id "
                          f"{ids[int(bad[0])]!r}); every training row needs a target")
    return Teacher(Path(stack_dir), run)


def soften(proba: np.ndarray, temperature: float) -> np.ndarray:
    """p^(1/T), each row renormalised (T = 1: unchanged up to rounding; T > 1: softer)."""
    p = np.clip(np.asarray(proba, dtype=np.float64), 1e-12, 1.0) ** (1.0 / temperature)
    return p / p.sum(axis=1, keepdims=True)


def mix_targets(proba: np.ndarray, y: np.ndarray, alpha: float, temperature: float,
                label_smoothing: float = 0.0) -> np.ndarray:
    """``alpha`` x smoothed one-hot(y) + (1 - alpha) x soften(proba, T): rows sum to 1."""
    n_classes = proba.shape[1]
    onehot = np.eye(n_classes, dtype=np.float32)[np.asarray(y, dtype=np.int64)]
    # in float32, as the losses smooth (torch and Keras alike): alpha 1 trains bit for bit as a
    # run on hard labels does
    hard = onehot * np.float32(1.0 - label_smoothing) + np.float32(label_smoothing / n_classes)
    return alpha * hard.astype(np.float64) + (1.0 - alpha) * soften(proba, temperature)


def distill_targets(teacher: Teacher, y: np.ndarray, alpha: float, temperature: float,
                    label_smoothing: float = 0.0) -> np.ndarray:
    """(N, C) float64 targets of the folds.csv rows (their order): the teacher's OOF row of the
    same id and fold, softened and mixed with label ``y`` (smoothed by ``label_smoothing``)."""
    return mix_targets(teacher.run.oof, y, alpha, temperature, label_smoothing)
