"""The Keras family's hooks for the fold template (``backbones.fold.Family``).

Imported by the package's ``__init__`` at registration, so it imports no TensorFlow: each hook
imports the module of its concern when called, and ``runtime`` is always the first of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backbones.fold import ContractExample, Family, FoldModel, FoldPlan, FoldPredictor

if TYPE_CHECKING:
    from backbones.base import BackboneSpec, FoldJob
    from backbones.callbacks import Callback
    from oof.config import RunConfig


class KerasFamily(Family):
    """``keras/<application>``: the models of ``keras.applications``, trained by ``fit``."""

    name = "keras"
    framework = "tensorflow"
    checkpoint_suffix = ".weights.h5"
    soft_targets = True  # EpochBatches hands FoldJob.y_train_soft rows to the loss
    libraries = ("tensorflow", "keras")
    predict_dtype = np.float64  # the views' probabilities are summed in float64
    predict_batch_size = 256  # = serving.PREDICT_BATCH
    publishes_best_checkpoint = True  # ModelCheckpoint's best weights went into runs: they stay
    progress_prints_epochs = True  # Keras' progress bar shows the epoch's numbers
    load_rank = 1  # after torch: torchvision or triton imported after TensorFlow aborts
    #: the contract suite's model (the smallest application; 32 px is its minimum): BatchNorm
    #: trains in it, so a batch of one is refused; Keras fixes stochastic depth itself
    example = ContractExample("keras/MobileNetV3Small", 32, bad=(
        ("--batch-size", "1"), ("--drop-path", "0.1"), ("--pretrained", "no-such.weights.h5")))

    def load(self) -> None:
        """TensorFlow, through ``runtime``: its log level set before it loads."""
        import backbones.keras.runtime  # noqa: F401

    def versions(self) -> dict[str, str]:
        from backbones.keras.runtime import versions

        return versions()

    def resolve_spec(self, model_name: str, cfg: RunConfig) -> BackboneSpec:
        from backbones.keras.model import resolve_spec

        return resolve_spec(model_name, cfg)

    def setup_runtime(self, cfg: RunConfig, seed: int) -> None:
        """Threads, device, precision. The seed is the model's: ``build`` seeds right before
        it builds one (a kept compiled model takes the fresh model's weights)."""
        from backbones.keras.runtime import configure_runtime

        configure_runtime(cfg)

    def build(self, job: FoldJob, plan: FoldPlan) -> FoldModel:
        from backbones.keras.train import build

        return build(job, plan)

    def user_callbacks(self, cfg: RunConfig) -> list[Callback]:
        """None for the template: the user's callbacks are Keras callbacks, run inside ``fit``
        (``build`` refuses bad names before any work)."""
        return []

    def lr_range_test(self, job: FoldJob, lrs: np.ndarray) -> list[float]:
        from backbones.keras.train import lr_range_test

        return lr_range_test(job, lrs)

    def load_predictor(self, run_meta: dict[str, Any], checkpoint: Path,
                       threads: int | None = None, device: str = "cpu") -> FoldPredictor:
        from backbones.keras.serving import load_predictor

        return load_predictor(self, run_meta, checkpoint, threads, device)

    def read_checkpoint_meta(self, path: Path) -> dict[str, Any]:
        from backbones.keras.serving import read_checkpoint_meta

        return read_checkpoint_meta(path)
