"""The compiled Keras model of a fold, and the one kept for the next fold of the run.

Start-up: tracing and optimising the training graph costs tens of seconds on 2 cores, more than a
demo fold trains. The compiled model is therefore kept for the next fold of the same run: each
fold builds a fresh, seeded model only to copy its initial weights in, and resets the optimizer
state, so the traced step is reused instead of rebuilt. ``keras.backend.clear_session`` runs
whenever the graph would differ (another backbone or setting), so memory stays flat. A phased
fold (head, then every layer) compiles each phase itself and keeps nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backbones.base import FoldJob
from backbones.keras.model import _iter_layers, application_of, build_model
from backbones.keras.optim import (
    WarmupSchedule,
    layer_lr_scales,
    make_loss,
    make_optimizer,
    schedule_lengths,
    uses_plateau,
)
from backbones.keras.runtime import keras, runtime_in_use, seed_python
from oof.config import RunConfig
from recipe import peak_lr
from recipe.phases import Phase

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


def steps_per_execution(steps_per_epoch: int) -> int:
    """Training steps per ``fit`` call into the graph: STEPS_PER_EXECUTION, fewer for a shorter
    epoch. An epoch that is not a multiple ends with a shorter call (Keras stops the loop when
    the data ends; its progress bar still counts 23/23). Requiring a divisor, as before, fell
    back to 1 on the demo's 23 steps, and fit ran at 0.90x its bare loop instead of 0.98x.
    """
    return max(1, min(STEPS_PER_EXECUTION, steps_per_epoch))


def graph_key(job: FoldJob, bn: float, policy: str, steps_per_epoch: int) -> str:
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


def drop_compiled() -> None:
    """Forget the kept model and clear Keras' session (its graphs and names)."""
    global _COMPILED
    if _COMPILED is not None:
        _COMPILED = None
        keras.backend.clear_session()


def fresh_model(job: FoldJob, bn: float, any_size: bool = False) -> keras.Model:
    """A new, seeded model for a phased fold, after dropping any kept compiled one."""
    drop_compiled()
    seed_python(job.seed)
    return build_model(job.spec, len(job.classes), bn, any_size)


def compile_model(model: keras.Model, cfg: RunConfig, optimizer: Any,
                  steps_per_epoch: int) -> None:
    """Compile with ``optimizer`` and build its state; no decay on biases and norm scales
    (like the timm parameter groups)."""
    model.compile(
        optimizer=optimizer,
        loss=make_loss(cfg),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        steps_per_execution=steps_per_execution(steps_per_epoch),
        jit_compile="auto",  # XLA on GPU; off on CPU, where it compiles slower than it runs
    )
    if cfg.weight_decay:
        optimizer.exclude_from_weight_decay(
            var_list=[v for v in model.trainable_variables if len(v.shape) <= 1])
    optimizer.build(model.trainable_variables)


def compile_phase(model: keras.Model, job: FoldJob, steps_per_epoch: int, phase: Phase) -> None:
    """Freeze or unfreeze the application, then compile with the phase's optimiser.

    A frozen Keras BatchNormalization runs in inference mode (the transfer-learning guide's
    recipe), so the head phase keeps the pretrained statistics as they are, and so does every
    phase with ``freeze_bn`` (its BatchNorm layers alone stay frozen when the rest unfreezes).
    """
    application = application_of(model)
    application.trainable = phase.train_backbone
    if phase.train_backbone:  # set both ways: Keras does not pass an unchanged flag down
        for layer in _iter_layers(application):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = not phase.freeze_bn
    scales = layer_lr_scales(model, phase.layer_decay) if phase.layer_decay else None
    optimizer, _ = make_optimizer(job.cfg, steps_per_epoch, phase, scales)
    compile_model(model, job.cfg, optimizer, steps_per_epoch)


def _reinitialised(cached: _Compiled, fresh: keras.Model, job: FoldJob,
                   steps_per_epoch: int) -> keras.Model:
    """The kept model with ``fresh``'s initial weights and its optimizer as first built."""
    cached.model.set_weights(fresh.get_weights())
    for var, value in zip(cached.model.optimizer.variables, cached.optimizer_init, strict=True):
        var.assign(value)
    if cached.schedule is not None:
        cached.schedule.set_lengths(*schedule_lengths(job.cfg, steps_per_epoch))
    cached.folds_served += 1
    return cached.model


def compiled_model(job: FoldJob, steps_per_epoch: int, bn: float) -> tuple[keras.Model, bool]:
    """A compiled model for this fold, and whether its traced step was kept from a previous
    fold: that fold's model (re-initialised) when its graph is the same, else a new one after
    clearing the session."""
    global _COMPILED
    key = graph_key(job, bn, runtime_in_use()[1], steps_per_epoch)
    seed_python(job.seed)
    fresh = build_model(job.spec, len(job.classes), bn)
    if _COMPILED is not None and _COMPILED.key == key:
        return _reinitialised(_COMPILED, fresh, job, steps_per_epoch), True
    if _COMPILED is not None:
        drop_compiled()
        seed_python(job.seed)
        fresh = build_model(job.spec, len(job.classes), bn)
    optimizer, schedule = make_optimizer(job.cfg, steps_per_epoch)
    compile_model(fresh, job.cfg, optimizer, steps_per_epoch)
    _COMPILED = _Compiled(key, fresh, schedule,
                          [np.array(v.numpy()) for v in optimizer.variables])
    return fresh, False


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
