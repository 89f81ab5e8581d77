"""Keras callbacks of a fold: validation metrics in the logs, the user's callbacks by name,
the backup a killed fold resumes from, and the history it writes."""

from __future__ import annotations

import importlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from backbones import close_names
from backbones.callbacks import read_history
from backbones.keras.serving import predict_proba
from oof.atomic import atomic_path
from oof.errors import ConfigError
from oof.metrics import accuracy, log_loss

log = logging.getLogger(__name__)

class FoldMetrics(keras.callbacks.Callback):
    """Adds timm's per-epoch keys to ``logs`` before any other callback reads them.

    ``val_loss``/``val_accuracy`` are the plain log loss and accuracy of ``oof.metrics`` on the
    held-out rows (no label smoothing), exactly what the timm loop logs, so ModelCheckpoint and
    EarlyStopping monitor the same number in both families.
    """

    def __init__(self, x_val: np.ndarray, y_val: np.ndarray, fold: int, epochs: int,
                 echo: bool = True, n_train: int = 0) -> None:
        super().__init__()
        self.x_val, self.y_val, self.fold, self.epochs = x_val, y_val, fold, epochs
        self.n_train = n_train
        self.echo = echo
        self.seconds: list[float] = []
        self._t0 = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs if logs is not None else {}
        val = predict_proba(self.model, self.x_val)
        logs.pop("learning_rate", None)
        logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logs["val_loss"] = log_loss(self.y_val, val)
        logs["val_accuracy"] = accuracy(self.y_val, val)
        logs["seconds"] = time.perf_counter() - self._t0
        logs["images_per_second"] = self.n_train / logs["seconds"]
        self.seconds.append(logs["seconds"])
        # Keras' progress bar already prints these numbers: echo them only without it
        (log.info if self.echo else log.debug)(
            "fold %d epoch %d/%d %s", self.fold, epoch + 1, self.epochs,
            " ".join(f"{k}={float(v):.4g}" for k, v in logs.items()))


def user_callbacks(specs: list[Any]) -> list[keras.callbacks.Callback]:
    """``[{name: EarlyStopping, patience: 3}]`` -> Keras callbacks, by their keras.callbacks name
    (or a dotted import path ``package.module.Class``); kwargs may also sit under ``kwargs``."""
    known = [n for n in dir(keras.callbacks) if n[:1].isupper()]
    out = []
    for i, item in enumerate(specs):
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"callbacks[{i}]: expected a mapping with a 'name', got {item!r}")
        kwargs = {k: v for k, v in item.items() if k not in ("name", "kwargs")}
        kwargs.update(item.get("kwargs") or {})
        name = str(item["name"])
        if "." in name:
            module, _, attr = name.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise ConfigError(f"callbacks[{i}]: cannot import {name} ({exc})") from exc
        elif name in known:
            cls = getattr(keras.callbacks, name)
        else:
            raise ConfigError(f"callbacks[{i}]: keras.callbacks has no {name!r}; closest: "
                              f"{close_names(name, known)}")
        if name == "EarlyStopping":
            kwargs.setdefault("restore_best_weights", True)
        try:
            out.append(cls(**kwargs))
        except TypeError as exc:
            raise ConfigError(f"callbacks[{i}] {name}: {exc}") from exc
    return out


def _best_so_far(history_path: Path, monitor: str = "val_loss") -> float | None:
    """On resume, the best monitored value of the epochs already trained (ModelCheckpoint's
    memory is not part of the backup)."""
    rows = read_history(history_path)
    values = [r[monitor] for r in rows if isinstance(r.get(monitor), float)
              and math.isfinite(r[monitor])]
    return min(values) if values else None


BACKUP_WEIGHTS, BACKUP_META = "latest.weights.h5", "training_metadata.json"
PREVIOUS = ".bkp"  # suffix of the previous pair that double_checkpoint=True keeps


def _backup_pair_epoch(weights: Path, meta: Path) -> int | None:
    """The epoch a backup (weights, metadata) pair resumes from, or None if either is damaged."""
    import h5py

    try:
        epoch = json.loads(meta.read_text())["epoch"]
        with h5py.File(weights, "r") as fh:
            if not len(fh.keys()):
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return epoch if isinstance(epoch, int) and epoch >= 0 else None


def repair_backup(backup_dir: Path) -> int | None:
    """The epoch a killed fold resumes from, after making its backup loadable; None: restart.

    A kill while BackupAndRestore writes leaves a truncated ``latest.weights.h5`` or an empty
    ``training_metadata.json``, on which every rerun crashed. The previous pair (kept by
    ``double_checkpoint``) is then put back; if both pairs are damaged the fold starts over.
    """
    latest = backup_dir / BACKUP_WEIGHTS, backup_dir / BACKUP_META
    if not any(p.exists() for p in latest):
        return None
    epoch = _backup_pair_epoch(*latest)
    if epoch is not None:
        return epoch
    previous = tuple(p.with_name(p.name + PREVIOUS) for p in latest)
    epoch = _backup_pair_epoch(*previous)
    if epoch is None:
        log.warning("fold backup in %s is damaged and has no good previous copy: the fold "
                    "starts over", backup_dir)
        import shutil

        shutil.rmtree(backup_dir)
        return None
    log.warning("fold backup in %s is damaged (killed while writing it): resuming from the "
                "previous backup, epoch %d", backup_dir, epoch)
    for src, dest in zip(previous, latest):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(src.read_bytes())
    return epoch
