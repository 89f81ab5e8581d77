"""What every backbone family hands the rest of foldstack: a spec, a fold's inputs and result
(the family's interface itself is ``backbones.fold.Family``).

Framework-free on purpose: the runner, the tests and the scripts import this module, never torch or
tensorflow. Preprocessing travels with the spec (like timm's ``PretrainedCfg``), so the data
pipeline asks the backbone for input size, mean and std instead of guessing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from oof.config import RunConfig


@dataclass(frozen=True)
class BackboneSpec:
    """A resolved backbone: what to build and how its inputs must look."""

    name: str  # "timm/resnet10t", "keras/EfficientNetB0"
    family: str  # "timm" | "keras"
    framework: str  # "torch" | "tensorflow"
    model_name: str
    input_size: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # on the 0..1 scale
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    preprocessing: str = ""  # how raw 0..255 RGB becomes model input, in words
    pretrained: str = ""  # '' (scratch), 'auto', or a file
    # the new classification head: pooling, dropout, optional hidden layer (BatchNorm + act)
    head_pool: str = "avg"  # avg | max | avgmax | catavgmax
    head_dropout: float = 0.2
    head_hidden: int = 0
    head_activation: str = "relu"
    drop_path: float = 0.0  # stochastic depth rate of the backbone's residual branches

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def head_options(cfg: RunConfig) -> dict[str, Any]:
        """The model-structure config keys (``head_*``, ``drop_path``), as the spec fields every
        backend builds the model from."""
        return {"head_pool": cfg.head_pool, "head_dropout": cfg.head_dropout,
                "head_hidden": cfg.head_hidden, "head_activation": cfg.head_activation,
                "drop_path": cfg.drop_path}


@dataclass
class FoldJob:
    """One fold's inputs: uint8 RGB images (N, H, W, 3), integer labels, where to write."""

    spec: BackboneSpec
    cfg: RunConfig
    fold: int
    classes: list[str]
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    checkpoint_path: Path  # final weights of the fold, written atomically
    work_dir: Path  # scratch for resumable state; removed by the runner when the fold is done
    history_path: Path  # per-epoch CSV, may be written live
    seed: int = 0
    # progressive resizing: the fold's training rows decoded at another size (from the cache)
    train_images_at: Callable[[int], np.ndarray] | None = None
    tensorboard_dir: Path | None = None  # event files of this fold, when asked for
    # --distill-from: (rows, C) float targets of the training rows (rows as y_train, which keeps
    # the hard labels); None = the one-hot of y_train. Only families with soft_targets get them
    y_train_soft: np.ndarray | None = None

    def __post_init__(self) -> None:
        # soft targets carry their own label smoothing, on their one-hot part only
        # (oof.distill.mix_targets): the loss, which smooths every target, must not smooth again
        if self.y_train_soft is not None and self.cfg.label_smoothing:
            self.cfg = replace(self.cfg, label_smoothing=0.0)

    def train_targets(self) -> np.ndarray:
        """What the training rows learn: ``y_train_soft`` (rows, C) when given, else the class
        indices ``y_train``."""
        return self.y_train if self.y_train_soft is None else self.y_train_soft

    def train_images(self, size: int) -> np.ndarray:
        """The training rows at ``size`` px: ``x_train`` itself at the spec's size."""
        if size == self.spec.input_size:
            return self.x_train
        if self.train_images_at is None:
            raise ValueError(f"fold {self.fold}: no training images at {size}px were provided")
        return self.train_images_at(size)


@dataclass
class FoldResult:
    """What a backend returns: held-out and test probabilities, per-epoch history, timings."""

    val_proba: np.ndarray
    test_proba: np.ndarray
    history: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    # --tta-save-views: {"names": [view names], "val": (V, n_val, C), "test": (V, n_test, C)},
    # each view's probabilities alone (val_proba / test_proba average them)
    views: dict[str, Any] | None = None

