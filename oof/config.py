"""Config objects for the scripts: a YAML file gives defaults, flags override, one vocabulary.

Each script's options are a dataclass; ``parse_config`` builds the argparse parser from its
fields (help text from the field metadata), so a config key and its flag can never drift apart:
``img_size`` in YAML is ``--img-size`` on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from oof.atomic import write_text
from oof.errors import ConfigError

T = TypeVar("T")


def opt(default: Any, help: str, choices: tuple[Any, ...] | None = None, yaml_only: bool = False,
        **kw: Any) -> Any:
    """A config field with its help text (and choices) in one place."""
    meta = {"help": help, "choices": choices, "yaml_only": yaml_only}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class DatasetConfig:
    """Where the data and the run root are: shared by every script, so flags mean one thing."""

    config: str | None = opt(None, "YAML file of defaults; flags given here override it")
    data: str = opt("demo", "dataset folder or CSV; 'demo' writes the bundled digits demo")
    layout: str = opt("auto", "dataset layout", ("auto", "competition", "imagefolder", "csv"))
    test: str | None = opt(None, "csv layout: test image folder or CSV (path[,id])")
    out: str = opt("runs", "root of run folders; the dataset's run root is OUT/<dataset name>")


@dataclass
class RunConfig(DatasetConfig):
    """Everything ``run_folds.py`` needs: data, folds, backbone and training."""

    folds: int | None = opt(None, "number of stratified folds K (default 5; fixed per run root)")
    seed: int | None = opt(None, "fold seed (default 42; fixed per run root)")
    fold: int | None = opt(None, "run this fold only (manual parallelism); default all")
    backbone: str = opt("timm/resnet10t", "backbone: timm/<timm name> or keras/<application>")
    run_name: str | None = opt(None, "run folder name (default: backbone and image size)")
    pretrained: str = opt("", "'' from scratch; 'auto' framework cache/online; or a weights file")
    img_size: int | None = opt(None, "square input size in pixels (default: the backbone's)")
    batch_size: int = opt(64, "images per training step")
    epochs: int = opt(10, "training epochs per fold")
    lr: float = opt(2e-3, "peak learning rate")
    weight_decay: float = opt(0.05, "decoupled weight decay (AdamW)")
    optimizer: str = opt("adamw", "optimizer", ("adamw", "sgd"))
    schedule: str = opt("cosine", "LR schedule after warmup", ("cosine", "onecycle", "constant"))
    warmup_epochs: float = opt(1.0, "linear LR warmup length in epochs")
    label_smoothing: float = opt(0.1, "label smoothing of the cross-entropy loss")
    augment: str = opt("light", "augmentation preset (albumentations)", ("none", "light", "flip"))
    predict_weights: str = opt(
        "last", "weights that predict OOF and test: the last epoch's, or the epoch with the best "
        "val_loss (chosen on the held-out fold itself, so its OOF score is optimistic)",
        ("last", "best"))
    tta: str = opt("none", "test-time augmentation for OOF and test predictions",
                   ("none", "hflip"))
    train_seed: int | None = opt(None, "seed of weights and batches (default: the fold seed)")
    device: str = opt("auto", "auto (GPU when present), cpu or cuda[:N]")
    amp: bool = opt(True, "mixed precision on GPU (ignored on CPU)")
    num_workers: int | None = opt(None, "data loader workers (default: 0 on <=2 cores)")
    threads: int | None = opt(None, "CPU threads for the framework (default: all cores)")
    bn_momentum: float | None = opt(None, "BatchNorm momentum override (Keras convention)")
    bn_recalibrate: bool = opt(
        True, "after training, re-estimate BatchNorm statistics over the training images "
        "(precise BN): running averages lag the weights, and in short runs still hold their "
        "initial values")
    callbacks: list = opt([], "extra Keras callbacks: [{name: EarlyStopping, patience: 3}]",
                          yaml_only=True)
    progress: bool = opt(True, "show a progress bar per epoch")

    def resolved_run_name(self, img_size: int) -> str:
        if self.run_name:
            return self.run_name
        family, _, model = self.backbone.partition("/")
        return f"{family}-{model.replace('/', '-')}_{img_size}px"


def _base_type(tp: Any) -> Any:
    """``int | None`` -> int; ``list`` stays list."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("yaml_only"):
            continue
        tp = _base_type(hints[f.name])
        text = f.metadata.get("help", "")
        # defaults are SUPPRESSed (so that a YAML value is not overwritten by an untyped flag),
        # which hides them from ArgumentDefaultsHelpFormatter: show them here instead
        if f.default not in (MISSING, None, "") and "default" not in text:
            text += f" (default: {f.default})"
        kwargs: dict[str, Any] = {"help": text, "default": argparse.SUPPRESS}
        if tp is bool:
            kwargs.update(type=_bool, metavar="BOOL")
        elif tp is list:
            kwargs.update(nargs="+", metavar=f.name.upper().rstrip("S"))
        else:
            kwargs.update(type=tp, metavar=f.name.upper())
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
            kwargs.pop("metavar", None)
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, **kwargs)
    return parser


def _check_value(cls_name: str, f: dataclasses.Field, tp: Any, value: Any, source: str) -> Any:
    if value is None:
        return None
    try:
        if tp is bool and not isinstance(value, bool):
            value = _bool(str(value))
        elif tp in (int, float) and not isinstance(value, bool):
            value = tp(value)
        elif tp is str:
            value = str(value)
        elif tp is list and not isinstance(value, list):
            raise TypeError("a list")
        elif tp is dict and not isinstance(value, dict):
            raise TypeError("a mapping")
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise ConfigError(f"{source}: {f.name}={value!r} is not a valid {tp.__name__}") from exc
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{source}: {f.name}={value!r}; choose one of {list(choices)}")
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot be read ({exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def make_config(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build ``cls`` from a mapping, refusing unknown keys with the closest known names."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in values if k not in fields]
    if unknown:
        hints_txt = "; ".join(
            f"{k!r} (did you mean {', '.join(difflib.get_close_matches(k, fields, 3)) or '?'})"
            for k in unknown
        )
        raise ConfigError(f"{source}: unknown key(s) {hints_txt}")
    checked = {
        k: _check_value(cls.__name__, fields[k], _base_type(hints[k]), v, source)
        for k, v in values.items()
    }
    return cls(**checked)


def parse_config(cls: type[T], argv: list[str] | None, prog: str, description: str) -> T:
    """Defaults < ``--config FILE.yaml`` < flags."""
    parser = build_parser(cls, prog, description)
    flags = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    if flags.get("config"):
        values.update(load_yaml(flags["config"]))
        values["config"] = flags["config"]
    values.update(flags)
    return make_config(cls, values, source=f"--config {flags['config']}" if flags.get("config")
                       else "flags")


def config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: Path) -> None:
    write_text(path, yaml.safe_dump(config_dict(cfg), sort_keys=False))


def field_default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
