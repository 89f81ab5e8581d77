"""The Keras family: Keras 3 applications on TensorFlow (``keras/<application>`` backbones).

The only package (with ``bench/overhead_keras.py``) that imports TensorFlow. It mirrors the timm
family flag for flag (AdamW, warmup + cosine/one-cycle per step, label smoothing, the same
augmentation presets and TTA, ``val_loss``/``val_accuracy`` computed by ``oof.metrics`` on the
held-out rows after every epoch) so that one config serves both families. Each measured choice is
explained where it is made (see ``bench/overhead_keras.py`` and the per-fold ``info``).

One concern per module: ``runtime`` (TensorFlow's logs, threads, device, seeds), ``model``
(applications, preprocessing, the spec, head, BatchNorm), ``optim`` (LR schedule, optimiser,
loss), ``data`` (seeded ``tf.data`` batches), ``callbacks`` (validation metrics, user callbacks,
backups, history), ``train`` (the fold and the LR range test), ``serving`` (TTA prediction,
checkpoints, the predictor). The registry (``backbones.FAMILIES``) reaches the family through
the names below.
"""

from __future__ import annotations

# runtime first: it sets TensorFlow's log level and drops its load-time lines before anything
# else of the family imports Keras
from backbones.keras.runtime import FRAMEWORK, versions  # isort: skip
from backbones.keras.model import resolve_spec
from backbones.keras.serving import load_predictor
from backbones.keras.train import lr_range_test, train_fold

__all__ = ["FRAMEWORK", "versions", "resolve_spec", "train_fold", "lr_range_test",
           "load_predictor"]
