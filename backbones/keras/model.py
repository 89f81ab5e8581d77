"""The Keras model: ``keras.applications`` names, their preprocessing, the spec, the model with
foldstack's head, its BatchNorm layers (momentum, which train, precise statistics).

BatchNorm momentum defaults to 0.9 (PyTorch's 0.1, which timm runs use): Keras' 0.99 (0.999 in
MobileNetV3) leaves the running statistics of a few-hundred-step run near their initial values,
and the held-out predictions near chance.
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from backbones import close_names
from backbones.base import BackboneSpec
from backbones.keras.runtime import FRAMEWORK, keras
from oof.config import RunConfig
from oof.errors import ConfigError
from recipe import plan_phases
from recipe.batches import PooledMoments, bn_chunks, check_batch_size
from recipe.phases import Phase

DEFAULT_BN_MOMENTUM = 0.9

# --------------------------------------------------------------------------------------- spec


def application_names() -> list[str]:
    """Every model constructor ``keras.applications`` exports (EfficientNetB0, Xception...)."""
    return sorted(n for n in dir(keras.applications)
                  if n[:1].isupper() and callable(getattr(keras.applications, n)))


def preprocess_function(model_name: str) -> Any:
    """The application's own ``preprocess_input`` (from the module defining the model)."""
    module = importlib.import_module(getattr(keras.applications, model_name).__module__)
    return module.preprocess_input


def describe_preprocessing(model_name: str) -> tuple[str, tuple[float, ...], tuple[float, ...]]:
    """Probe ``preprocess_input`` on known pixels: its words, mean and std on the 0..1 scale.

    Every application's preprocessing is a per-channel affine map, possibly after RGB->BGR;
    probing records what it actually does rather than what its docs say.
    """
    fn = preprocess_function(model_name)
    probe = np.array([[[[0, 0, 0], [255, 255, 255], [255, 0, 0]]]], dtype=np.float32)
    out = np.asarray(fn(probe.copy()), dtype=np.float64)[0, 0]
    scale = (out[1] - out[0]) / 255.0
    offset = out[0]
    bgr = bool(abs(out[2, 2] - out[0, 2]) > 1e-6 and abs(out[2, 0] - out[0, 0]) < 1e-6)
    std = tuple(float(1.0 / (255.0 * s)) for s in scale)
    mean = tuple(float(-o / (255.0 * s)) for o, s in zip(offset, scale, strict=True))
    module = fn.__module__.replace("keras.src.", "keras.")
    if np.allclose(scale, 1) and np.allclose(offset, 0) and not bgr:
        words = (f"{module}.preprocess_input: identity; the model takes 0..255 RGB and rescales "
                 "inside itself")
    else:
        words = (f"{module}.preprocess_input on 0..255 RGB: {'RGB->BGR, then ' if bgr else ''}"
                 f"x * {tuple(round(float(s), 6) for s in scale)} + "
                 f"{tuple(round(float(o), 4) for o in offset)}")
    return words + " (first layer of the model)", mean, std


def resolve_spec(model_name: str, cfg: RunConfig) -> BackboneSpec:
    """Check the name against ``keras.applications`` and probe its preprocessing."""
    names = application_names()
    if model_name not in names:
        raise ConfigError(
            f"--backbone keras/{model_name}: keras.applications has no such model; closest: "
            f"{close_names(model_name, names)}"
        )
    if cfg.pretrained not in ("", "auto", "imagenet") and not Path(cfg.pretrained).expanduser(
    ).is_file():
        raise ConfigError(f"--pretrained {cfg.pretrained}: no such weights file")
    plan_phases(cfg)  # refuses bad fine-tuning keys before any work
    if cfg.drop_path:
        raise ConfigError(f"--drop-path {cfg.drop_path}: keras.applications fix their stochastic "
                          f"depth (keras/{model_name} takes no rate); leave --drop-path at 0 or "
                          "use a timm backbone")
    words, mean, std = describe_preprocessing(model_name)
    spec = BackboneSpec(
        name=f"keras/{model_name}", family="keras", framework=FRAMEWORK, model_name=model_name,
        input_size=int(cfg.final_img_size or 224), mean=mean, std=std,  # type: ignore[arg-type]
        preprocessing=words, pretrained=cfg.pretrained, **BackboneSpec.head_options(cfg),
    )
    if cfg.batch_size < 2:  # the model's structure decides (no weights loaded)
        model = build_model(replace(spec, pretrained=""), 2)
        check_batch_size(cfg.batch_size, len(training_batchnorms(model, plan_phases(cfg))),
                         spec.name)
    return spec


