"""The timm loop's callbacks, named and parametrised as Keras names them (pure logic: the
trainer they steer is a plain object here; the end-to-end run is in test_run_folds)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from backbones.callbacks import (
    CSVLogger,
    EarlyStopping,
    ReduceLROnPlateau,
    trim_history,
    user_callbacks,
)
from oof.errors import ConfigError


def _trainer() -> SimpleNamespace:
    return SimpleNamespace(stop_training=False, scheduler=SimpleNamespace(base_lrs=[1.0, 0.5]),
                           snapshot=lambda: {"w": 1})


def test_plateau_scales_the_curve_after_patience_then_cools_down() -> None:
    cb = ReduceLROnPlateau(patience=2, factor=0.5, cooldown=1, min_lr=0.2)
    cb.set_trainer(_trainer())
    for epoch, loss in enumerate([1.0] * 6):
        cb.on_epoch_end(epoch, {"val_loss": loss})
    # reduced after epochs 2 and 4 (as Keras counts a cooldown of 1), never below min_lr
    assert cb.trainer.scheduler.base_lrs == [0.25, 0.2]


def test_early_stopping_modes_and_min_delta() -> None:
    cb = EarlyStopping(monitor="val_accuracy", patience=2, min_delta=0.05)
    cb.set_trainer(_trainer())
    assert cb.mode == "max"
    for epoch, acc in enumerate([0.5, 0.52, 0.53]):
        cb.on_epoch_end(epoch, {"val_accuracy": acc})
    assert cb.trainer.stop_training and cb.stopped_epoch == 2
    with pytest.raises(ConfigError, match="mode 'best'"):
        EarlyStopping(mode="best")


def test_user_callbacks_refuse_unknown_names_and_arguments() -> None:
    made = user_callbacks([{"name": "EarlyStopping", "patience": 4},
                           {"name": "ReduceLROnPlateau", "kwargs": {"factor": 0.3}}])
    assert made[0].patience == 4 and made[1].factor == 0.3
    with pytest.raises(ConfigError, match=r"callbacks\[0\]: timm backbones have no callback "
                                          "'ModelCheckpoint'"):
        user_callbacks([{"name": "ModelCheckpoint"}])
    with pytest.raises(ConfigError, match=r"callbacks\[1\] EarlyStopping: unknown argument"):
        user_callbacks([{"name": "CSVLogger", "filename": "x.csv"},
                        {"name": "EarlyStopping", "patiense": 3}])
    with pytest.raises(ConfigError, match="expected a mapping"):
        user_callbacks(["EarlyStopping"])


def test_csv_logger_appends_on_resume_and_trim_drops_unsaved_epochs(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    first = CSVLogger(path)
    first.on_train_begin()
    for e in range(3):
        first.on_epoch_end(e, {"loss": 1.0 / (e + 1)})
    trim_history(path, 2)  # the resume state holds 2 epochs: the third row was never saved
    again = CSVLogger(path, append=True)
    again.on_train_begin()
    again.on_epoch_end(2, {"loss": 0.25})
    lines = path.read_text().splitlines()
    assert lines[0] == "epoch,loss" and [ln.split(",")[0] for ln in lines[1:]] == ["0", "1", "2"]
    assert lines[-1] == "2,0.25"
