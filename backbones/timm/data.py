"""The fold's training batches: uint8 images in memory (or memory-mapped) with the seeded
augmentation, one permutation per epoch from (seed, epoch) alone, so a resumed fold replays
exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from oof.config import RunConfig
from recipe.augment import SeededAugment, build_seeded_augment, epoch_order


class ArrayDataset(torch.utils.data.Dataset):
    """uint8 HWC images in memory (or memory-mapped) with a seeded albumentations transform.

    Item ``epoch * len(self) + i`` is image ``i`` as augmented in epoch ``epoch`` (see
    ``EpochSampler``), in the batch of rows it comes with: the draw depends on nothing else, so
    workers and order do not matter.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray,
                 augment: SeededAugment | None) -> None:
        self.images, self.augment = images, augment
        labels = np.asarray(labels)  # once, not per batch: class indices, or (N, C) soft targets
        self.labels = labels.astype(np.float32 if labels.ndim == 2 else np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.__getitems__([key])
        return images[0], labels[0]

    def __getitems__(self, keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch in one call (torch's batched fetch): one gather from the cache, one
        seeding of the augmentation (``SeededAugment.batch``), no per-image collation.
        ``EpochSampler`` never mixes epochs in a batch."""
        epoch = int(keys[0]) // len(self.images)
        rows = np.asarray(keys, dtype=np.int64) - epoch * len(self.images)
        x = self.images[rows]  # fancy indexing: a writable copy of the read-only memmap rows
        if self.augment is not None:
            x = self.augment.batch(x, epoch, rows)
        return (torch.from_numpy(np.ascontiguousarray(x)),
                torch.from_numpy(self.labels[rows]))


def collated(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The DataLoader's collate step: ``ArrayDataset.__getitems__`` made the batch already."""
    return batch


class EpochSampler(torch.utils.data.Sampler[int]):
    """A permutation per epoch from (seed, epoch) alone, yielding ``epoch * n + i`` keys.

    ``set_epoch`` before each epoch (as with DistributedSampler): a resumed fold then replays
    exactly the batches an uninterrupted one would have seen.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):  # noqa: ANN204 - Sampler protocol
        return iter((epoch_order(self.n, self.seed, self.epoch) + self.epoch * self.n).tolist())


def make_loader(images: np.ndarray, labels: np.ndarray, cfg: RunConfig, seed: int,
                device: torch.device) -> torch.utils.data.DataLoader:
    """The fold's training batches, augmented where the step runs unless workers pay off.

    On a CPU the batches are made between steps on the main thread: a worker process, or a
    background thread overlapping augmentation with compute, takes turns with torch's compute
    threads for the cores (and the GIL) and lost more than it hid: on 2 cores the timm loop ran
    at 0.946x the bare loop with a prefetch thread, 0.975x without (per-tensor AdamW; mean of 12
    paired rounds with a bare loop, while OpenCV still ran its own pool, see ``augment.opencv``);
    the light preset and the DataLoader cost 0.8 ms a batch of 64 32 px images.
    On a GPU the step runs asynchronously, so the main thread makes the next batch meanwhile,
    or worker processes do where there are more than 2 cores.
    """
    workers = cfg.num_workers
    if workers is None:
        cores = os.cpu_count() or 1
        workers = 0 if cores <= 2 or device.type == "cpu" else min(8, cores - 1)
    # the batches of recipe.batches.train_batches: full ones, or one of every row
    return torch.utils.data.DataLoader(
        ArrayDataset(images, labels, build_seeded_augment(cfg.augment, images.shape[1], seed)),
        batch_size=cfg.batch_size, sampler=EpochSampler(len(images), seed),
        collate_fn=collated, drop_last=len(images) > cfg.batch_size, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
    )


