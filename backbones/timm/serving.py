"""timm fold checkpoints: safetensors with the fold's metadata in the header, and a fold model
loaded back for serving (the run's preprocessing and TTA views, the same prediction loop)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from backbones.base import BackboneSpec
from backbones.fold import FoldPredictor, run_views
from backbones.timm.model import create_model, pick_device
from backbones.timm.train import Trainer
from oof.atomic import atomic_path
from oof.config import RunConfig

if TYPE_CHECKING:
    from backbones.fold import Family


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Weights with their metadata inside (like timm's CheckpointSaver), written atomically.

    safetensors, not ``torch.save``: a server loads these files, and a pickle can run code on
    load; the metadata travels as JSON in the safetensors header (``read_checkpoint_meta``).
    """
    from safetensors.torch import save_model

    with atomic_path(path) as tmp:
        save_model(model, str(tmp), metadata={"foldstack": json.dumps(meta, default=str)})


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The metadata ``save_checkpoint`` put in a fold checkpoint's safetensors header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return json.loads((fh.metadata() or {}).get("foldstack", "{}"))


def load_predictor(family: Family, run_meta: dict[str, Any], checkpoint: Path,
                   threads: int | None = None, device: str = "cpu") -> FoldPredictor:
    """Load fold model ``checkpoint`` (safetensors) of the run described by ``run_meta``.

    ``threads`` caps torch's intra-op pool, so a Keras model in the same process keeps its cores.
    """
    from safetensors.torch import load_model

    from oof.config import make_config

    if threads:
        torch.set_num_threads(threads)
    meta = read_checkpoint_meta(checkpoint)
    spec = BackboneSpec(**{**run_meta["backbone"], "pretrained": ""})
    model = create_model(spec, len(run_meta["classes"]))
    load_model(model, str(checkpoint), strict=True, device="cpu")
    cfg = make_config(RunConfig, {"backbone": spec.name, "ema": False, "device": device})
    trainer = Trainer(model, spec, cfg, pick_device(cfg), 1)
    trainer.before_predict()
    return FoldPredictor(family, trainer, run_views(run_meta, meta, spec.input_size), meta,
                         spec.input_size, len(run_meta["classes"]))
