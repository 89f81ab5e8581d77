"""Augmentation presets, built with albumentations and shared by every framework.

A preset name means the same pixels for timm and Keras runs, so runs differ by architecture, not
by accident of pipeline. Transforms work on uint8 HWC arrays at the cached input size.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from oof.errors import ConfigError

PRESETS = ("none", "light", "flip")


def _quiet_albumentations() -> None:
    """Import albumentations without its side effects on a training process.

    ``import albumentations`` imports ``albumentations.pytorch`` (hence torch) whenever torch is
    installed, which would put torch into every Keras process; and it asks PyPI for updates,
    a network call at every start. Block the first (foldstack never uses its torch helpers; a
    process that already has torch keeps them), switch off the second.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if "torch" not in sys.modules and "albumentations" not in sys.modules:
        sys.modules.setdefault("albumentations.pytorch", None)  # type: ignore[arg-type]


def build_augment(preset: str) -> Any | None:
    """Return an albumentations ``Compose`` for ``preset`` (None for 'none')."""
    if preset not in PRESETS:
        raise ConfigError(f"--augment {preset!r}: choose one of {list(PRESETS)}")
    if preset == "none":
        return None
    _quiet_albumentations()
    import albumentations as A
    import cv2

    steps: list[Any] = [
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.08, 0.08), rotate=(-10, 10),
                 border_mode=cv2.BORDER_REFLECT_101, p=0.8),
    ]
    if preset == "flip":
        steps.append(A.HorizontalFlip(p=0.5))
    return A.Compose(steps)
