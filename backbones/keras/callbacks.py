"""Keras callbacks of a fold: the template's epoch events fired from inside ``model.fit``, the
user's callbacks by name, and the backup a killed fold resumes from (BackupAndRestore, repaired
when a kill damaged it)."""

from __future__ import annotations

import importlib
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backbones import close_names
from backbones.callbacks import callback_specs
from backbones.keras.runtime import keras
from oof.atomic import atomic_path
from oof.errors import ConfigError

if TYPE_CHECKING:
    from backbones.fold import FoldEvents

log = logging.getLogger(__name__)


class EpochEvents(keras.callbacks.Callback):
    """The template's epoch events (``backbones.fold.FoldEvents``) as a Keras callback, first
    after ``EpochBatches`` in ``fit``'s list.

    ``epoch_end`` completes ``logs`` in place (validation on the held-out rows through the
    template's prediction loop, seconds, images/s; history, CSV, log line, best weights, the
    template's callbacks), so every Keras callback after this one (TensorBoard, EarlyStopping,
    BackupAndRestore) reads the same numbers as the timm loop logs. Keras' ``learning_rate``
    becomes ``lr``, as timm names it.
    """

    def __init__(self, events: FoldEvents) -> None:
        super().__init__()
        self.events = events

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.events.epoch_begin(epoch)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs if logs is not None else {}
        logs.pop("learning_rate", None)
        logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        if self.events.epoch_end(epoch, logs):
            self.model.stop_training = True


def user_callbacks(specs: list[Any]) -> list[keras.callbacks.Callback]:
    """``[{name: EarlyStopping, patience: 3}]`` -> Keras callbacks, by their keras.callbacks name
    (or a dotted import path ``package.module.Class``); kwargs may also sit under ``kwargs``."""
    known = [n for n in dir(keras.callbacks) if n[:1].isupper()]
    out = []
    for i, name, kwargs in callback_specs(specs):
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
        shutil.rmtree(backup_dir)
        return None
    log.warning("fold backup in %s is damaged (killed while writing it): resuming from the "
                "previous backup, epoch %d", backup_dir, epoch)
    for src, dest in zip(previous, latest):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(src.read_bytes())
    return epoch


def backup_and_restore(backup_dir: Path) -> keras.callbacks.BackupAndRestore:
    """Keras' own resume state of one ``fit`` (weights, optimizer, epoch) after every epoch;
    the previous pair is kept, for ``repair_backup``."""
    return keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=False,
                                            double_checkpoint=True)
