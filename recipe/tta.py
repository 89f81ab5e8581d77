"""Test-time augmentation views, shared by every family: the same views, seeds and pixels for
timm and Keras (and the probe family), so a fold's OOF rows and its served predictions agree.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from oof.errors import ConfigError
from recipe.augment import SeededAugment, build_seeded_augment, opencv

TTA_FLIPS = ("none", "hflip", "flips")
TTA_EPOCH = 1_000_000  # augmentation keys of TTA views: never an epoch a model trained on


class TTAView:
    """One test-time view of a batch: ``view(batch_uint8, rows) -> batch_uint8``.

    ``rows`` are the images' positions in the whole set, so a random view of an image is the
    same whatever batch it falls in (and the same in both frameworks). ``by_row``: the view
    depends on ``rows`` (a random view), not on the pixels alone.
    """

    def __init__(self, name: str, fn: Any, by_row: bool = False) -> None:
        self.name, self.fn, self.by_row = name, fn, by_row

    def __call__(self, batch: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.fn(batch, rows), dtype=np.uint8)

    def __repr__(self) -> str:
        return f"TTAView({self.name})"


def _zoom(scale: float) -> Any:
    """Enlarge by ``scale`` and crop the centre back to the input size (a closer look)."""
    cv2 = opencv()

    def fn(batch: np.ndarray, rows: np.ndarray) -> np.ndarray:
        size = batch.shape[1]
        big = max(size, round(size * scale))
        off = (big - size) // 2
        return np.stack([cv2.resize(im, (big, big), interpolation=cv2.INTER_LINEAR)
                         [off:off + size, off:off + size] for im in batch])
    return fn


def tta_views(tta: str, scales: list[float], augment_views: int, augment: str, size: int,
              seed: int) -> list[TTAView]:
    """The views whose probabilities are averaged, for OOF and test rows alike.

    ``tta``: none (the image), hflip (plus its mirror), flips (plus vertical and both);
    ``scales``: extra centre zooms (1.15 = look 15 % closer); ``augment_views``: N random views
    drawn from the training augmentation ``augment`` (seeded by (seed, view, row)).
    """
    if tta not in TTA_FLIPS:
        raise ConfigError(f"--tta {tta!r}: choose one of {list(TTA_FLIPS)}")
    views = [TTAView("identity", lambda b, r: b)]
    if tta in ("hflip", "flips"):
        views.append(TTAView("hflip", lambda b, r: b[:, :, ::-1]))
    if tta == "flips":
        views.append(TTAView("vflip", lambda b, r: b[:, ::-1]))
        views.append(TTAView("hvflip", lambda b, r: b[:, ::-1, ::-1]))
    for scale in scales:
        if not 1.0 < scale <= 2.0:
            raise ConfigError(f"--tta-scales {scale}: a zoom factor in (1, 2] (1 is the image)")
        views.append(TTAView(f"zoom{scale:g}", _zoom(scale)))
    if augment_views:
        if augment == "none":
            raise ConfigError(f"--tta-augment {augment_views}: needs an --augment pipeline to "
                              "draw random views from")
        for v in range(augment_views):
            aug = build_seeded_augment(augment, size, seed)
            views.append(TTAView(f"augment{v}", functools.partial(_augment_view, aug, v),
                                 by_row=True))
    return views


def _augment_view(aug: SeededAugment, view: int, batch: np.ndarray, rows: np.ndarray
                  ) -> np.ndarray:
    return np.stack([aug(im, TTA_EPOCH + view, int(r)) for im, r in zip(batch, rows)])
