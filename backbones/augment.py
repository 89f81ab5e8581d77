"""Augmentation presets, built with albumentations and shared by every framework.

A preset name means the same pixels for timm and Keras runs, so runs differ by architecture, not
by accident of pipeline. Transforms work on uint8 HWC arrays at the cached input size.
"""

from __future__ import annotations

from typing import Any

from oof.errors import ConfigError

PRESETS = ("none", "light", "flip")


def build_augment(preset: str) -> Any | None:
    """Return an albumentations ``Compose`` for ``preset`` (None for 'none')."""
    if preset not in PRESETS:
        raise ConfigError(f"--augment {preset!r}: choose one of {list(PRESETS)}")
    if preset == "none":
        return None
    import albumentations as A
    import cv2

    steps: list[Any] = [
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.08, 0.08), rotate=(-10, 10),
                 border_mode=cv2.BORDER_REFLECT_101, p=0.8),
    ]
    if preset == "flip":
        steps.append(A.HorizontalFlip(p=0.5))
    return A.Compose(steps)
