"""One Keras fold behind the template's hooks (``backbones.fold.FoldModel``): a ``model.fit``
per segment with Keras' own callbacks, a resume through BackupAndRestore, the weights in and
out; and the LR range test.

The template (``backbones.fold``) owns what every fold does: the plan, resume bookkeeping,
validation and history each epoch, TTA prediction, checkpoint publish, info and timings. Kept
here, because they are Keras: the compiled model kept across folds (``compiled``), one ``fit``
per segment with ``EpochBatches`` (seeded batches) and ``EpochEvents`` (the template's epoch
events) first, TensorBoard's and the user's Keras callbacks, BackupAndRestore per segment, and
``forget_restored_epoch`` before each ``fit``.

The best epoch's weights (``snapshot``) are a file in the fold's work folder, so a fold
resumed after a kill still predicts with, and publishes, its best epoch.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from backbones.base import FoldJob
from backbones.fold import FoldEvents, FoldModel, FoldPlan, ResumePoint
from backbones.keras.callbacks import (
    EpochEvents,
    backup_and_restore,
    repair_backup,
    user_callbacks,
)
from backbones.keras.compiled import (
    compile_phase,
    compiled_model,
    forget_restored_epoch,
    fresh_model,
)
from backbones.keras.data import EpochBatches, make_train_dataset
from backbones.keras.model import (
    DEFAULT_BN_MOMENTUM,
    application_of,
    recalibrate_batchnorm,
    training_batchnorms,
)
from backbones.keras.optim import layer_lr_scales, make_loss, make_optimizer
from backbones.keras.runtime import configure_runtime, keras, rss_mb, runtime_in_use
from backbones.keras.serving import predict_padded, publish_checkpoint
from recipe import plan_phases
from recipe.batches import check_train_batches
from recipe.losses import class_weight_vector
from recipe.phases import Phase, Segment

log = logging.getLogger(__name__)
TrainData = tuple[Any, int, EpochBatches]  # tf.data.Dataset, steps per epoch, its batches


class KerasFoldModel(FoldModel):
    """A fold's Keras model and what its ``fit`` calls need (``build`` makes it)."""

    def __init__(self, job: FoldJob, model: keras.Model, data: TrainData, bn: float,
                 phased: bool, reused: bool, user: list[keras.callbacks.Callback]) -> None:
        self.job, self.model, self.bn, self.user = job, model, bn, user
        self.phased, self.reused = phased, reused
        self.data = {job.spec.input_size: data}  # progressive resizing: one pipeline per size
        self.stop_training = False
        self.compiled_for: Phase | None = None  # the phase a phased fold is compiled for
        self.best_path = job.work_dir / "best.weights.h5"

    # ------------------------------------------------------------------------------ training

    def fit_segment(self, segment: Segment, first_epoch: int, events: FoldEvents) -> None:
        """One ``fit`` over the segment's epochs from ``first_epoch`` (a resumed segment's
        BackupAndRestore puts its weights and optimizer state back first)."""
        self._fit(segment, first_epoch, events)

    def _fit(self, seg: Segment, first_epoch: int, events: FoldEvents | None) -> None:
        data, steps, batches = self._data_at(seg.size)
        if self.phased and seg.phase is not self.compiled_for:
            compile_phase(self.model, self.job, steps, seg.phase)
            self.compiled_for = seg.phase
        forget_restored_epoch(self.model)  # a previous fold's, or the previous phase's, resume
        self.model.fit(data, initial_epoch=first_epoch, epochs=seg.first_epoch + seg.epochs,
                       callbacks=[batches, *self._callbacks(events), self._backup(seg)],
                       shuffle=False, verbose="auto" if self.job.cfg.progress else 0)
        if self.model.stop_training:  # a Keras callback (TerminateOnNaN, EarlyStopping...)
            self.stop_training = True

    def _callbacks(self, events: FoldEvents | None) -> list[keras.callbacks.Callback]:
        """The template's events first (the validation numbers go into ``logs``), then
        TensorBoard, TerminateOnNaN and the user's; none for a ``fit`` that only restores."""
        if events is None:
            return []
        board = ([keras.callbacks.TensorBoard(str(self.job.tensorboard_dir), write_graph=False,
                                              profile_batch=0)]
                 if self.job.tensorboard_dir is not None else [])
        return [EpochEvents(events), *board, keras.callbacks.TerminateOnNaN(), *self.user]

    def _backup(self, seg: Segment) -> keras.callbacks.Callback:
        return backup_and_restore(self._backup_dir(seg))

    def _backup_dir(self, seg: Segment) -> Path:
        """One backup per segment of a phased fold (each compiles its own optimizer)."""
        root = self.job.work_dir / "backup"
        return root / seg.name if self.phased else root

    def _data_at(self, size: int) -> TrainData:
        if size not in self.data:  # the fold's rows at this size, from the image cache
            cfg, job = self.job.cfg, self.job
            weights = class_weight_vector(cfg.class_weights, job.classes, job.y_train)
            self.data[size] = make_train_dataset(job.train_images(size), job.train_targets(),
                                                 len(job.classes), cfg, job.seed, weights)
        return self.data[size]

    # -------------------------------------------------------------------------------- resume

    def save_resume(self, work_dir: Path, epoch: int, memory: dict[str, Any]) -> None:
        """Nothing: BackupAndRestore, after ``EpochEvents`` in the list, saves the epoch."""

    def load_resume(self, work_dir: Path, plan: FoldPlan) -> ResumePoint | None:
        """The epoch of the latest good backup (the last segment that has one). A segment left
        unfinished restores it in its own ``fit``; a finished one (the kill came between two
        segments, or before the predictions) is restored here, by a ``fit`` of no epoch, as the
        template trains none of its epochs again. Without a backup the fold starts over."""
        work_dir.mkdir(parents=True, exist_ok=True)
        segments = plan.segments if self.phased else plan.segments[:1]
        epochs = [repair_backup(self._backup_dir(seg)) for seg in segments]
        found = [(seg, epoch) for seg, epoch in zip(segments, epochs) if epoch is not None]
        if not found:
            self.best_path.unlink(missing_ok=True)
            return None
        seg, epoch = found[-1]
        if epoch >= seg.first_epoch + seg.epochs:
            self._fit(seg, seg.first_epoch, None)
        best = self.best_path if self.best_path.exists() else None
        return ResumePoint(int(epoch), None, best_state=best)

    # ------------------------------------------------------------------------- weights in/out

    def predict_batch(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        return predict_padded(self.model, images, batch_size)

    def snapshot(self) -> Path:
        """The best epoch so far, saved in the work folder (it outlives a kill)."""
        return self._save(self.best_path)

    def load_weights(self, state: Any) -> None:
        self.model.load_weights(str(state))

    def recalibrate_batchnorm(self, images: np.ndarray) -> int:
        return recalibrate_batchnorm(self.model, images)

    def save_weights(self, path: Path, meta: dict[str, Any], state: Any = None) -> None:
        src = Path(state) if state is not None else self._save(
            self.job.work_dir / "predict.weights.h5")
        publish_checkpoint(src, path, meta)

    def _save(self, path: Path) -> Path:
        partial = path.with_name("partial." + path.name)  # Keras wants the .weights.h5 suffix
        self.model.save_weights(str(partial))
        os.replace(partial, path)
        return path

    def info(self) -> dict[str, Any]:
        device, policy = runtime_in_use()
        return {"device": device, "amp": policy, **self.checkpoint_meta(),
                "jit_compile": bool(self.model.jit_compile),
                "steps_per_execution": self.model.steps_per_execution,
                "compiled_step_reused": self.reused, "rss_mb": rss_mb()}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"bn_momentum": self.bn, "head_dropout": self.job.spec.head_dropout}


