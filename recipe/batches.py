"""How a fold's rows become batches, for both backends: one rule each, framework-free.

A batch of one image is where BatchNorm breaks: in training mode torch refuses a layer that sees
one value per channel (``Expected more than 1 value per channel when training``, which a 1x1
feature map of one image is), and Keras quietly normalises that image to its own mean. So the
training batches and the precise-BatchNorm chunks below never hold a single image, and a fold
that can only make such batches is refused with its cause (``check_train_batches``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from oof.errors import ConfigError, DataError

# Images per forward pass of precise BatchNorm (``recalibrate_batchnorm``); read at call time,
# so a test can shrink it to reach the chunk edges with a handful of images.
BN_CHUNK = 256


def train_batches(n: int, batch_size: int) -> tuple[int, int]:
    """(images per batch, batches per epoch) of ``n`` training rows, in both backends.

    More rows than ``batch_size``: full batches only, the short remainder dropped (each epoch
    draws a new order, so no image is left out for long); otherwise one batch of all ``n`` rows.
    """
    if n <= batch_size:
        return n, 1 if n else 0
    return batch_size, n // batch_size


def _needs_two(backbone: str, batchnorm_layers: int) -> str:
    return (f"{backbone} has {batchnorm_layers} BatchNorm layers in training mode, and "
            "BatchNorm needs at least 2 images per training batch")


def check_batch_size(batch_size: int, batchnorm_layers: int, backbone: str) -> None:
    """Refuse ``--batch-size 1`` for a model with BatchNorm layers that train.

    torch stops with a ValueError deep in the first step where a feature map is 1x1; Keras
    trains, but every such layer outputs its bias alone. Either way nothing is learnt, so each
    backend's ``resolve_spec`` refuses it before images are decoded or a run folder is written.
    """
    if batch_size < 2 and batchnorm_layers:
        raise ConfigError(f"--batch-size {batch_size}: {_needs_two(backbone, batchnorm_layers)}"
                          "; use --batch-size 2 or more")


def check_train_batches(n: int, batch_size: int, batchnorm_layers: int, backbone: str,
                        fold: int) -> None:
    """Refuse a fold whose training batches would hold one image while BatchNorm trains
    (``check_batch_size``, or a fold of one training image), naming the flag or the fold."""
    batch, _ = train_batches(n, batch_size)
    if batch >= 2 or not batchnorm_layers:
        return
    if n < 2:
        raise DataError(f"fold {fold} has {n} training image{'' if n == 1 else 's'}: "
                        f"{_needs_two(backbone, batchnorm_layers)}; use fewer --folds or more "
                        "images")
    check_batch_size(batch_size, batchnorm_layers, backbone)


def bn_chunks(n: int, size: int | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges of precise BatchNorm's forward passes over ``n`` images.

    Chunks of ``size`` (default ``BN_CHUNK``) images, except that a lone last image joins the
    chunk before it (which then holds ``size + 1``): no chunk ever holds one image, and when
    ``n`` is not 1 more than a multiple of ``size`` the chunks are exactly the plain ones. Fewer
    than 2 images give no chunk at all: statistics of one image are no estimate, so the
    statistics from training are kept.
    """
    size = max(2, int(size or BN_CHUNK))
    if n < 2:
        return []
    starts = list(range(0, n, size))
    if n - starts[-1] == 1:
        starts.pop()
    return [(a, b) for a, b in zip(starts, starts[1:] + [n])]


@dataclass
class PooledMoments:
    """A layer's per-channel mean and (biased) variance over every chunk added so far.

    Each chunk counts by its number of values per channel (images x positions), and the spread
    of the chunk means is added to the variance (Chan et al.'s pairwise update), so the result
    is the mean and variance of all the values at once, whatever the chunk sizes: the statistics
    one forward pass over every image would have measured at this layer, given its input.
    """

    count: float = 0.0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None  # sum of squared deviations from ``mean``

    def add(self, count: float, mean: np.ndarray, var: np.ndarray) -> None:
        """One chunk's ``count`` values per channel, their mean and biased variance."""
        mean = np.asarray(mean, dtype=np.float64)
        m2 = np.asarray(var, dtype=np.float64) * count
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = float(count), mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * count / total)
        self.count = total

    @property
    def var(self) -> np.ndarray:
        """The biased variance (Keras' moving variance)."""
        assert self.m2 is not None, "no chunk added"
        return self.m2 / self.count

    @property
    def unbiased_var(self) -> np.ndarray:
        """The unbiased variance (torch's running variance: ``count - 1`` in the divisor)."""
        assert self.m2 is not None, "no chunk added"
        return self.m2 / max(self.count - 1.0, 1.0)
