"""timm models: names checked against timm's registry, preprocessing from its pretrained cfg, the
model built at the run's size with a fresh head (optionally a hidden layer), pretrained weights
from timm's cache or a local file, and which BatchNorm layers train.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from backbones import close_names
from backbones.base import BackboneSpec
from backbones.callbacks import user_callbacks
from oof.config import RunConfig
from oof.errors import ConfigError
from recipe import plan_phases
from recipe.batches import check_batch_size
from recipe.phases import Phase

FRAMEWORK = "torch"


def resolve_spec(model_name: str, cfg: RunConfig) -> BackboneSpec:
    """Check the name against timm's registry and read its preprocessing from the pretrained cfg."""
    if not timm.is_model(model_name):
        raise ConfigError(
            f"--backbone timm/{model_name}: timm has no such model; closest: "
            f"{close_names(model_name, timm.list_models())}"
        )
    if cfg.pretrained not in ("", "auto") and not Path(cfg.pretrained).expanduser().is_file():
        # checked here, before images are decoded or the run folder is written
        raise ConfigError(f"--pretrained {cfg.pretrained}: no such weights file")
    user_callbacks(cfg.callbacks)  # unknown names fail before any work
    pcfg = timm.get_pretrained_cfg(model_name)
    default_size = pcfg.input_size[-1] if pcfg and pcfg.input_size else 224
    mean = tuple(pcfg.mean) if pcfg else (0.485, 0.456, 0.406)
    std = tuple(pcfg.std) if pcfg else (0.229, 0.224, 0.225)
    spec = BackboneSpec(
        name=f"timm/{model_name}", family="timm", framework=FRAMEWORK, model_name=model_name,
        input_size=int(cfg.final_img_size or default_size), mean=mean, std=std,  # type: ignore[arg-type]
        preprocessing=f"x/255, minus mean {mean}, divided by std {std} (timm pretrained cfg)",
        pretrained=cfg.pretrained, **BackboneSpec.head_options(cfg),
    )
    if cfg.batch_size < 2:  # the model's structure decides (no weights loaded)
        model = create_model(replace(spec, pretrained=""), 2)
        check_batch_size(cfg.batch_size, len(training_batchnorms(model, plan_phases(cfg))),
                         spec.name)
    return spec


def create_model(spec: BackboneSpec, num_classes: int) -> nn.Module:
    """Build the model with a fresh head; weights from scratch, timm's cache, or a local file.

    The run's image size goes to timm too: ViT, Swin and other models with position embeddings
    or fixed windows are built for it (and pretrained embeddings resampled); convolutional nets
    take no ``img_size`` and work at any size.
    """
    source = spec.pretrained
    kwargs: dict[str, Any] = {"num_classes": num_classes, "global_pool": spec.head_pool,
                              "drop_rate": spec.head_dropout}
    if spec.drop_path:
        kwargs["drop_path_rate"] = spec.drop_path
    if source not in ("", "auto"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(f"--pretrained {source}: no such weights file")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    try:
        model = _with_hidden_layer(_create_at_size(spec, pretrained=bool(source), **kwargs), spec)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - timm raises many types for "no weights"
        if not source:
            raise
        where = source if source != "auto" else "the Hugging Face / torch hub cache or online"
        raise ConfigError(
            f"--pretrained {source}: could not load weights for timm/{spec.model_name} from "
            f"{where} ({type(exc).__name__}: {str(exc)[:300]}). Offline, pass a local file: "
            "--pretrained /path/to/model.safetensors (or .pth / .bin)"
        ) from exc
    if source:
        _zero_new_head(model)
    return model


def _zero_new_head(model: nn.Module) -> None:
    """Start the new head's last layer at zero on pretrained features.

    timm initialises a fresh classifier for training from scratch: on pretrained EfficientNet
    features its logits start with a standard deviation near 3 (first-epoch loss 8-10 on 8
    classes), and those large early gradients flow into the backbone. A zero last layer starts
    at the uniform prediction (loss ln C) and still gets full gradients, as BiT does.
    """
    head = model.get_classifier()
    last = head[-1] if isinstance(head, nn.Sequential) else head
    if isinstance(last, nn.Linear):
        with torch.no_grad():
            last.weight.zero_()
            if last.bias is not None:
                last.bias.zero_()


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _with_hidden_layer(model: nn.Module, spec: BackboneSpec) -> nn.Module:
    """Replace timm's linear classifier by Linear-BatchNorm-activation-dropout-Linear when
    ``head_hidden`` asks for one (timm's pooling and pre-logits dropout stay in place)."""
    if not spec.head_hidden:
        return model
    old = model.get_classifier()
    if not isinstance(old, nn.Linear):
        raise ConfigError(f"--head-hidden: timm/{spec.model_name}'s classifier is a "
                          f"{type(old).__name__}, not a Linear layer to extend")
    head = nn.Sequential(
        nn.Linear(old.in_features, spec.head_hidden), nn.BatchNorm1d(spec.head_hidden),
        ACTIVATIONS[spec.head_activation](), nn.Dropout(spec.head_dropout),
        nn.Linear(spec.head_hidden, old.out_features))
    path = model.pretrained_cfg.get("classifier") or ""
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if getattr(parent, attr, None) is not old:
        raise ConfigError(f"--head-hidden: cannot find timm/{spec.model_name}'s classifier")
    setattr(parent, attr, head)
    return model


def _create_at_size(spec: BackboneSpec, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with ``img_size`` where the model takes one; a model without
    stochastic depth refuses ``--drop-path`` clearly."""
    try:
        return _create_sized(spec, **kwargs)
    except TypeError as exc:
        if "drop_path_rate" in str(exc):
            raise ConfigError(f"--drop-path {spec.drop_path}: timm/{spec.model_name} has no "
                              "stochastic depth (drop_path_rate); leave --drop-path at 0") from exc
        raise


def _create_sized(spec: BackboneSpec, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(spec.model_name, img_size=spec.input_size, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
    except (AssertionError, ValueError, RuntimeError) as exc:
        if "size" in str(exc).lower() or "divisible" in str(exc).lower():
            raise ConfigError(f"--img-size {spec.input_size}: timm/{spec.model_name} cannot be "
                              f"built at this size ({type(exc).__name__}: {str(exc)[:200]})"
                              ) from exc
        raise
    return timm.create_model(spec.model_name, **kwargs)


def pick_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def training_batchnorms(model: nn.Module, phases: list[Phase]) -> list[nn.Module]:
    """The BatchNorm layers that normalise by batch statistics in some of ``phases``: a hidden
    head layer's always, the backbone's unless every phase that trains the backbone freezes
    them (``freeze_bn``)."""
    head = set(model.get_classifier().modules())
    backbone = any(p.train_backbone and not p.freeze_bn for p in phases)
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (backbone or m in head)]


