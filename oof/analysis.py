"""Offline analysis of OOF files: which runs are strong, which are diverse, where they fail.

Everything here is computed from the run folders alone (no retraining, no framework import) and
returned as plain data: numpy arrays, DataFrames and dicts, so a notebook can use any piece and
``oof.report`` can render all of it. Nothing here prints, plots or exits.

Conventions, written once so every number can be checked by hand:

- a run's prediction is the arg-max of its OOF row (ties go to the first class, as numpy does);
- confusion matrices have true classes as rows and predicted classes as columns;
- precision of a class that is never predicted is NaN (undefined), not 0;
- calibration uses the top-label confidence (max probability of a row) in ``n_bins`` equal-width
  bins over [0, 1] (default 15, as Guo et al., ICML 2017): bin ``b`` holds confidences in
  ``(b/n, (b+1)/n]``, bin 0 also holds 0. ECE = sum over bins of (rows in bin / all rows) *
  |accuracy in bin - mean confidence in bin|;
- the "ensemble" is the plain mean of the OOF probabilities of the level-1 runs (of all runs
  when none is level 1: a stacker is already a blend of them); the hardest images are the rows
  it gets wrong, most confident first. The oracle covers every run analysed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oof.distill import is_student, marked
from oof.errors import DataError, FoldstackError, RunMismatchError
from oof.folds import load_folds
from oof.metrics import accuracy, calibration, log_loss
from oof.rundir import Run, check_compatible, find_runs, load_run

log = logging.getLogger(__name__)

DEFAULT_BINS = 15
DEFAULT_HARDEST = 24


# ---------------------------------------------------------------- loading


def load_runs(run_root: str | Path, names: list[str] | None = None) -> list[Run]:
    """Load the complete runs under ``run_root`` (or the named ones) and refuse a mismatched set.

    ``names`` match a run's folder name or its recorded run name. The refusal is
    ``check_compatible``'s, so the messages are the same ones ``stack.py`` gives.
    """
    root = Path(run_root)
    if not root.is_dir():
        raise RunMismatchError(f"{root}: no such run root")
    if names:
        paths = []
        for name in names:
            p = Path(name)
            p = p if p.is_absolute() or (p / "meta.json").exists() else root / name
            if not (p / "meta.json").exists():
                known = [q.name for q in find_runs(root, complete_only=False)]
                raise RunMismatchError(f"--runs {name}: no run folder {p}; runs here: {known}")
            paths.append(p)
    else:
        paths = find_runs(root)
        if not paths:
            raise RunMismatchError(f"{root}: no complete runs (folders with a complete meta.json)")
    stored = load_folds(root)
    runs = [load_run(p, stored) for p in paths]
    check_compatible(runs)
    return runs


def load_history(run: Run) -> pd.DataFrame | None:
    """The run's per-epoch history, cleaned, or None (level-2 runs usually have none).

    A history can be partial or damaged (two processes appending to one fold repeated the
    header mid-file and cut a line; a killed run has fewer epochs): rows whose epoch is not a
    number are dropped, metric columns are made numeric (garbage -> NaN, a gap in the curve),
    and a repeated (fold, epoch) keeps its last row. The analysis never fails on it.
    """
    path = run.path / "history.csv"
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        hist = pd.read_csv(path, on_bad_lines="skip", dtype=str)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, OSError, UnicodeDecodeError) as exc:
        log.warning("%s: history not readable (%s); learning curves skipped", path, exc)
        return None
    if "epoch" not in hist.columns or not len(hist):
        return None
    n = len(hist)
    hist = hist.apply(pd.to_numeric, errors="coerce")
    hist = hist.dropna(subset=["epoch"])
    hist = hist[hist["epoch"] == hist["epoch"].round()]
    hist = hist.dropna(axis=1, how="all")
    keys = [c for c in ("fold", "epoch") if c in hist.columns]
    hist = hist.drop_duplicates(subset=keys, keep="last").sort_values(keys, kind="stable")
    hist["epoch"] = hist["epoch"].astype(np.int64)
    if "fold" in hist.columns:
        hist = hist.dropna(subset=["fold"]).astype({"fold": np.int64})
    if len(hist) < n:
        log.warning("%s: %d of %d history rows were damaged or repeated and are left out",
                    path, n - len(hist), n)
    return hist.reset_index(drop=True) if len(hist) else None


def image_paths(runs: list[Run], ids: list[str]) -> dict[str, str]:
    """Image file of each of ``ids``, found by reloading the dataset a run was trained on.

    Tries each run's ``meta['data']`` (root and layout), then its config's ``data``/``layout``/
    ``test``; level-2 runs usually carry neither and are skipped. Returns ``{}`` when no dataset
    can be found (the report then shows the table without thumbnails).
    """
    from oof.datasets import load_dataset

    tried: list[tuple[str, str, str | None]] = []
    for run in runs:
        data, cfg = run.meta.get("data") or {}, run.meta.get("config") or {}
        if data.get("root"):
            tried.append((str(data["root"]), str(data.get("layout", "auto")), cfg.get("test")))
        if cfg.get("data"):
            tried.append((str(cfg["data"]), str(cfg.get("layout", "auto")), cfg.get("test")))
    seen = set()
    for root, layout, test in tried:
        if (root, layout) in seen:
            continue
        seen.add((root, layout))
        try:
            ds = load_dataset(root, layout, test)
        except FoldstackError as exc:
            log.warning("dataset %s (%s) not loadable for thumbnails: %s", root, layout,
                        str(exc).splitlines()[0])
            continue
        table = dict(zip(ds.train["id"].astype(str), ds.train["path"].astype(str), strict=True))
        found = {i: table[i] for i in ids if i in table}
        if found:
            return found
    return {}


# ---------------------------------------------------------------- per run


def predictions(proba: np.ndarray) -> np.ndarray:
    """Arg-max class of each row."""
    return np.asarray(proba).argmax(axis=1)


def confusion_matrix(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    idx = np.asarray(y, dtype=np.int64) * n_classes + np.asarray(pred, dtype=np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def per_class_scores(confusion: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Precision, recall and support per class from a confusion matrix (NaN when undefined)."""
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        recall = np.where(support > 0, tp / support, np.nan)
    return pd.DataFrame({"class": classes, "precision": precision, "recall": recall,
                         "support": support.astype(np.int64),
                         "predicted": predicted.astype(np.int64)})


