"""Small real image files for dataset tests: written with Pillow, read back through foldstack."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def rgb_array(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth, seeded RGB picture (smooth so that JPEG keeps it recognisable)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 215, size=3)
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = (yy * 3 + xx * 2) % 40
    return np.clip(base[None, None, :] + ramp[..., None], 0, 255).astype(np.uint8)


def write_image(path: Path, height: int = 20, width: int = 24, seed: int = 0,
                fmt: str | None = None) -> Path:
    """Write an RGB image; the format follows the suffix unless ``fmt`` is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb_array(height, width, seed)).save(path, format=fmt)
    return path


def make_imagefolder(root: Path, classes: dict[str, int], test: int = 0, suffix: str = ".jpg",
                     size: int = 20) -> Path:
    """``root/train/<class>/img<i><suffix>`` with ``classes[name]`` images each, and ``test/``."""
    for c, (name, n) in enumerate(classes.items()):
        for i in range(n):
            write_image(root / "train" / name / f"img{i}{suffix}", size, size, seed=100 * c + i)
    for i in range(test):
        write_image(root / "test" / f"t{i}{suffix}", size, size, seed=10_000 + i)
    return root
