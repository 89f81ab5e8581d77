"""Decoding images into RGB uint8 arrays, and the on-disk cache of decoded images.

Every backbone, timm or Keras, sees pixels decoded by this one module, so a CMYK JPEG, a 16-bit
PNG or a rotated phone photo means the same thing to every model in the stack. Decoding happens
once per (image list, size) into a ``.npy`` cache that training memory-maps: the fold loop never
decodes a file, and an unreadable file is reported before training starts, with all culprits
listed together.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from oof.atomic import atomic_path
from oof.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm")
MAX_LISTED = 20


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: 16-bit and float scaled, alpha composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def read_rgb(path: str | os.PathLike[str], size: int | None = None) -> np.ndarray:
    """Read one image as an RGB uint8 array, EXIF orientation applied, squashed to ``size``.

    Squashing (not cropping) keeps the whole object in view; augmentation crops later.
    """
    with Image.open(path) as img:
        if size is not None and img.format == "JPEG":
            img.draft("RGB", (size, size))  # DCT-domain downscale: much faster for big photos
        img.load()  # forces a full decode, so truncated files fail here, not in epoch 3
        img = to_rgb(ImageOps.exif_transpose(img))
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return np.asarray(img, dtype=np.uint8)


def _cache_key(paths: Sequence[str], size: int) -> str:
    digest = hashlib.sha256(f"v1|{size}".encode())
    for p in paths:
        st = os.stat(p)
        digest.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def decode_images(paths: Sequence[str], size: int, threads: int | None = None) -> np.ndarray:
    """Decode ``paths`` into (N, size, size, 3) uint8; one DataError lists every bad file."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    errors: list[str] = []

    def work(i: int) -> None:
        try:
            out[i] = read_rgb(paths[i], size)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's fault
            errors.append(f"{paths[i]}: {type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(max_workers=threads or min(8, (os.cpu_count() or 1) + 1)) as pool:
        list(pool.map(work, range(len(paths))))
    if errors:
        errors.sort()
        shown = "\n  ".join(errors[:MAX_LISTED])
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise DataError(f"{len(errors)} image(s) could not be read:\n  {shown}{more}")
    return out


def cached_images(paths: Sequence[str], size: int, cache_dir: Path) -> np.ndarray:
    """Return decoded images from ``cache_dir``, decoding and caching them on first use.

    The key hashes the paths, their sizes and mtimes and the image size, so an edited file or a
    new size makes a new cache entry instead of silently reusing stale pixels.
    """
    paths = [str(p) for p in paths]
    if not paths:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    target = Path(cache_dir) / f"images_{size}px_{len(paths)}_{_cache_key(paths, size)}.npy"
    if target.exists():
        return np.load(target, mmap_mode="r")
    log.info("decoding %d images at %dpx into %s", len(paths), size, target)
    arr = decode_images(paths, size)
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)
    return np.load(target, mmap_mode="r")
