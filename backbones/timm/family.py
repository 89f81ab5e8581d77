"""The timm family's hooks for the fold template (``backbones.fold.Family``).

Imported by the package's ``__init__`` at registration, so it imports no torch: each hook
imports the module of its concern when called (``model``, ``data``, ``optim``, ``train``,
``resume``, ``serving``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backbones.fold import ContractExample, Family, FoldModel, FoldPlan, FoldPredictor

if TYPE_CHECKING:
    from backbones.base import BackboneSpec, FoldJob
    from oof.config import RunConfig


class TimmFamily(Family):
    """``timm/<model>``: any model of timm's registry, trained by a small PyTorch loop."""

    name = "timm"
    framework = "torch"
    checkpoint_suffix = ".safetensors"
    libraries = ("torch", "torchvision", "timm")
    predict_dtype = np.float32  # = train.PREDICT_DTYPE: float32 softmax summed over views
    predict_batch_size = 256  # = train.PREDICT_BATCH
    load_rank = 0  # torch before TensorFlow
    soft_targets = True  # the loader passes FoldJob.y_train_soft rows to the recipe loss
    #: the contract suite's model: BatchNorm trains in it, so a batch of one is refused
    example = ContractExample("timm/resnet10t", 32, bad=(("--batch-size", "1"),
                                                        ("--pretrained", "no-such.pth")))

    def versions(self) -> dict[str, str]:
        import timm
        import torch
        import torchvision

        return {"torch": torch.__version__, "torchvision": torchvision.__version__,
                "timm": timm.__version__}

    def resolve_spec(self, model_name: str, cfg: RunConfig) -> BackboneSpec:
        from backbones.timm.model import resolve_spec

        return resolve_spec(model_name, cfg)

    def setup_runtime(self, cfg: RunConfig, seed: int) -> None:
        from backbones.timm.train import setup_runtime

        setup_runtime(cfg, seed)

    def build(self, job: FoldJob, plan: FoldPlan) -> FoldModel:
        from backbones.timm.train import build

        return build(job, plan)

    def tensorboard_writer(self, path: Path) -> Any:
        from backbones.timm.train import tensorboard_writer

        return tensorboard_writer(path)

    def lr_range_test(self, job: FoldJob, lrs: np.ndarray) -> list[float]:
        from backbones.timm.train import lr_range_test

        return lr_range_test(job, lrs)

    def load_predictor(self, run_meta: dict[str, Any], checkpoint: Path,
                       threads: int | None = None, device: str = "cpu") -> FoldPredictor:
        from backbones.timm.serving import load_predictor

        return load_predictor(self, run_meta, checkpoint, threads, device)

    def read_checkpoint_meta(self, path: Path) -> dict[str, Any]:
        from backbones.timm.serving import read_checkpoint_meta

        return read_checkpoint_meta(path)
