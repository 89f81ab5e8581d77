"""Pseudo-label sources: per-fold test predictions that never saw the fold's labels.

A pseudo-label for a test image joins the TRAINING side of fold k. If it came from a model that
was trained on fold k's rows, the fold-k model learns those rows' labels second-hand and fold k's
OOF score is flattered (the leak is plainest when a test image is a near-copy of a training row).
So the source stores, for every fold k, the ensemble's test probabilities made only by each run's
fold-k model and stackers fitted without fold k's rows, at every level of a stack of stacks
(``ensemble.pseudo`` computes them); the runner takes fold k's pseudo-labels from fold k's row of
this file alone. A source without the FOLD_K_ONLY mark was written by an older stack.py: it is
used only if it came from a level-2 stack (level-1 inputs, whose fold-k rows were always their
fold-k models'); from a stack of stacks it is refused (issue 28).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oof.atomic import write_atomic
from oof.errors import ConfigError, DataError
from oof.rundir import FOLD_K_ONLY, META_FILE, read_json

PSEUDO_FILE = "pseudo_by_fold.parquet"
_META_KEY = b"foldstack_pseudo"


@dataclass(frozen=True)
class PseudoSource:
    """Leak-free test probabilities per fold, and where they came from."""

    path: Path
    method: str
    runs: list[str]  # every run whose predictions made them (the stack's inputs first)
    classes: list[str]
    fingerprint: str
    test_ids: np.ndarray
    proba: np.ndarray  # (K, n_test, C)
    extra: dict[str, Any] = field(default_factory=dict)

    def select(self, fold: int, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Test rows confident enough for fold ``fold``: (rows, class indices, confidence)."""
        p = self.proba[fold]
        conf, label = p.max(axis=1), p.argmax(axis=1)
        rows = np.flatnonzero(conf >= threshold)
        return rows, label[rows].astype(np.int64), conf[rows]

    def describe(self, threshold: float) -> dict[str, Any]:
        """What a run records about its pseudo-labels (meta.json)."""
        return {"source": str(self.path), "method": self.method, "source_runs": self.runs,
                "threshold": threshold, "fingerprint": self.fingerprint,
                "per_fold": [int(len(self.select(k, threshold)[0]))
                             for k in range(len(self.proba))]}


def write_pseudo_source(stack_dir: Path, method: str, runs: list[str], classes: list[str],
                        fingerprint: str, test_ids: np.ndarray, proba: np.ndarray,
                        level: int = 2) -> Path:
    """Store (K, n_test, C) fold-k-only probabilities as one parquet with its provenance
    (``level``: the stack's; the FOLD_K_ONLY mark says how every row k was made)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    k, n, c = proba.shape
    if c != len(classes) or n != len(test_ids):
        raise ValueError(f"proba {proba.shape} does not match {len(test_ids)} ids x "
                         f"{len(classes)} classes")
    df = pd.DataFrame({"id": np.tile(np.asarray(test_ids, dtype=str), k),
                       "fold": np.repeat(np.arange(k), n)})
    df[list(classes)] = proba.reshape(k * n, c)
    table = pa.Table.from_pandas(df, preserve_index=False)
    info = {"method": method, "runs": runs, "classes": classes, "fingerprint": fingerprint,
            "folds": k, "level": level, "rows": FOLD_K_ONLY}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           _META_KEY: json.dumps(info).encode()})
    path = Path(stack_dir) / PSEUDO_FILE
    write_atomic(path, lambda p: pq.write_table(table, p))
    return path


def load_pseudo_source(stack_dir: str | Path) -> PseudoSource:
    """Read a stack folder's pseudo-label source; every problem names the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(stack_dir) / PSEUDO_FILE
    if not path.exists():
        raise ConfigError(
            f"--pseudo-labels {stack_dir}: no {PSEUDO_FILE} there; give a stack folder written "
            "by stack.py (runs/<dataset>/stack-<method>)")
    try:
        table = pq.read_table(path)
        info = json.loads((table.schema.metadata or {})[_META_KEY])
        df = table.to_pandas()
        classes = [str(c) for c in info["classes"]]
        k = int(info["folds"])
        ids = df.loc[df["fold"] == 0, "id"].astype(str).to_numpy(object)
        proba = df[classes].to_numpy(np.float64).reshape(k, len(ids), len(classes))
        same_ids = all((df.loc[df["fold"] == f, "id"].astype(str).to_numpy(object) == ids).all()
                       for f in range(k))
    except (OSError, KeyError, ValueError, pa.ArrowException) as exc:
        raise DataError(f"{path}: damaged or not a pseudo-label source ({type(exc).__name__}: "
                        f"{exc}); rerun stack.py to rewrite it") from exc
    if not same_ids or not np.isfinite(proba).all():
        raise DataError(f"{path}: folds list different test ids, or probabilities are not finite; "
                        "rerun stack.py to rewrite it")
    if info.get("rows") != FOLD_K_ONLY:
        _check_legacy(path)
    return PseudoSource(path.parent, str(info["method"]), list(info["runs"]), classes,
                        str(info["fingerprint"]), ids, proba)


def _check_legacy(path: Path) -> None:
    """An unmarked (older) source is leak-free only from a level-2 stack: refuse any other."""
    meta_path = path.parent / META_FILE
    level = read_json(meta_path).get("level") if meta_path.exists() else None
    if level == 2:
        return
    why = (f"of a level-{level} stack: its fold-k rows used level-2 test predictions made with "
           "models trained on fold k, so fold k would learn its own labels" if level is not None
           else f"with no {META_FILE} beside it: whether its fold-k rows saw fold k is unknown")
    raise ConfigError(f"--pseudo-labels {path.parent}: {PSEUDO_FILE} was written by an older "
                      f"stack.py {why}; rerun the stack.py commands of this stack and of the "
                      "stacks it stacked to rewrite them")


def check_source(source: PseudoSource, classes: list[str], fingerprint: str,
                 test_ids: np.ndarray) -> np.ndarray:
    """Refuse a source made for other folds, classes or test images; return test-row order.

    The returned array maps the source's rows to the dataset's test rows.
    """
    where = f"--pseudo-labels {source.path}"
    if source.fingerprint != fingerprint:
        raise ConfigError(f"{where}: made on folds {source.fingerprint}, but this run root's "
                          f"folds are {fingerprint}; pseudo-labels must come from the same folds")
    if source.classes != list(classes):
        raise ConfigError(f"{where}: class order {source.classes} != the dataset's {classes}")
    pos = {str(i): n for n, i in enumerate(test_ids)}
    missing = [i for i in source.test_ids if i not in pos]
    if missing or len(source.test_ids) != len(pos):
        raise ConfigError(f"{where}: its test ids differ from the dataset's "
                          f"(e.g. {missing[:3] or 'a different count'})")
    return np.array([pos[i] for i in source.test_ids], dtype=np.int64)
