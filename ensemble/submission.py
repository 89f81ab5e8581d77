"""The submission file: the competition's ids in the competition's order, class names as labels.

Built in memory first (``build_submission``) so every check runs before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from oof.atomic import write_atomic
from oof.datasets import ImageDataset
from oof.errors import DataError, RunMismatchError


def submission_ids(dataset: ImageDataset) -> tuple[np.ndarray, str]:
    """Ids the submission must list, in order: the sample submission's, else the test ids sorted."""
    if dataset.sample_submission is not None:
        column = dataset.submission_columns[0]
        sample = pd.read_csv(dataset.sample_submission, dtype=str, keep_default_na=False)
        if column not in sample.columns:
            raise DataError(f"{dataset.sample_submission}: no {column!r} column")
        return sample[column].to_numpy(object), str(dataset.sample_submission)
    return np.array(sorted(dataset.test["id"].astype(str)), dtype=object), "the test ids, sorted"


@dataclass
class Submission:
    """``table``: id + label columns; ``proba``: id + one column per class, same row order."""

    table: pd.DataFrame
    proba: pd.DataFrame

    def write(self, submission_path: Path, proba_path: Path) -> None:
        write_atomic(submission_path, lambda p: self.table.to_csv(p, index=False))
        write_atomic(proba_path, lambda p: self.proba.to_csv(p, index=False))


def build_submission(
    ids: np.ndarray, test_ids: np.ndarray, proba: np.ndarray, classes: list[str],
    columns: tuple[str, str], source: str = "the test set",
) -> Submission:
    """Reorder ``proba`` (rows follow ``test_ids``) to ``ids``; label = arg-max class name."""
    pos = {str(i): n for n, i in enumerate(test_ids)}
    missing = [str(i) for i in ids if str(i) not in pos]
    if missing:
        raise RunMismatchError(
            f"{source}: {len(missing)} id(s) have no test prediction in the runs, "
            f"e.g. {missing[:5]}; the runs were made for another test set"
        )
    if len(ids) != len(set(map(str, ids))):
        raise DataError(f"{source}: duplicate ids")
    rows = np.array([pos[str(i)] for i in ids], dtype=np.int64)
    p = np.asarray(proba, dtype=np.float64)[rows]
    labels = np.asarray(classes, dtype=object)[p.argmax(axis=1)]
    id_col, label_col = columns
    table = pd.DataFrame({id_col: np.asarray(ids, dtype=object).astype(str), label_col: labels})
    prob = pd.DataFrame({id_col: table[id_col]})
    prob[list(classes)] = p
    return Submission(table, prob)
