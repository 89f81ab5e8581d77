"""The Keras family: Keras 3 applications on TensorFlow (``keras/<application>`` backbones).

It mirrors the timm family flag for flag (AdamW, warmup + cosine/one-cycle per step, label
smoothing, the same augmentation presets and TTA, ``val_loss``/``val_accuracy`` from
``oof.metrics`` on the held-out rows after every epoch: the fold template's) so that one config
serves both families. Each measured choice is explained where it is made (see
``bench/overhead_keras.py`` and the per-fold ``info``).

One concern per module: ``runtime`` (the one that imports TensorFlow: its logs, threads, device,
seeds), ``model`` (applications, preprocessing, the spec, head, BatchNorm), ``optim`` (LR
schedule, optimiser, loss), ``data`` (seeded ``tf.data`` batches), ``compiled`` (the compiled
model kept across folds, compiling per phase), ``callbacks`` (the template's epoch events inside
``fit``, the user's callbacks, backups), ``train`` (the fold model behind the template's hooks,
the LR range test), ``serving`` (checkpoints, the predictor), ``family`` (the hooks, registered
here). Importing the package imports no TensorFlow: the hooks do, when called.
"""

from backbones import register
from backbones.keras.family import KerasFamily

FAMILY = register(KerasFamily())

__all__ = ["FAMILY", "KerasFamily"]
