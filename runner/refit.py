"""``run_folds.py --refit-full``: one more model of the run on ALL training rows (issue 30 item 2).

As AutoGluon's ``refit_full``: after the K folds, the same recipe trains once on every training
row, so a run can serve one model (V passes per image) instead of K (K x V). It has no OOF of its
own: no row was held out from it, so its quality is estimated by the run's OOF (each OOF row is
one fold model's prediction, a model of the same recipe on (K-1)/K of the rows) and, where the
data has held-out labels, measured there.

How many epochs: the recipe's ``--epochs`` keeps its learning-rate curve (warmup, cosine, phases,
progressive sizes) exactly as the folds had it, and the refit stops after the epoch count the
folds used: the median over folds of ``epochs_run`` (``--epochs`` unless early stopping or a NaN
loss stopped them), or with ``--predict-weights best`` the median of the folds' best epoch + 1
(the weights they predicted with). Stopping the same curve where the folds' predicting weights
were taken, rather than compressing the curve into fewer epochs, gives the refit the weights a
fold of that length would have had. The refit predicts with its last epoch's weights: with no
held-out rows there is no val_loss, so BestWeights (and EarlyStopping or ReduceLROnPlateau on
val_loss) never choose.

Its files: ``checkpoints/refit<suffix>`` (weights; checkpoint metadata ``fold`` = K, so its TTA
seed is the run's train seed + K, as in training), ``refit/test.parquet``, ``refit/history.csv``,
``refit/refit.json`` (the marker, written last) and meta.json's ``refit``. While it trains, its
resume state lives in ``work/refit``: a killed refit resumes from its last finished epoch and ends
bit-identical to an uninterrupted one; a finished one is never trained again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from backbones.callbacks import Callback
from oof.errors import BusyError, ConfigError
from oof.images import RowView

if TYPE_CHECKING:
    from oof.config import RunConfig
    from runner.run import PreparedRun
    from runner.tasks import FoldImages

log = logging.getLogger("runner.run")

NO_OOF = ("no OOF of its own (it trained on every training row); its quality is estimated by "
          "the run's OOF")


def refit_checkpoint_name(family: Any) -> str:
    return f"refit{family.checkpoint_suffix}"


def refit_epochs(fold_infos: list[dict[str, Any]], predict_weights: str) -> tuple[int, str]:
    """The refit's epoch count from the folds' info, and the rule that gave it."""
    if predict_weights == "best":
        best = [i.get("best_epoch") for i in fold_infos]
        if all(b is not None for b in best):
            values, rule = [int(b) + 1 for b in best], "median of the folds' best epoch + 1"
        else:  # a fold never had a finite val_loss: it predicted with its last weights
            values = [int(i["epochs_run"]) for i in fold_infos]
            rule = "median of the folds' epochs_run (some fold had no best epoch)"
    else:
        values, rule = [int(i["epochs_run"]) for i in fold_infos], "median of the folds' " \
            "epochs_run"
    epochs = max(1, int(math.floor(float(np.median(values)) + 0.5)))  # a tie rounds up
    return epochs, f"{rule} {values} -> {epochs}"


class StopAfter(Callback):
    """Stop training after ``epochs`` epochs (the schedule itself stays the recipe's)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = int(epochs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch + 1 >= self.epochs:
            self.trainer.stop_training = True


@contextlib.contextmanager
def refit_lock(prep: PreparedRun) -> Iterator[None]:
    """One process trains a run's refit at a time (released by the OS if it dies)."""
    from filelock import FileLock, Timeout

    lock_dir = prep.run.path / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_dir / "refit.lock")
    try:
        with lock.acquire(timeout=0):
            yield
    except Timeout:
        raise BusyError(f"the refit model of {prep.run.path} is being trained by another "
                        f"process (lock {lock.lock_file} is held); wait for it to finish"
                        ) from None