def build(job: FoldJob, plan: FoldPlan) -> KerasFoldModel:
    """The fold's model: the kept compiled one (re-initialised) for a one-phase fold, a fresh
    one for a phased fold (each phase compiles its own step: nothing to reuse across folds)."""
    cfg = job.cfg
    bn = DEFAULT_BN_MOMENTUM if cfg.bn_momentum is None else float(cfg.bn_momentum)
    user = user_callbacks(cfg.callbacks)  # bad names fail before any work
    weights = class_weight_vector(cfg.class_weights, job.classes, job.y_train)
    data = make_train_dataset(job.x_train, job.train_targets(), len(job.classes), cfg, job.seed,
                              weights)
    phased = len(plan.segments) > 1 or plan.phases[0].layer_decay is not None
    if phased:
        model, reused = fresh_model(job, bn, any_size=plan.progressive), False
    else:
        model, reused = compiled_model(job, data[1], bn)
    forget_restored_epoch(model)  # a previous fold's resume
    check_train_batches(len(job.x_train), cfg.batch_size,
                        len(training_batchnorms(model, plan.phases)), job.spec.name, job.fold)
    return KerasFoldModel(job, model, data, bn, phased, reused, user)


def lr_range_test(job: FoldJob, lrs: np.ndarray) -> list[float]:
    """The training loss of one batch per learning rate in ``lrs`` (the LR range test), for the
    phase that trains every layer (layer-wise scales included), from the fold's initial weights.
    """
    cfg = job.cfg
    configure_runtime(cfg)
    bn = DEFAULT_BN_MOMENTUM if cfg.bn_momentum is None else float(cfg.bn_momentum)
    dataset, steps, batches = make_train_dataset(
        job.x_train, job.y_train, len(job.classes), cfg, job.seed,
        class_weight_vector(cfg.class_weights, job.classes, job.y_train))
    model = fresh_model(job, bn)
    phase = plan_phases(cfg)[-1]
    check_train_batches(len(job.x_train), cfg.batch_size,
                        len(training_batchnorms(model, [phase])), job.spec.name, job.fold)
    application_of(model).trainable = True
    scales = layer_lr_scales(model, phase.layer_decay) if phase.layer_decay else None
    optimizer, _ = make_optimizer(cfg, steps, phase, scales, fixed_lr=float(lrs[0]))
    model.compile(optimizer=optimizer,
                  loss=make_loss(cfg),
                  steps_per_execution=1)
    losses: list[float] = []

    class Ramp(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
            self.model.optimizer.learning_rate.assign(float(lrs[len(losses)]))
            self.model.reset_metrics()  # so the logged loss is this batch's, not a mean

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            losses.append(float((logs or {}).get("loss", math.nan)))
            if len(losses) >= len(lrs) or not math.isfinite(losses[-1]):
                self.model.stop_training = True

    model.fit(dataset.repeat(), steps_per_epoch=len(lrs), epochs=1, verbose=0,
              callbacks=[batches, Ramp()], shuffle=False)
    return losses + [math.inf] * (len(lrs) - len(losses))
