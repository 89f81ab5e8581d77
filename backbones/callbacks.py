"""Training-loop hooks for the PyTorch loop, named as Keras names them.

``on_epoch_end(epoch, logs)`` gets a dict of metrics; a callback stops training by setting
``trainer.stop_training`` exactly as a Keras callback sets ``model.stop_training``.
"""

from __future__ import annotations

import csv
import difflib
import inspect
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from oof.atomic import atomic_path
from oof.errors import ConfigError


class Callback:
    trainer: Any = None

    def set_trainer(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None: ...

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None: ...

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None: ...

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None: ...


class CSVLogger(Callback):
    """Append each epoch's logs to a CSV as it finishes, so a long fold can be watched.

    ``append``: keep the rows already there (a resumed fold), as Keras' CSVLogger does.
    """

    def __init__(self, filename: str | Path, separator: str = ",", append: bool = False) -> None:
        self.path, self.append = Path(filename), append
        if separator != ",":
            raise ConfigError("CSVLogger: only separator ',' is supported")
        self._keys: list[str] | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._keys = None
        if self.append and self.path.exists() and self.path.stat().st_size:
            with self.path.open(newline="") as fh:
                self._keys = next(csv.reader(fh), None)
        else:
            self.path.write_text("")

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


def _mode(monitor: str, mode: str) -> str:
    if mode not in ("auto", "min", "max"):
        raise ConfigError(f"mode {mode!r}: choose auto, min or max")
    if mode == "auto":
        return "max" if "acc" in monitor else "min"
    return mode


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs; with
    ``restore_best_weights`` (the foldstack default, as for Keras) end on the best epoch."""

    def __init__(self, monitor: str = "val_loss", patience: int = 3, mode: str = "auto",
                 min_delta: float = 0.0, restore_best_weights: bool = True) -> None:
        self.monitor, self.patience, self.mode = monitor, int(patience), _mode(monitor, mode)
        self.min_delta, self.restore = abs(float(min_delta)), bool(restore_best_weights)
        self.best = math.inf if self.mode == "min" else -math.inf
        self.wait, self.stopped_epoch, self.best_state = 0, None, None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None or not math.isfinite(value):
            return
        better = (value < self.best - self.min_delta if self.mode == "min"
                  else value > self.best + self.min_delta)
        if better:
            self.best, self.wait = value, 0
            if self.restore:
                self.best_state = self.trainer.snapshot()
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.trainer.stop_training, self.stopped_epoch = True, epoch

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.restore and self.stopped_epoch is not None and self.best_state is not None:
            self.trainer.load_weights(self.best_state)


class ReduceLROnPlateau(Callback):
    """Multiply the learning-rate curve by ``factor`` when ``monitor`` stalls for ``patience``
    epochs (the timm loop scales its scheduler's base LRs, so warmup and decay still apply)."""

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10,
                 mode: str = "auto", min_delta: float = 1e-4, cooldown: int = 0,
                 min_lr: float = 0.0) -> None:
        if not 0 < factor < 1:
            raise ConfigError(f"ReduceLROnPlateau: factor {factor} must be in (0, 1)")
        self.monitor, self.factor, self.patience = monitor, float(factor), int(patience)
        self.mode, self.min_delta = _mode(monitor, mode), abs(float(min_delta))
        self.cooldown, self.min_lr = int(cooldown), float(min_lr)
        self.best = math.inf if self.mode == "min" else -math.inf
        self.wait = self.cooling = 0

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None or not math.isfinite(value):
            return
        if self.cooling:
            self.cooling -= 1
            self.wait = 0
        better = (value < self.best - self.min_delta if self.mode == "min"
                  else value > self.best + self.min_delta)
        if better:
            self.best, self.wait = value, 0
        elif not self.cooling:
            self.wait += 1
            if self.wait >= self.patience:
                scheduler = self.trainer.scheduler
                scheduler.base_lrs = [max(self.min_lr, b * self.factor)
                                      for b in scheduler.base_lrs]
                self.wait, self.cooling = 0, self.cooldown


#: the callbacks a YAML ``callbacks:`` list may name for timm backbones (Keras takes any)
USER_CALLBACKS: dict[str, type[Callback]] = {
    "EarlyStopping": EarlyStopping, "CSVLogger": CSVLogger, "TerminateOnNaN": TerminateOnNaN,
    "ReduceLROnPlateau": ReduceLROnPlateau,
}


def callback_specs(specs: list[Any]) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(position, name, kwargs) of each item of a YAML ``callbacks:`` list, for either family:
    ``{name: EarlyStopping, patience: 3}``, the kwargs also allowed under ``kwargs``."""
    for i, item in enumerate(specs):
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"callbacks[{i}]: expected a mapping with a 'name', got {item!r}")
        kwargs = {k: v for k, v in item.items() if k not in ("name", "kwargs")}
        kwargs.update(item.get("kwargs") or {})
        yield i, str(item["name"]), kwargs


def user_callbacks(specs: list[Any]) -> list[Callback]:
    """``[{name: EarlyStopping, patience: 3}]`` -> the timm loop's callbacks, named and
    parametrised as in Keras; unknown names or arguments are refused with the closest ones."""
    out = []
    for i, name, kwargs in callback_specs(specs):
        cls = USER_CALLBACKS.get(name)
        if cls is None:
            close = difflib.get_close_matches(name, USER_CALLBACKS, 3, 0.5)
            raise ConfigError(f"callbacks[{i}]: timm backbones have no callback {name!r}; "
                              f"known: {sorted(USER_CALLBACKS)}"
                              + (f" (did you mean {close[0]}?)" if close else ""))
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        bad = sorted(set(kwargs) - accepted)
        if bad:
            raise ConfigError(f"callbacks[{i}] {name}: unknown argument(s) {bad}; it takes "
                              f"{sorted(accepted)}")
        out.append(cls(**kwargs))
    return out


def trim_history(path: Path, epochs_done: int) -> None:
    """Keep only the CSV rows of epochs the resume state holds, so a resumed fold's history
    has each epoch once."""
    if not path.exists():
        return
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    col = header.index("epoch") if "epoch" in header else 0
    keep = [r for r in body if r and r[col].isdigit() and int(r[col]) < epochs_done]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *keep])


def read_history(path: Path) -> list[dict[str, Any]]:
    """The fold's history CSV (every epoch written, also before an interruption) as dicts:
    ``epoch`` an int, numbers as floats, anything else as written."""
    if not path.exists() or path.stat().st_size == 0:
        return []
    rows = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            out: dict[str, Any] = {}
            for k, v in row.items():
                try:
                    out[k] = int(v) if k == "epoch" else float(v)
                except (TypeError, ValueError):
                    out[k] = v
            rows.append(out)
    return rows