def check_refit(cfg: RunConfig) -> None:
    """Refuse what a refit cannot be: pseudo-labels are per fold (fold k's come from models that
    never saw fold k), so no set of them belongs to a model of every row."""
    if cfg.refit_full and cfg.pseudo_labels:
        raise ConfigError("--refit-full with --pseudo-labels: each fold's pseudo-labels come from "
                          "models that never saw that fold, and a model of every training row "
                          "has no such set; refit a run without --pseudo-labels")


def train_refit(prep: PreparedRun, images: FoldImages | None = None,
                callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Train (or resume, or find finished) the run's refit model; returns meta's ``refit``.

    Every fold must be done (its epoch count comes from them). ``callbacks``: extra template
    callbacks (tests)."""
    from backbones.base import FoldJob
    from runner.tasks import load_fold_images, training_side

    run, folds, cfg = prep.run, prep.folds, prep.cfg
    check_refit(cfg)
    with refit_lock(prep):
        if run.refit_done():
            return run.read_refit_info()
        t0 = time.perf_counter()
        infos = [run.read_fold_info(k) for k in range(folds.k)]
        epochs, rule = refit_epochs(infos, cfg.predict_weights)
        images = images or load_fold_images(prep)
        every = np.arange(len(folds.ids))
        side = training_side(prep, images, every)
        none = every[:0]
        log.info("refit: one model on all %d training rows, %d of --epochs %d (%s); fold %d in "
                 "the epoch lines", len(side.y), epochs, cfg.epochs, rule, folds.k)
        job = FoldJob(
            spec=prep.spec, cfg=cfg, fold=folds.k, classes=prep.dataset.classes,
            x_train=side.x, y_train=side.y,
            x_val=RowView(images.train, images.order[none]), y_val=images.y[none],
            x_test=RowView(images.test, np.arange(len(images.test))),
            checkpoint_path=run.checkpoint_dir() / refit_checkpoint_name(prep.backend),
            work_dir=run.refit_work_dir(), history_path=run.refit_dir() / "history_live.csv",
            seed=prep.train_seed + folds.k, train_images_at=side.at_size, y_train_soft=side.soft,
            tensorboard_dir=run.path / "tensorboard" / "refit" if cfg.tensorboard else None,
        )
        result = prep.backend.train_fold(job, [*(callbacks or []), StopAfter(epochs)])
        passes = prep.backend.passes_per_image(1, len(_views(prep)))
        info = {
            **result.info, "epochs": epochs, "epochs_rule": rule,
            "epochs_run": result.info.get("epochs_run", len(result.history)),
            "predict_weights": "last", "predict_weights_note": "no held-out rows: no val_loss, "
            "so the last epoch's weights predict whatever --predict-weights says",
            "oof": None, "oof_note": NO_OOF, "n_train": int(len(side.y)),
            "checkpoint": f"checkpoints/{job.checkpoint_path.name}", "seed": job.seed,
            "test": "refit/test.parquet", "passes_per_image": passes,
            "seconds": time.perf_counter() - t0,
        }
        ms = prep.run.read_meta().get("ms_per_pass")
        if ms is not None:
            info["ms_per_image"] = float(ms) * passes
        run.write_refit(run.path.name, prep.dataset.classes, folds.fingerprint,
                        np.asarray(prep.dataset.test["id"], dtype=object), result.test_proba,
                        result.history, info, result.views)
        job.history_path.unlink(missing_ok=True)
        shutil.rmtree(run.refit_work_dir(), ignore_errors=True)
        with contextlib.suppress(OSError):  # the run's work folder, when nothing else is in it
            run.refit_work_dir().parent.rmdir()
        log.info("refit done: %d epochs, %d passes per image, %.1fs", info["epochs_run"],
                 passes, info["seconds"])
        return info


def _views(prep: PreparedRun) -> list[Any]:
    from backbones.fold import run_views

    return run_views(prep.meta, {"fold": prep.folds.k}, prep.spec.input_size)
