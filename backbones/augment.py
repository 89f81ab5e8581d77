"""Augmentation presets, built with albumentations and shared by every framework.

A preset name means the same pixels for timm and Keras runs, so runs differ by architecture, not
by accident of pipeline. Transforms work on uint8 HWC arrays at the cached input size.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from oof.errors import ConfigError

PRESETS = ("none", "light", "flip", "medium", "strong")
PIPELINE_SUFFIXES = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}


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


def build_augment(preset: str, size: int) -> Any | None:
    """An albumentations ``Compose`` for a preset name or a pipeline file (None for 'none').

    Presets, for ``size`` x ``size`` uint8 images:
    - light: small affine jitter (scale, shift, rotation), no flip (digits, text);
    - flip: light plus horizontal flips;
    - medium: random resized crop (60-100 % of the area), flips, mild colour jitter (photos);
    - strong: harder crops (35-100 %), flips, affine, colour jitter, coarse dropout.
    A path ending in .json/.yaml/.yml is a pipeline written by ``albumentations.save``.
    """
    if preset == "none":
        return None
    _quiet_albumentations()
    import albumentations as A
    import cv2

    suffix = os.path.splitext(preset)[1].lower()
    if suffix in PIPELINE_SUFFIXES:
        return _load_pipeline(preset, PIPELINE_SUFFIXES[suffix])
    if preset not in PRESETS:
        raise ConfigError(f"--augment {preset!r}: choose one of {list(PRESETS)}, or give a "
                          "pipeline file (.json/.yaml) written by albumentations.save")
    reflect = cv2.BORDER_REFLECT_101
    if preset in ("light", "flip"):
        steps: list[Any] = [A.Affine(scale=(0.9, 1.1), translate_percent=(-0.08, 0.08),
                                     rotate=(-10, 10), border_mode=reflect, p=0.8)]
        if preset == "flip":
            steps.append(A.HorizontalFlip(p=0.5))
        return A.Compose(steps)
    if preset == "medium":
        return A.Compose([
            A.RandomResizedCrop((size, size), scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3)),
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
        ])
    return A.Compose([  # strong
        A.RandomResizedCrop((size, size), scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)),
        A.HorizontalFlip(p=0.5),
        A.Affine(rotate=(-15, 15), shear=(-8, 8), border_mode=reflect, p=0.5),
        A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.8),
        A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.2),
                        hole_width_range=(0.05, 0.2), p=0.5),
    ])


def _load_pipeline(path: str, data_format: str) -> Any:
    import albumentations as A

    if not os.path.isfile(path):
        raise ConfigError(f"--augment {path}: no such pipeline file")
    try:
        pipeline = A.load(path, data_format=data_format)
    except Exception as exc:  # noqa: BLE001 - albumentations raises many types on bad files
        raise ConfigError(f"--augment {path}: not an albumentations pipeline written by "
                          f"albumentations.save ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(pipeline, A.Compose):
        pipeline = A.Compose([pipeline])
    return pipeline


def check_augment(preset: str, size: int) -> None:
    """Refuse an unknown preset or a bad pipeline file before any work is done."""
    build_augment(preset, size)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training rows' order in ``epoch``: a function of (seed, epoch) alone.

    Both backends draw their batches from it, so a fold resumed at epoch ``e`` sees exactly the
    batches an uninterrupted fold would have seen, whatever was drawn before the kill.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))
    return rng.permutation(int(n))


class SeededAugment:
    """An albumentations pipeline whose draws are a function of (seed, epoch, sample index).

    An unseeded ``Compose`` draws from fresh entropy, so two runs with the same seeds trained on
    different pixels (OOF probabilities differed by up to 0.61). Seeding one generator per run is
    not enough either: loader workers, prefetch threads and a resumed epoch would consume it in
    another order. Re-seeding per sample from (seed, epoch, index) makes every augmented image
    reproducible wherever and whenever it is made.
    """

    def __init__(self, compose: Any, seed: int) -> None:
        self.compose, self.seed = compose, int(seed)

    def __call__(self, image: Any, epoch: int, index: int) -> Any:
        state = np.random.SeedSequence([self.seed, int(epoch), int(index)]).generate_state(1)
        self.compose.set_random_seed(int(state[0]))
        return self.compose(image=image)["image"]


def build_seeded_augment(preset: str, size: int, seed: int) -> SeededAugment | None:
    """``build_augment`` with reproducible draws (None for 'none')."""
    compose = build_augment(preset, size)
    return None if compose is None else SeededAugment(compose, seed)
