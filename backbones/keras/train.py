"""One Keras fold: a compiled model (kept for the next fold of the run), fit per phase and
size with its callbacks, precise BatchNorm, TTA predictions, the checkpoints; and the LR range
test.

Start-up: tracing and optimising the training graph costs tens of seconds on 2 cores, more than a
demo fold trains. The compiled model is therefore kept for the next fold of the same run: each
fold builds a fresh, seeded model only to copy its initial weights in, and resets the optimizer
state, so the traced step is reused instead of rebuilt. ``keras.backend.clear_session`` runs
whenever the graph would differ (another backbone or setting), so memory stays flat.

ModelCheckpoint keeps the best weights by ``val_loss`` and they go into the run. OOF and test rows
are predicted, as in timm runs, with ``cfg.predict_weights``: the last epoch's weights by
default, or the best epoch's (chosen on the held-out fold, so its OOF leans optimistic). The
fold's checkpoint holds exactly the weights that predicted, so a served fold model reproduces its
OOF rows; ``info['best_epoch']`` says which epoch was best.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from backbones.base import FoldJob, FoldResult
from backbones.callbacks import read_history, trim_history
from backbones.keras.callbacks import (
    FoldMetrics,
    _best_so_far,
    repair_backup,
    user_callbacks,
)
from backbones.keras.data import make_train_dataset
from backbones.keras.model import (
    DEFAULT_BN_MOMENTUM,
    _iter_layers,
    application_of,
    build_model,
    recalibrate_batchnorm,
    training_batchnorms,
)
from backbones.keras.optim import (
    WarmupSchedule,
    layer_lr_scales,
    make_loss,
    make_optimizer,
    schedule_lengths,
    uses_plateau,
)
from backbones.keras.runtime import _rss_mb, configure_runtime, seed_python
from backbones.keras.serving import predict_proba
from oof.atomic import atomic_path
from recipe import peak_lr, plan_phases, plan_segments, plan_sizes
from recipe.batches import check_train_batches
from recipe.losses import class_weight_vector
from recipe.phases import Phase
from recipe.tta import tta_views

log = logging.getLogger(__name__)
STEPS_PER_EXECUTION = 4  # fewer Python round trips per step; measured in bench/overhead_keras.py

@dataclass
class _Compiled:
    """A traced, compiled model kept for the next fold of the same run."""

    key: str
    model: keras.Model
    schedule: WarmupSchedule | None
    optimizer_init: list[np.ndarray] = field(default_factory=list)
    folds_served: int = 0


_COMPILED: _Compiled | None = None


def _graph_key(job: FoldJob, bn: float, policy: str, steps_per_epoch: int) -> str:
    """Everything that changes the traced graph; the same key means the step can be reused."""
    cfg = job.cfg
    return json.dumps({
        "steps_per_execution": steps_per_execution(steps_per_epoch),
        "spec": job.spec.to_dict(), "classes": len(job.classes), "bn": bn, "policy": policy,
        "batch": min(cfg.batch_size, len(job.x_train)), "lr": peak_lr(cfg),
        "opt": cfg.optimizer, "wd": cfg.weight_decay, "ls": cfg.label_smoothing,
        "loss": cfg.loss, "gamma": cfg.focal_gamma, "class_weights": cfg.class_weights,
        "schedule": cfg.schedule, "plateau": uses_plateau(cfg), "ema": cfg.ema,
        "ema_decay": cfg.ema_decay,
    }, sort_keys=True, default=str)


def _fresh_model(job: FoldJob, bn: float, any_size: bool = False) -> keras.Model:
    """A new model for a phased fold, after dropping any cached compiled one."""
    global _COMPILED
    if _COMPILED is not None:
        _COMPILED = None
        keras.backend.clear_session()
    seed_python(job.seed)
    return build_model(job.spec, len(job.classes), bn, any_size)


def _compile_phase(model: keras.Model, job: FoldJob, steps_per_epoch: int, phase: Phase) -> None:
    """Freeze or unfreeze the application, then compile with the phase's optimiser.

    A frozen Keras BatchNormalization runs in inference mode (the transfer-learning guide's
    recipe), so the head phase keeps the pretrained statistics as they are, and so does every
    phase with ``freeze_bn`` (its BatchNorm layers alone stay frozen when the rest unfreezes).
    """
    cfg = job.cfg
    application = application_of(model)
    application.trainable = phase.train_backbone
    if phase.train_backbone:  # set both ways: Keras does not pass an unchanged flag down
        for layer in _iter_layers(application):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = not phase.freeze_bn
    scales = layer_lr_scales(model, phase.layer_decay) if phase.layer_decay else None
    optimizer, _ = make_optimizer(cfg, steps_per_epoch, phase, scales)
    model.compile(
        optimizer=optimizer,
        loss=make_loss(cfg),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        steps_per_execution=steps_per_execution(steps_per_epoch),
        jit_compile="auto",
    )
    if cfg.weight_decay:
        optimizer.exclude_from_weight_decay(
            var_list=[v for v in model.trainable_variables if len(v.shape) <= 1])
    optimizer.build(model.trainable_variables)


def _compiled_model(job: FoldJob, steps_per_epoch: int, bn: float, policy: str) -> _Compiled:
    """A compiled model for this fold: the previous fold's (re-initialised) when its graph is
    the same, else a new one after clearing the session."""
    global _COMPILED
    key = _graph_key(job, bn, policy, steps_per_epoch)
    seed_python(job.seed)
    fresh = build_model(job.spec, len(job.classes), bn)
    if _COMPILED is not None and _COMPILED.key == key:
        cached = _COMPILED
        cached.model.set_weights(fresh.get_weights())
        for var, value in zip(cached.model.optimizer.variables, cached.optimizer_init,
                              strict=True):
            var.assign(value)
        if cached.schedule is not None:
            cached.schedule.set_lengths(*schedule_lengths(job.cfg, steps_per_epoch))
        del fresh
        cached.folds_served += 1
        return cached
    if _COMPILED is not None:
        _COMPILED = None
        keras.backend.clear_session()
        seed_python(job.seed)
        fresh = build_model(job.spec, len(job.classes), bn)
    cfg = job.cfg
    optimizer, schedule = make_optimizer(cfg, steps_per_epoch)
    fresh.compile(
        optimizer=optimizer,
        loss=make_loss(cfg),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        steps_per_execution=steps_per_execution(steps_per_epoch),
        jit_compile="auto",  # XLA on GPU; off on CPU, where it compiles slower than it runs
    )
    if cfg.weight_decay:  # no decay on biases and norm scales, like the timm param groups
        optimizer.exclude_from_weight_decay(
            var_list=[v for v in fresh.trainable_variables if len(v.shape) <= 1])
    optimizer.build(fresh.trainable_variables)
    _COMPILED = _Compiled(key, fresh, schedule,
                          [np.array(v.numpy()) for v in optimizer.variables])
    return _COMPILED


def steps_per_execution(steps_per_epoch: int) -> int:
    """Training steps per ``fit`` call into the graph: STEPS_PER_EXECUTION, fewer for a shorter
    epoch. An epoch that is not a multiple ends with a shorter call (Keras stops the loop when
    the data ends; its progress bar still counts 23/23). Requiring a divisor, as before, fell
    back to 1 on the demo's 23 steps, and fit ran at 0.90x its bare loop instead of 0.98x.
    """
    return max(1, min(STEPS_PER_EXECUTION, steps_per_epoch))


def forget_restored_epoch(model: keras.Model) -> None:
    """Make ``fit(initial_epoch=...)`` start where it says on a model that trained before.

    BackupAndRestore hands the epoch it restored to ``fit`` through the private
    ``Model._initial_epoch``, which ``fit`` prefers to its ``initial_epoch`` argument and never
    clears: the next fold (the compiled model is reused) or the next phase would skip that many
    epochs. Keras offers no public way to clear it, so this writes it, and refuses to guess
    when Keras no longer has it; ``test_keras_backend.py`` (the probe's ``restored_epoch``)
    fails if Keras stops setting or honouring it (keras is pinned in constraints.txt).
    """
    if not hasattr(model, "_initial_epoch"):
        raise RuntimeError(
            f"keras {keras.__version__}: Model._initial_epoch is gone, so the epoch a fold's "
            "BackupAndRestore restored cannot be cleared; use the keras of constraints.txt")
    model._initial_epoch = None


def _publish_checkpoint(src: Path, dest: Path, meta: dict[str, Any]) -> None:
    """Copy the best weights into the run atomically, with the fold's metadata inside."""
    import shutil

    import h5py

    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
        with h5py.File(tmp, "a") as fh:
            fh.attrs["foldstack"] = json.dumps(meta)


def train_fold(job: FoldJob) -> FoldResult:
    """Train on the fold's training rows, then predict its held-out rows and the test set."""
    cfg = job.cfg
    t0 = time.perf_counter()
    device, policy = configure_runtime(cfg)
    bn = DEFAULT_BN_MOMENTUM if cfg.bn_momentum is None else float(cfg.bn_momentum)
    extra = user_callbacks(cfg.callbacks)  # bad names fail before any work
    weight_of_class = class_weight_vector(cfg.class_weights, job.classes, job.y_train)
    dataset, steps, batches = make_train_dataset(
        job.x_train, job.y_train, len(job.classes), cfg, job.seed, weight_of_class)
    phases = plan_phases(cfg)
    stages = plan_sizes(cfg, job.spec.input_size)
    segments = plan_segments(phases, stages)
    progressive = len(stages) > 1
    phased = len(segments) > 1 or phases[0].layer_decay is not None
    if phased:  # each phase compiles its own step: nothing to reuse across folds
        model, reused = _fresh_model(job, bn, any_size=progressive), False
    else:
        reused = _COMPILED is not None
        compiled = _compiled_model(job, steps, bn, policy)
        reused = reused and compiled.folds_served > 0
        model = compiled.model
    forget_restored_epoch(model)  # a previous fold's resume
    check_train_batches(len(job.x_train), cfg.batch_size,
                        len(training_batchnorms(model, phases)), job.spec.name, job.fold)

    job.work_dir.mkdir(parents=True, exist_ok=True)
    backup_dir = job.work_dir / "backup"
    best_path = job.work_dir / "best.weights.h5"
    if phased:
        backups = [repair_backup(backup_dir / seg.name) for seg in segments]
        first_segment = max((i for i, e in enumerate(backups) if e is not None), default=0)
        resumed_from = backups[first_segment]
    else:
        resumed_from = repair_backup(backup_dir)
    resuming = resumed_from is not None
    if not resuming:
        job.history_path.unlink(missing_ok=True)
        best_path.unlink(missing_ok=True)
    else:
        trim_history(job.history_path, resumed_from)
    best = _best_so_far(job.history_path) if resuming else None
    metrics = FoldMetrics(job.x_val, job.y_val, job.fold, cfg.epochs, echo=not cfg.progress,
                          n_train=len(job.x_train))
    board = ([keras.callbacks.TensorBoard(str(job.tensorboard_dir), write_graph=False,
                                          profile_batch=0)]
             if job.tensorboard_dir is not None else [])
    common = [
        metrics,
        *board,  # after FoldMetrics: the validation metrics, LR and images/s are in its logs
        keras.callbacks.TerminateOnNaN(),
        *extra,
        keras.callbacks.ModelCheckpoint(str(best_path), monitor="val_loss", mode="min",
                                        save_best_only=True, save_weights_only=True,
                                        initial_value_threshold=best),
    ]

    def tail(backup: Path) -> list[keras.callbacks.Callback]:
        # Backup before the CSV row: a kill between the two loses a row, never repeats one.
        return [keras.callbacks.BackupAndRestore(str(backup), delete_checkpoint=False,
                                                 double_checkpoint=True),
                keras.callbacks.CSVLogger(str(job.history_path), append=True)]

    job.history_path.parent.mkdir(parents=True, exist_ok=True)
    build_seconds = time.perf_counter() - t0
    verbose = "auto" if cfg.progress else 0
    if phased:
        data_at = {job.spec.input_size: (dataset, steps, batches)}
        compiled_for = None
        for seg in segments[first_segment:]:
            if seg.size not in data_at:  # progressive resizing: the fold's rows at this size
                data_at[seg.size] = make_train_dataset(
                    job.train_images(seg.size), job.y_train, len(job.classes), cfg, job.seed,
                    weight_of_class)
            seg_data, seg_steps, seg_batches = data_at[seg.size]
            seg_batches.log_size = progressive
            if seg.phase is not compiled_for:
                _compile_phase(model, job, seg_steps, seg.phase)
                compiled_for = seg.phase
            phase = seg.phase
            forget_restored_epoch(model)  # the previous phase's resume
            log.info("fold %d: %s, epochs %d-%d%s, %s", job.fold, seg.name,
                     seg.first_epoch + 1, seg.first_epoch + seg.epochs,
                     f" at {seg.size}px" if progressive else "",
                     "every layer" + (f", layer decay {phase.layer_decay}"
                                      if phase.layer_decay else "")
                     if phase.train_backbone else "head only, backbone frozen")
            model.fit(seg_data, initial_epoch=seg.first_epoch,
                      epochs=seg.first_epoch + seg.epochs,
                      callbacks=[seg_batches, *common, *tail(backup_dir / seg.name)],
                      shuffle=False, verbose=verbose)
    else:
        model.fit(dataset, epochs=cfg.epochs, callbacks=[batches, *common, *tail(backup_dir)],
                  shuffle=False, verbose=verbose)
    train_seconds = time.perf_counter() - t0
    history = read_history(job.history_path)
    if not best_path.exists():  # val_loss never finite: keep the last weights
        model.save_weights(str(best_path))
    if cfg.predict_weights == "best":
        model.load_weights(str(best_path))
    recalibrated = recalibrate_batchnorm(model, job.x_train) if cfg.bn_recalibrate else 0
    # the fold checkpoint holds exactly the weights (and BatchNorm statistics) that predict
    predict_path = job.work_dir / "predict.weights.h5"
    model.save_weights(str(predict_path))
    views = tta_views(cfg.tta, cfg.tta_scales, cfg.tta_augment, cfg.augment,
                      job.spec.input_size, job.seed)
    val_proba = predict_proba(model, job.x_val, views)
    test_proba = predict_proba(model, job.x_test, views)
    finite = [r for r in history if isinstance(r.get("val_loss"), float)
              and math.isfinite(r["val_loss"])]
    best_epoch = min(finite, key=lambda r: r["val_loss"])["epoch"] if finite else None
    secs = metrics.seconds
    steady = float(np.median(secs[1:])) if len(secs) > 1 else 0.0
    first_extra = max(0.0, secs[0] - steady) if secs and len(secs) > 1 else 0.0
    startup = build_seconds + first_extra
    ckpt_meta = {
        "backbone": job.spec.to_dict(), "classes": job.classes, "fold": job.fold,
        "epochs_run": len(history), "best_epoch": best_epoch, "num_classes": len(job.classes),
        "bn_momentum": bn, "head_dropout": job.spec.head_dropout,
        "bn_recalibrated_layers": recalibrated,
    }
    _publish_checkpoint(predict_path, job.checkpoint_path,
                        {**ckpt_meta, "weights": cfg.predict_weights})
    if cfg.predict_weights != "best":  # ModelCheckpoint's best weights go into the run as well
        best_ckpt = job.checkpoint_path.with_name(f"fold{job.fold}.best.weights.h5")
        _publish_checkpoint(best_path, best_ckpt, {**ckpt_meta, "weights": "best"})
    predict_seconds = time.perf_counter() - t0 - train_seconds
    info = {
        "device": device, "amp": policy, "epochs_run": len(history), "best_epoch": best_epoch,
        "predict_weights": cfg.predict_weights,
        "resumed_from_epoch": resumed_from,
        "epochs_this_session": len(secs), "bn_momentum": bn, "head_dropout": job.spec.head_dropout,
        "bn_recalibrated_layers": recalibrated,
        "phases": [p.to_dict() for p in phases],
        "jit_compile": bool(model.jit_compile), "steps_per_execution": model.steps_per_execution,
        "compiled_step_reused": reused, "startup_seconds": startup,
        "build_seconds": build_seconds, "first_epoch_seconds": secs[0] if secs else None,
        "steady_epoch_seconds": steady, "train_seconds": train_seconds,
        "predict_seconds": predict_seconds, "rss_mb": _rss_mb(),
    }
    log.info("fold %d: start-up %.1fs (build %.1fs, trace %.1fs), %s, RSS %.0f MB", job.fold,
             startup, build_seconds, first_extra,
             "compiled step reused" if reused else "compiled", info["rss_mb"])
    return FoldResult(val_proba, test_proba, history, info)


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
    model = _fresh_model(job, bn)
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
