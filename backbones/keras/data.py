"""The Keras training data: seeded batches of the fold's uint8 images through ``tf.data``.

Images arrive as uint8 arrays from the decoded-image cache (``oof.images``, shared with timm); the
``tf.data`` pipeline gathers and augments a whole batch in one ``tf.numpy_function`` (the
albumentations presets of ``recipe.augment``, so a preset means the same pixels for both
frameworks), and prefetches. The model itself takes 0..255 pixels and applies the application's
own ``preprocess_input`` as its first layer.
"""

from __future__ import annotations

import numpy as np

from backbones.keras.runtime import keras, tf
from oof.config import RunConfig
from recipe.augment import SeededAugment, batch_rng, build_seeded_augment, epoch_order, mix_batch
from recipe.batches import train_batches


class EpochBatches(keras.callbacks.Callback):
    """Batch ``b`` of epoch ``e``: rows ``epoch_order(n, seed, e)[b*batch:(b+1)*batch]``.

    The augmentation of a batch is seeded by (seed, epoch, its rows) too, so the pixels a fold
    trains on depend on nothing but the seed: not on tf.data's threads, not on how many epochs
    this process has run (a fold resumed by BackupAndRestore replays the same batches). Keras
    calls ``on_epoch_begin`` before it opens the epoch's iterator, which is when the epoch
    number is set for ``load``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, batch: int,
                 augment: SeededAugment | None, seed: int,
                 mixing: tuple[float, float, float] | None = None) -> None:
        super().__init__()
        self.mixing = mixing  # (mixup_alpha, cutmix_alpha, prob): the same draws as timm's
        self.images, self.batch, self.augment = images, batch, augment
        labels = np.asarray(labels)  # class indices, or (N, C) soft targets (--distill-from)
        self.labels = labels.astype(np.float32) if labels.ndim == 2 else labels
        self.seed, self.epoch = int(seed), 0
        self.eye = np.eye(num_classes, dtype=np.float32)
        self._order: tuple[int, np.ndarray] | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = int(epoch)
        reseed_layers(self.model, self.seed, self.epoch)

    def load(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        epoch = self.epoch
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.images), self.seed, epoch))
        rows = np.sort(self._order[1][int(b) * self.batch:(int(b) + 1) * self.batch])
        x = self.images[rows]  # sorted rows: a memory-mapped cache reads forward
        if self.augment is not None:
            x = self.augment.batch(x, epoch, rows)
        y = self.labels[rows] if self.labels.ndim == 2 else self.eye[self.labels[rows]]
        if self.mixing is not None:
            x, y = mix_batch(x, y, *self.mixing, batch_rng(self.seed, epoch, int(b)))
        return np.ascontiguousarray(x, dtype=np.uint8), y


def reseed_layers(model: keras.Model, seed: int, epoch: int) -> int:
    """Set every layer's random state (Dropout, ...) from (seed, epoch); returns how many.

    Keras keeps a ``SeedGenerator`` counter per random layer but does not save it with the
    weights, so a fold resumed by BackupAndRestore (or run after another fold on the reused
    model) would draw other dropout masks than an uninterrupted fold. Fixing the state at each
    epoch's start makes the masks a function of (seed, epoch, step) alone.
    """
    generators = [g for layer in model._flatten_layers(include_self=True, recursive=True)
                  for g in getattr(layer, "_seed_generators", [])]
    for i, gen in enumerate(generators):
        first = np.random.SeedSequence([int(seed), i]).generate_state(1)[0] % 2**31
        state = np.array([first, int(epoch) << 20], dtype=gen.state.dtype)
        gen.state.assign(state)
    return len(generators)


def make_train_dataset(images: np.ndarray, labels: np.ndarray, num_classes: int,
                       cfg: RunConfig, seed: int, class_weights: np.ndarray | None = None,
                       ) -> tuple[tf.data.Dataset, int, EpochBatches]:
    """Augmented, one-hot, prefetched batches of the fold's uint8 training images, with
    each image's class weight (``t_i . w``, soft targets too) as its sample weight when given.

    A batch is gathered and augmented in one numpy call, so the per-image Python cost is the
    augmentation's transform alone and it runs ahead of the training step in tf.data's thread.
    The returned ``EpochBatches`` must be among ``fit``'s callbacks: it sets the epoch.
    """
    batch, steps = train_batches(len(images), cfg.batch_size)  # as the timm loader's
    mixing = ((cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob)
              if cfg.mixup_alpha or cfg.cutmix_alpha else None)
    batches = EpochBatches(images, labels, num_classes, batch,
                           build_seeded_augment(cfg.augment, images.shape[1], seed), seed, mixing)
    size = images.shape[1]

    weight_of_class = None if class_weights is None else tf.constant(class_weights, tf.float32)

    def gather(b: tf.Tensor) -> tuple[tf.Tensor, ...]:
        x, y = tf.numpy_function(batches.load, [b], [tf.uint8, tf.float32], stateful=True)
        x.set_shape((None, size, size, 3))
        y.set_shape((None, num_classes))
        if weight_of_class is None:
            return x, y
        return x, y, tf.linalg.matvec(y, weight_of_class)

    # One batch is one numpy call, made in order: nothing for tf.data to tune or parallelise.
    # Its autotuner and shared thread pool only competed with the training step's threads (on
    # 2 cores, fit ran at 0.63-0.86x train_on_batch from one epoch to the next; 0.87 steady
    # without them: bench/overhead_keras.py).
    options = tf.data.Options()
    options.autotune.enabled = False
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    ds = (tf.data.Dataset.range(steps)
          .map(gather, num_parallel_calls=1)
          .prefetch(2)
          .with_options(options))
    return ds, steps, batches
