"""Config objects for the scripts: a YAML file gives defaults, flags override, one vocabulary.

Each script's options are a pydantic dataclass; ``parse_config`` builds the argparse parser from
its fields (help text from the field metadata), so a config key and its flag can never drift
apart: ``img_size`` in YAML is ``--img-size`` on the command line. Types and ranges are declared
once, on the field's annotation (``epochs: PositiveInt``), and pydantic checks them for YAML,
flags and Python callers alike: ``epochs: 1.9``, ``epochs: true`` or ``lr: -0.01`` never reach a
backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import MISSING, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pydantic
import yaml
from pydantic import BeforeValidator, Field

from oof.atomic import write_text
from oof.errors import ConfigError

T = TypeVar("T")


def _not_bool(value: Any) -> Any:
    """YAML ``true`` is not a number (pydantic's lax mode would read it as 1)."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")
    return value


_NUMBER = BeforeValidator(_not_bool)
PositiveInt = Annotated[int, _NUMBER, Field(ge=1)]
NonNegativeInt = Annotated[int, _NUMBER, Field(ge=0)]
PositiveFloat = Annotated[float, _NUMBER, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, _NUMBER, Field(ge=0, allow_inf_nan=False)]
OpenFraction = Annotated[float, _NUMBER, Field(gt=0, lt=1)]  # momentum
Fraction = Annotated[float, _NUMBER, Field(gt=0, le=1)]
Smoothing = Annotated[float, _NUMBER, Field(ge=0, lt=1)]
ImageSize = Annotated[int, _NUMBER, Field(ge=8, le=4096)]
FoldCount = Annotated[int, _NUMBER, Field(ge=2)]
Name = Annotated[str, Field(min_length=1)]


def _sizes(value: Any) -> Any:
    """``--img-size 128,160,224`` or ``[128, 160, 224]`` -> a list; one size stays a number."""
    if isinstance(value, str) and "," in value:
        value = [v.strip() for v in value.split(",")]
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


ImageSizes = Annotated[ImageSize | list[ImageSize], BeforeValidator(_sizes)]

#: the probe family's fold heads (``--probe-head``; fitted in backbones/probe/heads.py)
PROBE_HEADS = ("logreg", "lda")

#: every config class is a pydantic dataclass with this behaviour
config_dataclass = pydantic.dataclasses.dataclass(
    config=pydantic.ConfigDict(extra="forbid", validate_default=True))


def opt(default: Any, help: str, choices: tuple[Any, ...] | None = None, yaml_only: bool = False,
        const: Any = None, short: str | None = None, positional: bool = False,
        metavar: str | None = None, **kw: Any) -> Any:
    """A config field with its help text (and choices) in one place; ``const`` is the value
    of its flag given alone; ``short`` a one-letter flag beside the long one (``-v``).

    ``default=REQUIRED``: the field must be given (a required flag, or with ``positional`` an
    argument without a flag, ``predict.py STACK_DIR``); such fields are keyword-only, so they
    may follow fields with defaults. ``metavar``: its name in ``--help``."""
    meta = {"help": help, "choices": choices, "yaml_only": yaml_only, "const": const,
            "short": short, "positional": positional, "metavar": metavar}
    if default is REQUIRED:
        return field(metadata=meta, kw_only=True, **kw)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


#: ``opt(REQUIRED, ...)``: a field without a default
REQUIRED: Any = MISSING


@config_dataclass
class ConfigFile:
    """``--config FILE.yaml``: the defaults file every script takes (flags override it)."""

    config: str | None = opt(None, "YAML file of defaults; flags given here override it")


@config_dataclass
class DatasetConfig(ConfigFile):
    """Where the data and the run root are: shared by every script, so flags mean one thing."""

    data: Name = opt("demo", "dataset folder or CSV; 'demo' writes the bundled digits "
                         "demo, 'demo-fashion' the Fashion-MNIST one (Debian package)")
    layout: str = opt("auto", "dataset layout", ("auto", "competition", "imagefolder", "csv"))
    test: str | None = opt(None, "csv layout: test image folder or CSV (path[,id])")
    out: Name = opt("runs", "root of run folders; the dataset's run root is OUT/<dataset name>")


@config_dataclass
class RunConfig(DatasetConfig):
    """Everything ``run_folds.py`` needs: data, folds, backbone and training."""

    folds: FoldCount | None = opt(None, "number of stratified folds K (default 5; fixed per run "
                                        "root)")
    seed: NonNegativeInt | None = opt(None, "fold seed (default 42; fixed per run root)")
    folds_group: str | None = opt(
        None, "keep near-duplicate images in one fold: 'phash' groups them by perceptual hash "
        "(StratifiedGroupKFold); default 'none' (fixed per run root)", ("none", "phash"))
    fold: NonNegativeInt | None = opt(None, "run this fold only (manual parallelism); default all")
    backbone: Name = opt("timm/resnet10t", "backbone: timm/<timm name>, keras/<application> or "
                       "probe/<timm name> (frozen features + a --probe-head per fold)")
    lr_find: bool = opt(False, "run the LR range test on fold 0's training rows instead of "
                        "training: plot and suggested --lr in the run folder's lr_find/")
    write_augment: str | None = opt(
        None, "write the --augment pipeline at the predicting size to this .yaml/.json file "
        "(albumentations.save) instead of training: edit it, then train with --augment FILE")
    run_name: str | None = opt(None, "run folder name (default: backbone and image size)")
    pretrained: str = opt("", "'' from scratch; 'auto' framework cache/online; or a weights file")
    img_size: ImageSizes | None = opt(
        None, "square input size in pixels (default: the backbone's); several sizes, e.g. "
        "128,160,224, train at each in turn (progressive resizing), and the last one predicts")
    img_size_epochs: list[PositiveInt] = opt(
        [], "progressive resizing: epochs at each --img-size (default: --epochs split evenly, "
        "the remainder to the last size)")
    resize: str = opt("squash", "how an image becomes a square in the decoded cache: squash the "
                      "whole frame, or keep the aspect ratio and crop the centre or pad",
                      ("squash", "crop", "pad"))
    batch_size: PositiveInt = opt(32, "images per training step")
    epochs: PositiveInt = opt(10, "training epochs per fold")
    lr: PositiveFloat | None = opt(
        None, "peak learning rate (default: 1e-3 with pretrained weights, 2e-3 from scratch)")
    head_pool: str = opt("avg", "head: global pooling of the last feature map",
                         ("avg", "max", "avgmax", "catavgmax"))
    head_dropout: Smoothing = opt(0.2, "head: dropout before the classifier")
    head_hidden: NonNegativeInt = opt(
        0, "head: width of a hidden layer (Linear/Dense, BatchNorm, activation) before the "
        "classifier; 0 = none")
    head_activation: str = opt("relu", "head: activation of the hidden layer",
                               ("relu", "gelu", "silu", "tanh"))
    probe_head: str = opt(
        "logreg", "probe/<timm model>: the classifier fitted per fold on the frozen features: "
        "logreg (L2 logistic regression, C chosen by inner stratified CV on the fold's training "
        "rows) or lda (linear discriminant analysis, Ledoit-Wolf shrinkage)", PROBE_HEADS)
    probe_feature_store: bool = opt(
        True, "probe/<timm model>: compute each image's frozen features once per extractor and "
        "TTA view, in <run root>/cache/features/, and read them in every fold, the refit and "
        "other probe runs of the same extractor (K times fewer passes; the same features on "
        "CPU); false: a pass per fold, nothing stored")
    head_epochs: NonNegativeInt | None = opt(
        None, "fine-tuning: first epochs train only the new head on the frozen backbone "
        "(BatchNorm frozen too); part of --epochs (default: 1 with pretrained weights, else 0)")
    head_lr: PositiveFloat | None = opt(None, "peak LR of the head epochs (default: --lr)")
    layer_decay: Fraction | None = opt(
        None, "fine-tuning: LR multiplier per layer group from the head down, after the head "
        "epochs; 1 = one LR (default: 0.8 with pretrained weights, else 1)")
    freeze_bn: bool | None = opt(
        None, "fine-tuning: the backbone's BatchNorm layers stay frozen in every phase "
        "(pretrained statistics, scale and shift; inference mode), as the Keras transfer-"
        "learning guide does (default: true with pretrained weights, false from scratch)")
    weight_decay: NonNegativeFloat = opt(0.05, "decoupled weight decay (AdamW)")
    optimizer: str = opt("adamw", "optimizer (timm's create_optimizer_v2 / keras.optimizers); "
                         "sgd is Nesterov momentum 0.9",
                         ("adamw", "sgd", "adam", "nadam", "rmsprop", "lamb", "lion", "adamax"))
    schedule: str = opt("cosine", "LR curve after warmup (recipe.lr_factor): cosine to 1 %, "
                        "onecycle (to 1e-4), cyclic (3 cosine warm restarts), step (x0.1 at 50 "
                        "and 75 %) or constant; plateau: constant + a ReduceLROnPlateau callback",
                        ("cosine", "onecycle", "cyclic", "step", "constant"))
    warmup_epochs: NonNegativeFloat = opt(1.0, "linear LR warmup length in epochs")
    label_smoothing: Smoothing = opt(0.1, "label smoothing of the loss's targets (a distilled "
                                  "student's: of their one-hot part only)")
    loss: str = opt("ce", "training loss: ce (cross-entropy) or focal (each image's loss times "
                    "(1 - p_true)^gamma: hard images count more)", ("ce", "focal"))
    focal_gamma: NonNegativeFloat = opt(2.0, "focal loss: gamma (0 = cross-entropy)")
    class_weights: str | dict[str, PositiveFloat] = opt(
        "none", "loss weight per class: none, balanced (n / (K * n_class) over the fold's "
        "training images) or CLASS=W,CLASS=W (others weigh 1; a mapping in YAML)")
    drop_path: Smoothing = opt(0.0, "stochastic depth: drop rate of residual branches (timm "
                               "drop_path_rate; refused by models without one, and by Keras, "
                               "whose applications fix it: EfficientNet 0.2, ConvNeXt 0)")
    augment: Name = opt("light", "augmentation (albumentations): a preset none|light|flip|"
                        "medium|strong, or a pipeline file (.json/.yaml) written by "
                        "albumentations.save")
    predict_weights: str = opt(
        "last", "weights that predict OOF and test: the last epoch's, or the epoch with the best "
        "val_loss (chosen on the held-out fold itself, so its OOF score is optimistic)",
        ("last", "best"))
    mixup_alpha: NonNegativeFloat = opt(0.0, "mixup: Beta(alpha, alpha) blend of image pairs "
                                        "and their labels (0 = off; 0.2-0.4 typical)")
    cutmix_alpha: NonNegativeFloat = opt(0.0, "cutmix: paste a Beta(alpha, alpha)-sized box from "
                                         "another image (0 = off; 1.0 typical)")
    mix_prob: Fraction = opt(1.0, "probability that a training batch is mixed")
    ema: bool = opt(False, "predict with an exponential moving average of the weights (timm "
                    "ModelEmaV3 with warmup; Keras optimizer EMA)")
    ema_decay: OpenFraction = opt(0.999, "EMA decay per step (timm warms it up from 0)")
    tta: str = opt("none", "test-time flips averaged for OOF and test predictions alike: none, "
                   "hflip (plus the mirror) or flips (plus vertical and both)",
                   ("none", "hflip", "flips"))
    tta_scales: list[Annotated[float, _NUMBER, Field(gt=1, le=2)]] = opt(
        [], "extra test-time views zoomed in by these factors (centre crop), e.g. 1.15")
    tta_augment: NonNegativeInt = opt(
        0, "extra test-time views drawn at random from the --augment pipeline (seeded)")
    tta_save_views: bool = opt(
        False, "also store each TTA view's held-out and test probabilities (views_oof.parquet, "
        "views_test_folds.parquet), so a stack can choose views by their OOF; from the same "
        "passes as the mean (the probe: a head per view on stored features)")
    train_seed: NonNegativeInt | None = opt(
        None, "seed of weights and batches (default: the fold seed)")
    device: str = opt("auto", "auto (GPU when present), cpu or cuda[:N]")
    amp: bool = opt(True, "mixed precision on GPU (ignored on CPU)")
    num_workers: NonNegativeInt | None = opt(None, "data loader workers (default: 0 on <=2 cores)")
    threads: PositiveInt | None = opt(
        None, "CPU threads of each fold job (torch / TensorFlow intra-op); the count orders the "
        "float sums, so it is recorded with the run and a rerun with another is refused "
        "(default: OMP_NUM_THREADS if set, else the cores this process may use)")
    bn_momentum: OpenFraction | None = opt(None, "BatchNorm momentum override (Keras convention)")
    bn_recalibrate: bool = opt(
        True, "after training, re-estimate BatchNorm statistics over the training images "
        "(precise BN): running averages lag the weights, and in short runs still hold their "
        "initial values")
    callbacks: list = opt([], "extra Keras callbacks: [{name: EarlyStopping, patience: 3}]",
                          yaml_only=True)
    progress: bool = opt(True, "show progress bars (decoding the images, each epoch)")
    verbose: bool = opt(
        False, "show the frameworks' own log lines (TensorFlow's C++ logs, e.g. 'failed call "
        "to cuInit' on a machine without a GPU), hidden by default; a TF_CPP_MIN_LOG_LEVEL "
        "set in the environment is obeyed either way", short="-v")
    extra_train: str | None = opt(
        None, "an external labelled dataset (any layout) whose images join every fold's "
        "TRAINING side, never a held-out one; its classes must be this dataset's, or mapped "
        "with --extra-train-classes")
    extra_train_classes: str = opt(
        "", "map the external set's class names: THEIRS=OURS,... (unlisted names must match)")
    pseudo_labels: str | None = opt(
        None, "stack folder (stack.py's output) whose leak-free per-fold test predictions label "
        "confident test images for each fold's TRAINING side: fold k's come only from models "
        "that never saw fold k")
    pseudo_threshold: Fraction = opt(0.95, "pseudo-labels: least ensemble confidence of a test "
                                     "image to join training")
    refit_full: bool = opt(
        False, "after the K folds, train one more model on ALL training rows (same recipe, "
        "stopped at the epoch count the folds used) that can serve in place of the K fold "
        "models; it has no OOF of its own (the run's OOF estimates it); resumable, never redone")
    remeasure_cost: bool = opt(
        False, "time a finished run's prediction again on this machine, now (ms_per_image in "
        "meta.json, its refit model's too; best of 3 calls after a warm-up), e.g. when the "
        "machine was busy as training ended; nothing is retrained. A stack records its runs' "
        "costs when written: rerun stack.py after")
    distill_from: str | None = opt(
        None, "stack folder (stack.py's output, on this run root's folds) whose out-of-fold "
        "probabilities are this run's training targets (a distilled student): each training "
        "row's target is the stack's OOF row, made without that row's labels")
    distill_alpha: Annotated[float, _NUMBER, Field(ge=0, le=1)] = opt(
        0.5, "distillation: weight of the one-hot label in each target (1 = hard labels only, "
        "0 = the stack's probabilities only)")
    distill_temperature: PositiveFloat = opt(
        1.0, "distillation: the stack's probabilities p become p^(1/T) renormalised before "
        "mixing (T > 1 softens them)")
    tensorboard: bool = opt(False, "TensorBoard event files per fold in the run folder's "
                            "tensorboard/foldK (loss, accuracy, LR, images/s, val metrics)")
    mlflow: str = opt("", "track the run in MLflow: a tracking URI (http://host:5000, "
                      "sqlite:///mlflow.db) or a local folder; --mlflow alone means ./mlruns; "
                      "'' = off", const="mlruns")

    @property
    def final_img_size(self) -> int | None:
        """The size that predicts (the last of a progressive list), or None for the default."""
        return self.img_size[-1] if isinstance(self.img_size, list) else self.img_size

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


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def _bool(text: str) -> bool:
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """The argparse parser of a config class: one flag per field (``img_size`` ->
    ``--img-size``), help and choices from ``opt``; every default is left to the class."""
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
        required = f.default is MISSING and f.default_factory is MISSING
        # defaults are SUPPRESSed (so that a YAML value is not overwritten by an untyped flag),
        # which hides them from ArgumentDefaultsHelpFormatter: show them here instead
        if f.default not in (MISSING, None, "") and "default" not in text:
            text += f" (default: {f.default})"
        kwargs: dict[str, Any] = {"help": text.replace("%", "%%"), "default": argparse.SUPPRESS}
        if required and not f.metadata.get("positional"):
            kwargs["required"] = True
        if tp is bool:  # "--lr-find" alone means true; "--progress false" still works
            kwargs.update(type=_bool, metavar="BOOL", nargs="?", const=True)
        elif tp is list or typing.get_origin(tp) is list:
            item = (typing.get_args(tp) or (str,))[0]
            kwargs.update(nargs="+", metavar=f.name.upper().rstrip("S"),
                          type=item if item in (int, float) else None)
        else:
            kwargs.update(type=tp, metavar=f.name.upper())
        if f.metadata.get("const") is not None:
            kwargs.update(nargs="?", const=f.metadata["const"])
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
            kwargs.pop("metavar", None)
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        if f.metadata.get("positional"):
            parser.add_argument(f.name, **kwargs)
            continue
        flags = [f.metadata["short"]] if f.metadata.get("short") else []
        parser.add_argument(*flags, "--" + f.name.replace("_", "-"), **kwargs)
    return parser


def bool_flags_alone(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--allow-version-mismatch STACK_DIR`` means the flag alone: a ``[BOOL]`` flag takes the
    next word only when it is a true/false word (``--progress false``), so an argument without
    a flag after it is not read as its value."""
    bools = {s for a in parser._actions if a.type is _bool for s in a.option_strings}
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        nxt = out[i + 1]
        if arg == "--":
            break
        if arg in bools and not nxt.startswith("-") and nxt.lower() not in (*TRUE_WORDS,
                                                                           *FALSE_WORDS):
            out[i] = f"{arg}=true"
    return out


def _check_choice(f: dataclasses.Field, value: Any, source: str) -> None:
    choices = f.metadata.get("choices")
    if choices and value is not None and value not in choices:
        raise ConfigError(f"{source}: {f.name}={value!r}; choose one of {list(choices)}")


def validation_message(exc: pydantic.ValidationError, source: str,
                       flags: frozenset[str] = frozenset(),
                       positional: dict[str, str] | None = None) -> str:
    """One line per bad key: where it came from (``--epochs`` or the YAML file), its value and
    what was expected. ``positional``: field -> its name in ``--help`` (``STACK_DIR``)."""
    positional = positional or {}
    lines = []
    errors = exc.errors()
    by_field: dict[str, list[Any]] = {}
    for err in errors:  # a union (``img_size: 224 | [128, 224]``) reports once per member
        by_field.setdefault(str(err["loc"][0]) if err["loc"] else "", []).append(err)
    chosen = []
    for errs in by_field.values():
        indexed = [e for e in errs if any(isinstance(p, int) for p in e["loc"])]
        members = [e for e in errs if any(isinstance(p, str) and "[" in p for p in e["loc"])]
        chosen += (indexed[:1] if indexed else errs[:1]) if members else errs
    for err in chosen:
        loc = [p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or "(" in p))]
        key = ".".join(str(p) for p in loc) or "config"
        top = str(err["loc"][0]) if err["loc"] else ""
        given = err.get("input")  # a flag's text as typed; a YAML value as its Python repr
        shown = given if isinstance(given, str) and given else repr(given)
        name = positional.get(top) or f"--{top.replace('_', '-')}"
        where = f"{name} {shown}" if top in flags else f"{source}: {key}={given!r}"
        # a validator's own ValueError (``--subset a,,b``) reads as its message alone
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {msg}")
    return "\n".join(lines)


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


def make_config(cls: type[T], values: dict[str, Any], source: str = "config",
                flags: frozenset[str] = frozenset()) -> T:
    """Build ``cls`` from a mapping, refusing unknown keys with the closest known names.

    ``flags``: the keys that came from the command line, named as flags in errors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        hints_txt = "; ".join(
            f"{k!r} (did you mean {', '.join(difflib.get_close_matches(k, fields, 3)) or '?'})"
            for k in unknown
        )
        raise ConfigError(f"{source}: unknown key(s) {hints_txt}")
    for k, v in values.items():
        _check_choice(fields[k], v, f"--{k.replace('_', '-')}" if k in flags else source)
    try:
        return cls(**values)
    except pydantic.ValidationError as exc:
        positional = {f.name: f.metadata.get("metavar") or f.name.upper()
                      for f in fields.values() if f.metadata.get("positional")}
        raise ConfigError(validation_message(exc, source, flags, positional)) from None


def parse_config(cls: type[T], argv: list[str] | None, prog: str, description: str) -> T:
    """Defaults < ``--config FILE.yaml`` < flags."""
    parser = build_parser(cls, prog, description)
    flags = vars(parser.parse_args(bool_flags_alone(parser, list(
        sys.argv[1:] if argv is None else argv))))
    values: dict[str, Any] = {}
    if flags.get("config"):
        values.update(load_yaml(flags["config"]))
        values["config"] = flags["config"]
    values.update(flags)
    source = f"--config {flags['config']}" if flags.get("config") else "config"
    return make_config(cls, values, source, frozenset(flags) - {"config"})


def config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: Path) -> None:
    write_text(path, yaml.safe_dump(config_dict(cfg), sort_keys=False))


def field_default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
