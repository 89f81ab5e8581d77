"""Augmentation presets, built with albumentations and shared by every framework.

A preset name means the same pixels for timm and Keras runs, so runs differ by architecture, not
by accident of pipeline. Transforms work on uint8 HWC arrays at the cached input size.
Test-time views are in ``recipe.tta``.
"""

from __future__ import annotations

import functools
import os
import random
import sys
from pathlib import Path
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


@functools.cache
def opencv() -> Any:
    """``cv2``, switched to run each call on the calling thread (``cv2.setNumThreads(0)``).

    The augmentation is the only OpenCV user, and it runs beside the training step: on the
    main thread between steps (timm on a CPU), in tf.data's thread (Keras) or in loader worker
    processes that each own a core. OpenCV's own thread pool (one thread per core) woke for every
    image and took turns with torch's or TensorFlow's compute threads: in one process on 2 cores
    the timm fold loop ran at 0.92x a bare loop with OpenCV's pool, 0.98x without it (resnet10t,
    32 px, light preset, medians of 20 alternating epochs), while a 32 px warp takes 8 us alone
    against 6 us with the pool.
    The setting is process-wide, as albumentations advises for training.
    """
    import cv2

    cv2.setNumThreads(0)
    return cv2


def build_augment(preset: str, size: int) -> Any | None:
    """The pipeline for a preset name or a pipeline file (None for 'none').

    light and flip are an ``AffineJitter``; the other presets and files are albumentations
    ``Compose`` pipelines.

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

    cv2 = opencv()
    suffix = os.path.splitext(preset)[1].lower()
    if suffix in PIPELINE_SUFFIXES:
        return _load_pipeline(preset, PIPELINE_SUFFIXES[suffix])
    if preset not in PRESETS:
        raise ConfigError(f"--augment {preset!r}: choose one of {list(PRESETS)}, or give a "
                          "pipeline file (.json/.yaml) written by albumentations.save")
    if preset in ("light", "flip"):
        return AffineJitter(hflip=0.5 if preset == "flip" else 0.0)
    reflect = cv2.BORDER_REFLECT_101
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


def save_augment(preset: str, size: int, path: str | os.PathLike[str]) -> Path:
    """Write the ``preset`` pipeline at ``size`` px as an albumentations file (json or yaml, by
    ``path``'s suffix), the starting point of a custom pipeline (``--augment FILE``).

    light and flip are written as the albumentations transforms they draw like
    (``AffineJitter.to_albumentations``). The file appears whole or not at all.
    """
    import albumentations as A

    from oof.atomic import atomic_path

    data_format = PIPELINE_SUFFIXES.get(Path(path).suffix.lower())
    if data_format is None:
        raise ConfigError(f"--write-augment {path}: name a .yaml, .yml or .json file")
    pipeline = build_augment(preset, size)
    if pipeline is None:
        raise ConfigError(f"--augment {preset!r}: no pipeline to write (choose a preset or file)")
    if isinstance(pipeline, AffineJitter):
        pipeline = pipeline.to_albumentations()
    with atomic_path(path) as tmp:
        A.save(pipeline, str(tmp), data_format=data_format)
    return Path(path)


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


class AffineJitter:
    """The light and flip presets: a small random affine (scale, shift, rotation), optionally
    mirrored, drawn for a whole batch at once and applied with one ``cv2.warpAffine`` per image.

    Why not ``albumentations.Affine``: at the 32 px the CPU demo trains on it costs about 60 us
    per image (two matrix builds, an identity check, its call plumbing) against 8 us for the warp
    itself, and on two busy cores that cost adds straight onto every step (Keras ``fit`` ran at
    0.88x its bare loop with it, 0.97x without augmentation). The draws follow the
    ``A.Affine(scale, translate_percent=(-translate, translate), rotate=(-rotate, rotate), p)``
    these presets used to be, so their measured results still hold: with probability ``p`` a
    scale in ``scale`` for each axis, a whole-pixel shift ``int(u * side)`` with u uniform in
    +-``translate`` (albumentations truncates too) and a rotation in +-``rotate`` degrees about
    the centre, reflected borders, bilinear; independently a horizontal flip with probability
    ``hflip``, folded into the same matrix (tests/test_augment.py compares the draws with
    albumentations' own).
    """

    def __init__(self, scale: tuple[float, float] = (0.9, 1.1), translate: float = 0.08,
                 rotate: float = 10.0, p: float = 0.8, hflip: float = 0.0) -> None:
        self.scale, self.translate, self.rotate = scale, float(translate), float(rotate)
        self.p, self.hflip = float(p), float(hflip)

    def __repr__(self) -> str:
        return (f"AffineJitter(scale={self.scale}, translate={self.translate}, "
                f"rotate={self.rotate}, p={self.p}, hflip={self.hflip})")

    def to_albumentations(self) -> Any:
        """The same draws as an albumentations ``Compose`` (``A.Affine``, then
        ``A.HorizontalFlip`` when mirroring), which ``albumentations.save`` can write and a
        user can edit (``save_augment``); it costs albumentations' per-image time."""
        import albumentations as A

        cv2 = opencv()
        return A.Compose([
            A.Affine(scale=self.scale, translate_percent=(-self.translate, self.translate),
                     rotate=(-self.rotate, self.rotate), interpolation=cv2.INTER_LINEAR,
                     border_mode=cv2.BORDER_REFLECT_101, p=self.p),
            *([A.HorizontalFlip(p=self.hflip)] if self.hflip else []),
        ])

    def matrices(self, n: int, height: int, width: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draw ``n`` images' transforms: (2x3 forward matrices, affine fired, mirrored)."""
        fired = rng.random(n) < self.p
        mirrored = rng.random(n) < self.hflip
        scale = np.where(fired[:, None], rng.uniform(*self.scale, (n, 2)), 1.0)  # (x, y)
        angle = np.where(fired, np.deg2rad(rng.uniform(-self.rotate, self.rotate, n)), 0.0)
        shift = np.where(fired[:, None], np.trunc(
            rng.uniform(-self.translate, self.translate, (n, 2)) * (width, height)), 0.0)
        cos, sin = np.cos(angle), np.sin(angle)
        sx, sy = scale[:, 0] * np.where(mirrored, -1.0, 1.0), scale[:, 1]
        centre = np.array([(width - 1) / 2, (height - 1) / 2])
        m = np.empty((n, 2, 3))
        m[:, 0, 0], m[:, 0, 1] = cos * sx, sin * sy  # dst = R S F (src - c) + c + shift
        m[:, 1, 0], m[:, 1, 1] = -sin * sx, cos * sy
        m[:, :, 2] = centre + shift - np.einsum("nij,j->ni", m[:, :, :2], centre)
        return m, fired, mirrored

    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Transform a uint8 NHWC batch with draws from ``rng`` (image i takes draw i)."""
        cv2 = opencv()
        n, height, width = images.shape[:3]
        m, fired, mirrored = self.matrices(n, height, width, rng)
        out = images.copy()
        out[mirrored & ~fired] = images[mirrored & ~fired, :, ::-1]
        for i in np.flatnonzero(fired):
            cv2.warpAffine(images[i], m[i], (width, height), dst=out[i], flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT_101)
        return out


class SeededAugment:
    """A pipeline whose draws are a function of (seed, epoch, sample index), or, for a training
    batch (``batch``), of (seed, epoch, the batch's rows).

    An unseeded ``Compose`` draws from fresh entropy, so two runs with the same seeds trained on
    different pixels (OOF probabilities differed by up to 0.61). Seeding one generator per run is
    not enough either: loader workers, prefetch threads and a resumed epoch would consume it in
    another order. Re-seeding per sample from (seed, epoch, index), or per training batch from
    (seed, epoch, its smallest row), makes every augmented image reproducible wherever and
    whenever it is made.
    """

    def __init__(self, pipeline: Any, seed: int) -> None:
        self.pipeline, self.seed = pipeline, int(seed)

    def _apply(self, images: np.ndarray, epoch: int, index: int) -> np.ndarray:
        """``images`` (uint8 NHWC) transformed by draws keyed by (seed, epoch, index), in order."""
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        if isinstance(self.pipeline, AffineJitter):
            return self.pipeline.apply(images, rng)
        # One generator pair shared by every transform of the pipeline (``set_random_state``
        # propagates it): as reproducible as ``set_random_seed``, which builds a fresh pair for
        # each transform, at a fraction of its cost.
        self.pipeline.set_random_state(rng, random.Random(int(rng.integers(1 << 62))))
        return np.stack([self.pipeline(image=im)["image"] for im in images])

    def __call__(self, image: Any, epoch: int, index: int) -> Any:
        """One image, drawn from (seed, epoch, index) alone (TTA views: any batch, same view)."""
        return self._apply(np.asarray(image)[None], epoch, index)[0]

    def batch(self, images: np.ndarray, epoch: int, rows: np.ndarray) -> np.ndarray:
        """A training batch: one generator for the batch, keyed by its smallest row.

        Seeding costs 15 us, as much as the light preset's transform of an image, so training
        seeds once per batch and draws image after image in row order: the pixels are a function
        of (seed, epoch, the batch's rows), which both backends take from ``epoch_order``,
        whatever the order of the rows within the batch.
        """
        rows = np.asarray(rows)
        if not len(rows):
            return images
        order = np.argsort(rows, kind="stable")
        out = np.empty_like(images)
        out[order] = self._apply(images[order], epoch, int(rows[order[0]]))
        return out


def build_seeded_augment(preset: str, size: int, seed: int) -> SeededAugment | None:
    """``build_augment`` with reproducible draws (None for 'none')."""
    compose = build_augment(preset, size)
    return None if compose is None else SeededAugment(compose, seed)


# ------------------------------------------------------------------------------ mixup / cutmix


def mix_batch(images: np.ndarray, targets: np.ndarray, mixup_alpha: float, cutmix_alpha: float,
              prob: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mixup or CutMix of a uint8 batch with its one-hot ``targets`` (as timm's ``Mixup``).

    Written once in numpy and run on the batch before it reaches either framework, with ``rng``
    seeded by (seed, epoch, batch): timm and Keras mix alike, and a resumed fold mixes exactly
    as an uninterrupted one. With both alphas set, each batch picks one at random (p=0.5).
    Returns the mixed images (uint8) and soft targets (float32).
    """
    targets = np.asarray(targets, dtype=np.float32)
    if (not mixup_alpha and not cutmix_alpha) or len(images) < 2 or rng.random() >= prob:
        return images, targets
    use_cutmix = cutmix_alpha > 0 and (not mixup_alpha or rng.random() < 0.5)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix
                else rng.beta(mixup_alpha, mixup_alpha))
    partner = images[::-1]  # pairs each image with its mirror in the batch, like timm
    if use_cutmix:
        h, w = images.shape[1:3]
        cut = np.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, h)
        x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, w)
        mixed = images.copy()
        mixed[:, y0:y1, x0:x1] = partner[:, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
    else:
        blend = images.astype(np.float32) * lam + partner.astype(np.float32) * (1.0 - lam)
        mixed = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return mixed, (targets * lam + targets[::-1] * (1.0 - lam)).astype(np.float32)


def batch_rng(seed: int, epoch: int, batch: int) -> np.random.Generator:
    """The generator of one training batch's mixing draws."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(batch), 1]))