# -------------------------------------------------------------------------------------- model


def _weights_argument(spec: BackboneSpec) -> str | None:
    source = spec.pretrained
    if not source:
        return None
    if source in ("auto", "imagenet"):
        return "imagenet"
    return str(Path(source).expanduser())


def _iter_layers(layer: Any) -> Any:
    yield layer
    for sub in getattr(layer, "layers", []):
        yield from _iter_layers(sub)


def set_bn_momentum(model: keras.Model, momentum: float) -> int:
    """Set every BatchNormalization momentum (before tracing); returns how many were set."""
    n = 0
    for layer in _iter_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum
            n += 1
    return n


def recalibrate_batchnorm(model: keras.Model, images: np.ndarray,
                          chunk: int | None = None) -> int:
    """Precise BatchNorm: replace the moving statistics by those of ``images``.

    The moving averages trail the weights by ~1/(1-momentum) steps and start at mean 0,
    variance 1. In a run of a few dozen steps the initial variance still dominates layers whose
    real activations are tiny (MobileNetV3's depthwise convolutions at 32 px: variance ~1e-4),
    every such layer shrinks its output at inference, and the held-out predictions collapse to
    the class prior while training accuracy climbs. Statistics measured over the training
    images fix that for any run length: the images go through in chunks (``recipe.batches``:
    ``BN_CHUNK`` images, never one alone), each chunk's mean and variance are read with
    momentum 0 and pooled by image count, spread of the chunk means included
    (``PooledMoments``), so every image weighs the same and a layer's statistics are those of
    all its inputs at once. Dropout is switched off meanwhile, so only BatchNorm sees training
    mode; frozen BatchNorm layers (``trainable=False``) keep their statistics, and so does
    every layer when there are fewer than 2 images. Returns the count of layers recalibrated.
    """
    layers = list(_iter_layers(model))
    bns = [ly for ly in layers if isinstance(ly, keras.layers.BatchNormalization) and ly.trainable]
    chunks = bn_chunks(len(images), chunk)
    if not bns or not chunks:
        return 0
    drops = [ly for ly in layers if isinstance(ly, keras.layers.Dropout)]
    saved = [ly.momentum for ly in bns], [ly.rate for ly in drops]
    pooled = [PooledMoments() for _ in bns]
    try:
        for ly in drops:
            ly.rate = 0.0
        for ly in bns:
            ly.momentum = 0.0  # moving statistics := this chunk's (Keras: weight of the old)
        for start, stop in chunks:
            model(np.asarray(images[start:stop]), training=True)
            for ly, pool in zip(bns, pooled):  # the same positions per image in a layer
                pool.add(stop - start, ly.moving_mean.numpy(), ly.moving_variance.numpy())
        if len(chunks) > 1:  # one chunk: the layer's own statistics are already exact
            for ly, pool in zip(bns, pooled):
                ly.moving_mean.assign(pool.mean.astype(ly.moving_mean.dtype))
                ly.moving_variance.assign(pool.var.astype(ly.moving_variance.dtype))
    finally:
        for ly, m in zip(bns, saved[0]):
            ly.momentum = m
        for ly, r in zip(drops, saved[1]):
            ly.rate = r
    return len(bns)


def training_batchnorms(model: keras.Model, phases: list[Phase]) -> list[Any]:
    """The BatchNorm layers that normalise by batch statistics in some of ``phases``: the
    head's always, the application's unless every phase that trains it freezes them."""
    in_app = {id(ly) for ly in _iter_layers(application_of(model))}
    backbone = any(p.train_backbone and not p.freeze_bn for p in phases)
    return [ly for ly in _iter_layers(model) if isinstance(ly, keras.layers.BatchNormalization)
            and (backbone or id(ly) not in in_app)]