def per_fold_scores(y: np.ndarray, proba: np.ndarray, folds: np.ndarray) -> pd.DataFrame:
    """Accuracy and log loss of each fold's held-out rows."""
    rows = []
    for f in np.unique(folds):
        m = folds == f
        rows.append({"fold": int(f), "n": int(m.sum()), "accuracy": accuracy(y[m], proba[m]),
                     "log_loss": log_loss(y[m], proba[m])})
    return pd.DataFrame(rows, columns=["fold", "n", "accuracy", "log_loss"])


def reliability(y: np.ndarray, proba: np.ndarray, n_bins: int = DEFAULT_BINS) -> pd.DataFrame:
    """Reliability table of the top-label confidence in ``n_bins`` equal-width bins.

    One row per bin (empty bins included, with NaN confidence/accuracy): lower, upper, count,
    mean confidence, accuracy, and the bin's weighted gap (its share of the ECE).
    """
    proba = np.asarray(proba, dtype=np.float64)
    conf = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == np.asarray(y)).astype(np.float64)
    # bin b holds (b/n, (b+1)/n]; ceil - 1 does that, and clipping puts 0 into bin 0
    b = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(b, weights=conf, minlength=n_bins)
    corr_sum = np.bincount(b, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        acc = np.where(count > 0, corr_sum / count, np.nan)
    gap = np.where(count > 0, np.abs(acc - mean_conf) * count / max(len(conf), 1), 0.0)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return pd.DataFrame({"lower": edges[:-1], "upper": edges[1:], "count": count.astype(np.int64),
                         "confidence": mean_conf, "accuracy": acc, "weighted_gap": gap})


@dataclass
class RunReport:
    """Everything measured on one run's OOF matrix."""

    name: str
    path: str
    level: int
    backbone: str
    accuracy: float
    log_loss: float
    ece: float
    ece_floor: float  # what exactly calibrated probabilities score on these rows by chance
    calibration_p: float  # share of those chance scores at least ``ece``
    per_class: pd.DataFrame
    per_fold: pd.DataFrame
    confusion: np.ndarray
    reliability: pd.DataFrame
    history: pd.DataFrame | None
    student: bool = False  # a distilled student: its OOF score is optimistic (oof.distill)

    def summary(self) -> dict[str, Any]:
        """One row of the summary table (a student's name marked)."""
        acc = self.per_fold["accuracy"]
        return {"run": marked(self.name, {"student": self.student}), "level": self.level,
                "backbone": self.backbone,
                "accuracy": self.accuracy, "log_loss": self.log_loss, "ece": self.ece,
                "ece_floor": self.ece_floor, "calibration_p": self.calibration_p,
                "fold_acc_mean": float(acc.mean()), "fold_acc_std": float(acc.std(ddof=0)),
                "fold_acc_min": float(acc.min()), "fold_acc_max": float(acc.max())}


def analyze_run(run: Run, n_bins: int = DEFAULT_BINS) -> RunReport:
    """Score one run: the numbers, the confusion matrix, calibration and history."""
    pred = predictions(run.oof)
    cm = confusion_matrix(run.y, pred, len(run.classes))
    backbone = run.meta.get("backbone") or {}
    name = backbone.get("name") if isinstance(backbone, dict) else str(backbone)
    return RunReport(
        name=run.name, path=str(run.path), level=int(run.meta.get("level", 1)),
        backbone=str(name or run.meta.get("stacker") or ""),
        accuracy=accuracy(run.y, run.oof), log_loss=log_loss(run.y, run.oof),
        **calibration(run.y, run.oof, n_bins), per_class=per_class_scores(cm, run.classes),
        per_fold=per_fold_scores(run.y, run.oof, run.folds), confusion=cm,
        reliability=reliability(run.y, run.oof, n_bins), history=load_history(run),
        student=is_student(run.meta),
    )


# ---------------------------------------------------------------- between runs


def correlation(probas: list[np.ndarray], names: list[str]) -> pd.DataFrame:
    """Pearson correlation of the runs' flattened OOF probability matrices."""
    flat = np.stack([np.asarray(p, dtype=np.float64).ravel() for p in probas])
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(flat) if len(flat) > 1 else np.ones((1, 1))
    return pd.DataFrame(np.atleast_2d(corr), index=names, columns=names)


def disagreement(preds: np.ndarray, names: list[str]) -> pd.DataFrame:
    """Share of rows on which two runs predict different classes ((R, N) arg-max input)."""
    preds = np.asarray(preds)
    out = np.array([[float((a != b).mean()) for b in preds] for a in preds])
    return pd.DataFrame(out, index=names, columns=names)


def one_right_other_wrong(correct: np.ndarray, names: list[str]) -> pd.DataFrame:
    """Cell [a, b]: rows run ``a`` gets right and run ``b`` gets wrong ((R, N) bool input)."""
    c = np.asarray(correct, dtype=np.int64)
    return pd.DataFrame(c @ (1 - c).T, index=names, columns=names)


def oracle(correct: np.ndarray) -> dict[str, Any]:
    """What any blend could at most gain: rows some run gets right (the oracle), and the rest."""
    c = np.asarray(correct, dtype=bool)
    n = c.shape[1]
    best = float(c.mean(axis=1).max()) if n else float("nan")
    any_right = int(c.any(axis=0).sum())
    return {"oracle_accuracy": any_right / n if n else float("nan"),
            "best_single_accuracy": best,
            "oracle_gain": (any_right / n - best) if n else float("nan"),
            "rows_all_right": int(c.all(axis=0).sum()),
            "rows_some_right": int(any_right - c.all(axis=0).sum()),
            "rows_all_wrong": int(n - any_right), "rows": int(n)}


def hardest(ids: np.ndarray, y: np.ndarray, folds: np.ndarray, proba: np.ndarray,
            correct: np.ndarray, classes: list[str], n: int = DEFAULT_HARDEST) -> pd.DataFrame:
    """The ``n`` rows the ensemble gets wrong most confidently (often label errors).

    Columns: id, fold, true, predicted, confidence (ensemble probability of the predicted
    class), p_true (of the labelled class), runs_wrong (how many runs also get it wrong).
    """
    pred = predictions(proba)
    wrong = np.flatnonzero(pred != y)
    conf = proba[wrong, pred[wrong]]
    order = wrong[np.lexsort((ids[wrong].astype(str), -conf))][:n]
    return pd.DataFrame({
        "id": ids[order].astype(str), "fold": folds[order].astype(np.int64),
        "true": [classes[i] for i in y[order]], "predicted": [classes[i] for i in pred[order]],
        "confidence": proba[order, pred[order]], "p_true": proba[order, y[order]],
        "runs_wrong": (~np.asarray(correct, dtype=bool)[:, order]).sum(axis=0).astype(np.int64),
    })


# ---------------------------------------------------------------- all of it


@dataclass
class Analysis:
    """The full analysis of a compatible set of runs; ``to_dict`` gives its JSON form."""

    classes: list[str]
    fingerprint: str
    n_rows: int
    n_bins: int
    runs: list[RunReport]
    correlation: pd.DataFrame
    disagreement: pd.DataFrame
    one_right_other_wrong: pd.DataFrame
    oracle: dict[str, Any]
    ensemble: dict[str, float]
    hardest: pd.DataFrame
    ensemble_members: list[str] = field(default_factory=list)
    image_paths: dict[str, str] = field(default_factory=dict)
    # near-duplicates of the dataset (oof.duplicates.DuplicateReport), when it was read
    duplicates: Any = None
    image_labels: dict[str, str] = field(default_factory=dict)  # of the ids it names

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.runs]

    @property
    def students(self) -> list[str]:
        """The distilled students among the runs (their tables carry STUDENT_FOOTNOTE)."""
        return [r.name for r in self.runs if r.student]

    def summary(self) -> pd.DataFrame:
        """One row per run: accuracy, log loss, ECE and the spread over folds."""
        return pd.DataFrame([r.summary() for r in self.runs])

    def per_fold(self) -> pd.DataFrame:
        return pd.concat([r.per_fold.assign(run=r.name) for r in self.runs], ignore_index=True)[
            ["run", "fold", "n", "accuracy", "log_loss"]]

    def per_class(self, metric: str = "recall") -> pd.DataFrame:
        """(class x run) table of ``precision`` or ``recall``."""
        return pd.DataFrame({r.name: r.per_class[metric].to_numpy() for r in self.runs},
                            index=pd.Index(self.classes, name="class"))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (NaN becomes None)."""
        def frame(df: pd.DataFrame) -> list[dict[str, Any]]:
            return [{k: _plain(v) for k, v in row.items()} for row in df.to_dict("records")]

        def square(df: pd.DataFrame) -> dict[str, Any]:
            return {"index": list(df.index), "values": _plain(df.to_numpy().tolist())}

        return {
            "classes": self.classes, "fold_fingerprint": self.fingerprint, "rows": self.n_rows,
            "calibration_bins": {"n_bins": self.n_bins, "kind": "equal-width on [0, 1], "
                                 "top-label confidence, bin b = (b/n, (b+1)/n]"},
            "summary": frame(self.summary()), "students": self.students,
            "ensemble_mean": {"members": self.ensemble_members, **_plain(self.ensemble)},
            "oracle": _plain(self.oracle),
            "correlation": square(self.correlation),
            "disagreement": square(self.disagreement),
            "one_right_other_wrong": square(self.one_right_other_wrong),
            "runs": {r.name: {
                "path": r.path, "level": r.level, "backbone": r.backbone, "student": r.student,
                "accuracy": _plain(r.accuracy), "log_loss": _plain(r.log_loss),
                "ece": _plain(r.ece), "ece_floor": _plain(r.ece_floor),
                "calibration_p": _plain(r.calibration_p), "per_fold": frame(r.per_fold),
                "per_class": frame(r.per_class),
                "confusion": {"rows": "true class", "columns": "predicted class",
                              "values": r.confusion.tolist()},
                "reliability": frame(r.reliability),
                "history": frame(r.history) if r.history is not None else None,
            } for r in self.runs},
            "hardest": [{**row, "path": self.image_paths.get(row["id"])}
                        for row in frame(self.hardest)],
            "duplicates": self.duplicates.to_dict() if self.duplicates is not None else None,
        }


def _plain(v: Any) -> Any:
    """numpy scalars to Python, NaN/inf to None, recursively."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def analyze(runs: list[Run], n_bins: int = DEFAULT_BINS, n_hardest: int = DEFAULT_HARDEST,
            find_images: bool = True) -> Analysis:
    """Analyse a set of runs: they must pass ``check_compatible`` (checked here again).

    ``find_images`` reloads the dataset to map the hardest images' ids to files; only those
    paths are kept, and no pixels are read here.
    """
    check_compatible(runs)
    if n_bins < 1:
        raise DataError(f"calibration bins must be >= 1, got {n_bins}")
    ref = runs[0]
    names = [r.name for r in runs]
    reports = [analyze_run(r, n_bins) for r in runs]
    probas = [r.oof for r in runs]
    preds = np.stack([predictions(p) for p in probas])
    correct = preds == ref.y[None, :]
    members = [r for r in runs if int(r.meta.get("level", 1)) == 1] or runs
    mean = np.mean([r.oof for r in members], axis=0)
    worst = hardest(ref.ids, ref.y, ref.folds, mean, correct, ref.classes, n_hardest)
    paths = image_paths(runs, list(worst["id"])) if find_images and len(worst) else {}
    return Analysis(
        classes=list(ref.classes), fingerprint=ref.fingerprint, n_rows=len(ref.ids),
        n_bins=n_bins, runs=reports, correlation=correlation(probas, names),
        disagreement=disagreement(preds, names),
        one_right_other_wrong=one_right_other_wrong(correct, names), oracle=oracle(correct),
        ensemble={"accuracy": accuracy(ref.y, mean), "log_loss": log_loss(ref.y, mean),
                  **calibration(ref.y, mean, n_bins)},
        hardest=worst, ensemble_members=[r.name for r in members], image_paths=paths,
    )
