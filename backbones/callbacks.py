"""Training-loop hooks for the PyTorch loop, named as Keras names them.

``on_epoch_end(epoch, logs)`` gets a dict of metrics; a callback stops training by setting
``trainer.stop_training`` exactly as a Keras callback sets ``model.stop_training``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any


class Callback:
    trainer: Any = None

    def set_trainer(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None: ...

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None: ...

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None: ...

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None: ...


class CSVLogger(Callback):
    """Append each epoch's logs to a CSV as it finishes, so a long fold can be watched."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._keys: list[str] | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self._keys = None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        row = {"epoch": epoch, **(logs or {})}
        with self.path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self._keys or list(row))
            if self._keys is None:
                self._keys = list(row)
                writer.writeheader()
            writer.writerow({k: row.get(k) for k in self._keys})


class TerminateOnNaN(Callback):
    """Stop as soon as the training loss is NaN or infinite: later epochs cannot recover."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.trainer.stop_training = True


class BestWeights(Callback):
    """Keep the weights of the epoch with the lowest ``monitor`` (ModelCheckpoint, in memory).

    The trainer provides ``snapshot()``; the copy is only taken when the epoch improves.
    """

    def __init__(self, monitor: str = "val_loss") -> None:
        self.monitor = monitor
        self.best = math.inf
        self.best_epoch: int | None = None
        self.state: Any = None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is not None and math.isfinite(value) and value < self.best:
            self.best, self.best_epoch = value, epoch
            self.state = self.trainer.snapshot()


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved for ``patience`` epochs."""

    def __init__(self, monitor: str = "val_loss", patience: int = 3, mode: str = "min") -> None:
        self.monitor, self.patience, self.mode = monitor, patience, mode
        self.best = math.inf if mode == "min" else -math.inf
        self.wait = 0

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        better = value < self.best if self.mode == "min" else value > self.best
        if better:
            self.best, self.wait = value, 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.trainer.stop_training = True