def build_model(spec: BackboneSpec, num_classes: int,
                bn_momentum: float = DEFAULT_BN_MOMENTUM, any_size: bool = False) -> keras.Model:
    """uint8/0..255 RGB in, class probabilities out: preprocess, application, foldstack head.

    ``any_size`` builds it for inputs of any height and width (progressive resizing trains
    one model at several sizes); otherwise for the spec's size only.
    """
    size = None if any_size else spec.input_size
    app = getattr(keras.applications, spec.model_name)
    weights = _weights_argument(spec)
    try:
        base = app(include_top=False, weights=weights, input_shape=(size, size, 3))
    except ValueError as exc:  # too small an input, or imagenet weights at an unsupported size
        raise ConfigError(f"keras/{spec.model_name} at {size or 'any size'} px with "
                          f"weights={weights}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - download errors come in many types
        if weights == "imagenet":
            raise ConfigError(
                f"--pretrained {spec.pretrained}: ImageNet weights of keras/{spec.model_name} are "
                f"not in the Keras cache (~/.keras/models) and could not be downloaded "
                f"({type(exc).__name__}: {str(exc)[:200]}). Offline, pass a local file: "
                "--pretrained /path/to/weights.h5 (saved with include_top=False)"
            ) from exc
        raise ConfigError(f"--pretrained {weights}: could not load it into keras/"
                          f"{spec.model_name} without top ({type(exc).__name__}: "
                          f"{str(exc)[:300]})") from exc
    preprocess = preprocess_function(spec.model_name)
    inputs = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = keras.layers.Lambda(lambda t: preprocess(keras.ops.cast(t, "float32")),
                            name="preprocess", dtype="float32")(inputs)
    x = base(x)
    avg = lambda: keras.layers.GlobalAveragePooling2D(name="pool_avg")(x)  # noqa: E731
    top = lambda: keras.layers.GlobalMaxPooling2D(name="pool_max")(x)  # noqa: E731
    x = {"avg": avg, "max": top,
         "avgmax": lambda: keras.layers.Average(name="pool")([avg(), top()]),
         "catavgmax": lambda: keras.layers.Concatenate(name="pool")([avg(), top()]),
         }[spec.head_pool]()
    x = keras.layers.Dropout(spec.head_dropout, name="head_dropout")(x)
    if spec.head_hidden:
        x = keras.layers.Dense(spec.head_hidden, use_bias=False, name="head_hidden")(x)
        x = keras.layers.BatchNormalization(name="head_bn")(x)
        x = keras.layers.Activation(spec.head_activation, name="head_act")(x)
        x = keras.layers.Dropout(spec.head_dropout, name="head_hidden_dropout")(x)
    # on pretrained features the new head starts at zero (uniform predictions), as in the timm
    # backend: its first large gradients would otherwise flow into the pretrained layers
    init = "zeros" if weights is not None else "glorot_uniform"
    x = keras.layers.Dense(num_classes, name="logits", dtype="float32",
                           kernel_initializer=init)(x)
    outputs = keras.layers.Activation("softmax", dtype="float32", name="proba")(x)
    model = keras.Model(inputs, outputs, name=spec.model_name)
    set_bn_momentum(model, bn_momentum)
    return model


def load_fold_model(spec: BackboneSpec, num_classes: int, checkpoint: Path) -> keras.Model:
    """A fold's model for serving: the same graph, weights from its checkpoint."""
    model = build_model(BackboneSpec(**{**spec.to_dict(), "pretrained": ""}), num_classes)
    model.load_weights(str(checkpoint))
    return model


def application_of(model: keras.Model) -> keras.Model:
    """The keras.applications model inside foldstack's wrapper (preprocess, base, head)."""
    return next(ly for ly in model.layers if isinstance(ly, keras.Model))
