"""Optimisation for Keras: the recipe's LR curve as a schedule, the named optimiser with
layer-wise LR scales, and the loss."""

from __future__ import annotations

from typing import Any

import numpy as np

from backbones.keras.model import _iter_layers, application_of
from backbones.keras.runtime import keras, tf
from oof.config import RunConfig
from oof.errors import ConfigError
from recipe import lr_table, peak_lr, phase_lengths
from recipe.phases import Phase

# ------------------------------------------------------------------------------ optimisation


@keras.saving.register_keras_serializable("foldstack")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The peak LR times ``recipe.lr_factor``, looked up per step in a table the recipe computed:
    the curve is defined once, in Python, for both frameworks. The table is a variable of any
    length, so a traced step serves folds whose step counts differ."""

    def __init__(self, peak: float, total: int, warmup: int, schedule: str) -> None:
        self.peak, self.schedule = float(peak), schedule
        self.total, self.warmup = int(total), int(warmup)
        self.table = tf.Variable(np.asarray(lr_table(total, warmup, schedule), np.float32),
                                 shape=tf.TensorShape([None]), trainable=False)

    def set_lengths(self, total: int, warmup: int) -> None:
        self.total, self.warmup = int(total), int(warmup)
        self.table.assign(np.asarray(lr_table(total, warmup, self.schedule), np.float32))

    def __call__(self, step: Any) -> Any:
        last = tf.shape(self.table, out_type=tf.int64)[0] - 1
        index = tf.minimum(tf.cast(step, tf.int64), last)
        return self.peak * tf.gather(self.table, index)

    def get_config(self) -> dict[str, Any]:
        return {"peak": self.peak, "total": self.total, "warmup": self.warmup,
                "schedule": self.schedule}


def schedule_lengths(cfg: RunConfig, steps_per_epoch: int) -> tuple[int, int]:
    """Total and warmup steps exactly as the timm loop counts them."""
    return phase_lengths(cfg.epochs, cfg.warmup_epochs, steps_per_epoch)


def uses_plateau(cfg: RunConfig) -> bool:
    return any(isinstance(c, dict) and c.get("name") == "ReduceLROnPlateau"
               for c in cfg.callbacks)


def make_optimizer(cfg: RunConfig, steps_per_epoch: int, phase: Phase | None = None,
                   lr_scales: list[float] | None = None, fixed_lr: float | None = None
                   ) -> tuple[Any, WarmupSchedule | None]:
    """The named Keras optimiser (decoupled decay, none on biases/norms), timm's settings.

    ``phase``: the fine-tuning phase it serves (its peak LR, length and warmup; default: the
    whole run at ``--lr``); ``lr_scales``: one LR multiplier per trainable variable, in the
    order ``build`` receives them (layer-wise decay); ``fixed_lr``: a plain LR variable the
    caller sets (the LR range test).
    """
    peak = peak_lr(cfg) if phase is None else phase.lr
    epochs = cfg.epochs if phase is None else phase.epochs
    warmup_epochs = cfg.warmup_epochs if phase is None else phase.warmup_epochs
    schedule: WarmupSchedule | None = None
    if fixed_lr is not None:
        lr: Any = fixed_lr
    elif uses_plateau(cfg):  # ReduceLROnPlateau must be able to set the LR: a plain variable
        if cfg.schedule != "constant" or cfg.warmup_epochs:
            raise ConfigError("callback ReduceLROnPlateau sets the LR itself: use it with "
                              "--schedule constant --warmup-epochs 0")
        lr = peak
    else:
        schedule = WarmupSchedule(peak, *phase_lengths(epochs, warmup_epochs, steps_per_epoch),
                                  cfg.schedule)
        lr = schedule
    decay = cfg.weight_decay or None
    # EMA of the weights: Keras swaps the average in when fit ends (finalize_variable_values)
    ema = {"use_ema": True, "ema_momentum": cfg.ema_decay} if cfg.ema else {}
    cls = {"sgd": keras.optimizers.SGD, "adamw": keras.optimizers.AdamW,
           "adam": keras.optimizers.Adam, "nadam": keras.optimizers.Nadam,
           "rmsprop": keras.optimizers.RMSprop, "lamb": keras.optimizers.Lamb,
           "lion": keras.optimizers.Lion, "adamax": keras.optimizers.Adamax}[cfg.optimizer]
    kwargs = {"momentum": 0.9, "nesterov": True} if cfg.optimizer == "sgd" else {}
    if lr_scales is not None:
        cls = _layer_scaled(cls)
    # Keras decays every optimiser decoupled from the gradient, as AdamW does
    opt = cls(lr, weight_decay=decay, **kwargs, **ema)
    if lr_scales is not None:
        opt.lr_scales = list(lr_scales)
    return opt, schedule


_SCALED: dict[type, type] = {}


def _layer_scaled(cls: type) -> type:
    """``cls`` whose update of variable i uses ``learning_rate * lr_scales[i]``.

    Keras optimisers have one LR; layer-wise decay (timm's ``layer_decay``) needs one per layer
    group. Scaling the gradient would not do for Adam-like optimisers (the update is normalised),
    so the LR handed to ``update_step`` is scaled, per variable, as timm's ``lr_scale`` does.
    """
    if cls not in _SCALED:
        def update_step(self: Any, gradient: Any, variable: Any, learning_rate: Any) -> Any:
            scale = self.lr_scales[self._get_variable_index(variable)]
            return cls.update_step(self, gradient, variable, learning_rate * scale)

        _SCALED[cls] = type(f"LayerScaled{cls.__name__}", (cls,),
                            {"update_step": update_step})
    return _SCALED[cls]


def layer_lr_scales(model: keras.Model, decay: float, groups: int = 12) -> list[float]:
    """One LR multiplier per trainable variable: the application's layers are cut into
    ``groups`` equal groups by depth, scaled ``decay ** (groups - g)``; the head keeps 1."""
    base = application_of(model)
    depth: dict[int, int] = {}
    weighted = [ly for ly in _iter_layers(base) if ly is not base and ly.trainable_weights
                and not getattr(ly, "layers", None)]
    for i, layer in enumerate(weighted):
        group = i * groups // max(1, len(weighted))
        for v in layer.trainable_weights:
            depth[id(v)] = group
    return [decay ** (groups - depth[id(v)]) if id(v) in depth else 1.0
            for v in model.trainable_variables]


def make_loss(cfg: RunConfig) -> keras.losses.Loss:
    """The recipe's loss (recipe/losses.py) from Keras' own classes; class weights come as
    sample weights from the dataset (``make_train_dataset``)."""
    if cfg.loss == "focal":  # alpha 1: the class weights do the balancing, as in timm
        return keras.losses.CategoricalFocalCrossentropy(
            alpha=1.0, gamma=cfg.focal_gamma, label_smoothing=cfg.label_smoothing)
    return keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing)
