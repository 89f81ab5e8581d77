"""Backbone registry: ``family/model`` names resolve here, and only here.

``FAMILIES`` names each family's package once; the package registers its ``Family``
(``backbones.fold``: the hooks the fold template runs) when imported, and is imported only when
its name is asked for, so naming ``timm/...`` never imports TensorFlow and ``keras/...`` never
imports torch (like timm's ``create_model``, unknown names fail with the closest known ones).
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from typing import TYPE_CHECKING

from backbones.base import BackboneSpec, FoldJob, FoldResult
from oof.errors import ConfigError

if TYPE_CHECKING:
    from backbones.fold import Family
    from oof.config import RunConfig

GPU_DEVICE_FILES = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd")


def keep_triton_out_without_gpu() -> bool:
    """Keep triton from loading on a machine with no GPU driver; True if it was kept out.

    Importing timm imports torchvision, whose ops import ``torch._dynamo``, which loads triton's
    500 MB ``libtriton.so`` only to learn whether triton exists. Triton compiles GPU kernels and
    nothing on a CPU uses it; torch's CPU wheels ship without it and dynamo takes that path. On
    the 2-core CI machine that load aborted a test worker (SIGABRT inside the dlopen). Set
    ``FOLDSTACK_LOAD_TRITON=1`` to load it regardless.
    """
    if "triton" in sys.modules or os.environ.get("FOLDSTACK_LOAD_TRITON") == "1":
        return False
    if any(os.path.exists(path) for path in GPU_DEVICE_FILES):
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]  # `import triton` -> ImportError
    return True


keep_triton_out_without_gpu()  # before any backend imports torch, timm or torchvision

#: set (to 1) by ``--verbose``/``-v``: the frameworks' own log lines are shown. An environment
#: variable because the backend reads it before importing its framework, and the fold workers a
#: run starts (local processes, Ray actors: FOLDSTACK_* variables travel) read it too.
FRAMEWORK_LOGS_ENV = "FOLDSTACK_FRAMEWORK_LOGS"


def show_framework_logs(show: bool) -> None:
    """``-v``: let the frameworks' log lines through in this process and the workers it starts
    (only a backend imported after this call is affected)."""
    if show:
        os.environ[FRAMEWORK_LOGS_ENV] = "1"

#: family name -> its package (which calls ``register`` when imported)
FAMILIES: dict[str, str] = {
    "timm": "backbones.timm",
    "keras": "backbones.keras",
    "probe": "backbones.probe",
}


def split_name(name: str) -> tuple[str, str]:
    """'timm/resnet10t' -> ('timm', 'resnet10t'); refuses names without a known family."""
    family, sep, model = name.partition("/")
    if not sep or not model:
        raise ConfigError(
            f"--backbone {name!r}: write it as FAMILY/MODEL, e.g. timm/resnet10t or "
            "keras/EfficientNetB0"
        )
    if family not in FAMILIES:
        raise ConfigError(f"--backbone {name!r}: {unknown_family(family, f'/{model}')}")
    return family, model


_REGISTERED: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Called by a family package when imported: its hooks become reachable by name."""
    if family.name not in FAMILIES:
        raise ConfigError(f"family {family.name!r} is not named in backbones.FAMILIES")
    _REGISTERED[family.name] = family
    return family


def unknown_family(family: str, tail: str = "") -> str:
    """'unknown family ...' with the closest known family (``tail`` completes the hint)."""
    close = difflib.get_close_matches(family, FAMILIES, 1)
    hint = f" (did you mean {close[0]}{tail}?)" if close else ""
    return f"unknown family {family!r}{hint}; known: {sorted(FAMILIES)}"


def get_backend(family: str) -> Family:
    """The registered family ``family`` (its package imported on first use)."""
    if family not in _REGISTERED:
        if family not in FAMILIES:
            raise ConfigError(f"backbone {unknown_family(family)}")
        importlib.import_module(FAMILIES[family])
        if family not in _REGISTERED:
            raise ConfigError(f"{FAMILIES[family]} registered no family {family!r}")
    return _REGISTERED[family]


def close_names(name: str, known: list[str], n: int = 5) -> str:
    """Human hint listing the known names closest to ``name``."""
    lowered = {k.lower(): k for k in known}
    close = difflib.get_close_matches(name.lower(), list(lowered), n, cutoff=0.5)
    return ", ".join(lowered[c] for c in close) or "none close"


def resolve(cfg: RunConfig) -> tuple[BackboneSpec, Family]:
    """Resolve ``cfg.backbone`` to its spec and the family that trains it."""
    from recipe.augment import check_augment
    from recipe.tta import tta_views

    family, model = split_name(cfg.backbone)
    show_framework_logs(cfg.verbose)
    backend = get_backend(family)
    spec = backend.resolve_spec(model, cfg)
    check_augment(cfg.augment, spec.input_size)
    tta_views(cfg.tta, cfg.tta_scales, cfg.tta_augment, cfg.augment, spec.input_size, 0)
    return spec, backend


__all__ = ["BackboneSpec", "FoldJob", "FoldResult", "FAMILIES", "resolve", "split_name",
           "get_backend", "register", "close_names", "FRAMEWORK_LOGS_ENV",
           "show_framework_logs"]
