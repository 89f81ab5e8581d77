"""One fold job: the unit of work that every executor (local loop, Ray worker) runs.

The job reads its rows through ``RowView``s into the memory-mapped image cache (no per-fold copy
of the pixels) and writes its fold part through ``RunDir``, so where it ran leaves no trace in
the files: a Ray run and a local run of the same config give the same OOF.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from oof.datasets import ImageDataset
from oof.folds import Folds
from oof.images import JoinedRows, RowView, cached_images
from oof.metrics import scores
from oof.rundir import FoldPart

if TYPE_CHECKING:
    from runner.run import PreparedRun

log = logging.getLogger("runner.run")  # the fold lines users and tests read come from the runner


@dataclass
class FoldImages:
    """The decoded training and test sets (memory maps) and each folds.csv row's image row."""

    train: np.ndarray
    test: np.ndarray
    order: np.ndarray  # image row of each folds.csv row
    y: np.ndarray  # integer label of each folds.csv row


def fold_rows(dataset: ImageDataset, folds: Folds) -> tuple[np.ndarray, np.ndarray]:
    """Dataset row of each folds.csv row, and its integer label."""
    row_of = {i: n for n, i in enumerate(dataset.train["id"])}
    order = np.array([row_of[i] for i in folds.ids.astype(str)])
    index = dataset.class_index
    return order, np.array([index[lab] for lab in folds.labels.astype(str)], dtype=np.int64)


def load_fold_images(prep: PreparedRun) -> FoldImages:
    """Memory-map the run's image caches (decoding them first if a worker meets them missing)."""
    cache = prep.root / "cache"
    size, resize = prep.spec.input_size, prep.cfg.resize
    train = cached_images(list(prep.dataset.train["path"]), size, cache, resize)
    test = cached_images(list(prep.dataset.test["path"]), size, cache, resize)
    order, y = fold_rows(prep.dataset, prep.folds)
    return FoldImages(train, test, order, y)


@dataclass
class TrainingSide:
    """The rows a model trains on: images (views into the caches), labels, other sizes."""

    x: Any
    y: np.ndarray
    at_size: Any  # size -> the same rows decoded at that size (progressive resizing)
    soft: np.ndarray | None = None  # --distill-from: each row's soft target (rows, C)


def training_side(prep: PreparedRun, images: FoldImages, rows: np.ndarray,
                  pseudo_rows: np.ndarray | None = None,
                  pseudo_labels: np.ndarray | None = None) -> TrainingSide:
    """folds.csv ``rows``, then pseudo-labelled test rows, then the ``--extra-train`` images:
    a fold's training side, or every row for the refit model."""
    cfg, spec = prep.cfg, prep.spec
    pseudo_rows = np.zeros(0, dtype=np.int64) if pseudo_rows is None else pseudo_rows
    x = RowView(images.train, images.order[rows])
    y = images.y[rows]
    if len(pseudo_rows):
        x = JoinedRows([x, RowView(images.test, pseudo_rows)])
        y = np.concatenate([y, pseudo_labels])
    if prep.extra_paths:  # --extra-train: every training side, never a held-out one
        extra = cached_images(prep.extra_paths, spec.input_size, prep.root / "cache", cfg.resize)
        x = JoinedRows([x, RowView(extra, np.arange(len(extra)))])
        y = np.concatenate([y, prep.extra_y])

    def at_size(size: int) -> Any:  # progressive resizing: the same rows at another size
        def rows_of(paths: Any, r: np.ndarray) -> RowView:
            return RowView(cached_images(list(paths), size, prep.root / "cache", cfg.resize), r)
        parts = [rows_of(prep.dataset.train["path"], images.order[rows])]
        if len(pseudo_rows):
            parts.append(rows_of(prep.dataset.test["path"], pseudo_rows))
        if prep.extra_paths:
            parts.append(rows_of(prep.extra_paths, np.arange(len(prep.extra_paths))))
        return parts[0] if len(parts) == 1 else JoinedRows(parts)

    soft = None if prep.targets is None else prep.targets[rows]  # no pseudo/extra rows then
    return TrainingSide(x, y, at_size, soft)


def train_one_fold(prep: PreparedRun, images: FoldImages, k: int) -> dict[str, Any]:
    """Train fold ``k``, predict its held-out rows and the test set, write its part atomically.

    The caller holds the fold's lock. Returns the fold's row of the results table.
    """
    from backbones.base import FoldJob

    cfg, folds, run, spec = prep.cfg, prep.folds, prep.run, prep.spec
    tr, va = folds.split(k)
    f0 = time.perf_counter()
    log.info("fold %d/%d: %d train, %d held out, %d test", k + 1, folds.k, len(tr), len(va),
             len(images.test))
    pseudo_rows = np.zeros(0, dtype=np.int64)
    pseudo_labels = np.zeros(0, dtype=np.int64)
    if prep.pseudo is not None:  # fold k's own leak-free pseudo-labels join its training side
        rows, pseudo_labels, _ = prep.pseudo.select(k, cfg.pseudo_threshold)
        pseudo_rows = prep.pseudo_test_rows[rows]
        log.info("fold %d: %d pseudo-labelled test images join its training side", k, len(rows))
    side = training_side(prep, images, tr, pseudo_rows, pseudo_labels)
    x_train, y_train = side.x, side.y

    job = FoldJob(
        spec=spec, cfg=cfg, fold=k, classes=prep.dataset.classes,
        x_train=x_train, y_train=y_train,
        x_val=RowView(images.train, images.order[va]), y_val=images.y[va],
        x_test=RowView(images.test, np.arange(len(images.test))),
        checkpoint_path=run.checkpoint_dir() / prep.backend.checkpoint_name(k),
        work_dir=run.work_dir(k), history_path=run.history_path(k), seed=prep.train_seed + k,
        train_images_at=side.at_size, y_train_soft=side.soft,
        tensorboard_dir=run.path / "tensorboard" / f"fold{k}" if cfg.tensorboard else None,
    )
    result = prep.backend.train_fold(job)
    fold_scores = scores(images.y[va], result.val_proba)
    info = {**result.info, **fold_scores, "seconds": time.perf_counter() - f0,
            "n_train": int(len(y_train)), "n_val": int(len(va)), "n_pseudo": int(len(pseudo_rows)),
            "epochs_run": result.info.get("epochs_run", len(result.history))}
    run.write_fold(FoldPart(k, folds.ids[va], result.val_proba, result.test_proba,
                            result.history, info, result.views), prep.dataset.classes)
    shutil.rmtree(run.work_dir(k), ignore_errors=True)
    log.info("fold %d done: accuracy %.4f, log loss %.4f, %.1fs", k, fold_scores["accuracy"],
             fold_scores["log_loss"], info["seconds"])
    return {"fold": k, **{m: info.get(m) for m in ("accuracy", "log_loss", "seconds",
                                                   "epochs_run")}}

