"""Config validation: every bad key, from YAML or a flag, is one clear error naming it.

Types and ranges are declared once on the config dataclasses (pydantic); these cases are part of
the bad-input corpus: each asserts the message names the key (or flag) and its value.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ensemble.stack import StackConfig
from oof.analyze import AnalyzeConfig
from oof.config import RunConfig, make_config, parse_config
from oof.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

BAD_YAML = [
    ("epochs: 0", "epochs=0", "greater than or equal to 1"),
    ("epochs: -2", "epochs=-2", "greater than or equal to 1"),
    ("epochs: 1.9", "epochs=1.9", "fractional part"),
    ("epochs: true", "epochs=True", "not true/false"),
    ("epochs: ten", "epochs='ten'", "valid integer"),
    ("img_size: 0", "img_size=0", "greater than or equal to 8"),
    ("batch_size: 0", "batch_size=0", "greater than or equal to 1"),
    ("lr: -0.01", "lr=-0.01", "greater than 0"),
    ("lr: .nan", "lr=nan", "greater than 0"),
    ("weight_decay: .inf", "weight_decay=inf", "finite number"),
    ("lr: false", "lr=False", "not true/false"),
    ("label_smoothing: 5", "label_smoothing=5", "less than 1"),
    ("weight_decay: -1", "weight_decay=-1", "greater than or equal to 0"),
    ("warmup_epochs: -0.5", "warmup_epochs=-0.5", "greater than or equal to 0"),
    ("folds: 1", "folds=1", "greater than or equal to 2"),
    ("fold: -1", "fold=-1", "greater than or equal to 0"),
    ("bn_momentum: 1.5", "bn_momentum=1.5", "less than 1"),
    ("threads: 0", "threads=0", "greater than or equal to 1"),
    ("num_workers: -1", "num_workers=-1", "greater than or equal to 0"),
    ("train_seed: -3", "train_seed=-3", "greater than or equal to 0"),
    ("out: null", "out=None", "valid string"),
    ("data: ''", "data=''", "at least 1 character"),
    ("backbone: 12", "backbone=12", "valid string"),
    ("augment: ''", "augment=''", "at least 1 character"),
    ("optimizer: adamm", "optimizer='adamm'", "choose one of"),
    ("amp: maybe", "amp='maybe'", "valid boolean"),
    ("callbacks: EarlyStopping", "callbacks='EarlyStopping'", "valid list"),
]


@pytest.mark.parametrize(("line", "names", "why"), BAD_YAML, ids=[c[0] for c in BAD_YAML])
def test_bad_yaml_value_names_file_key_and_value(tmp_path: Path, line: str, names: str,
                                                 why: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(line + "\n")
    with pytest.raises(ConfigError) as err:
        parse_config(RunConfig, ["--config", str(config)], "run_folds.py", "")
    message = str(err.value)
    assert f"--config {config}" in message and names in message and why in message, message


BAD_FLAGS = [
    (["--epochs", "-2"], "--epochs -2", "greater than or equal to 1"),
    (["--img-size", "0"], "--img-size 0", "greater than or equal to 8"),
    (["--lr", "-1"], "--lr -1.0", "greater than 0"),
    (["--batch-size", "0"], "--batch-size 0", "greater than or equal to 1"),
    (["--label-smoothing", "1"], "--label-smoothing 1.0", "less than 1"),
]


@pytest.mark.parametrize(("argv", "names", "why"), BAD_FLAGS, ids=[c[1] for c in BAD_FLAGS])
def test_bad_flag_value_names_the_flag(argv: list[str], names: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(RunConfig, argv, "run_folds.py", "")
    assert names in str(err.value) and why in str(err.value), str(err.value)


def test_flag_overrides_a_bad_yaml_value_and_good_values_are_typed(tmp_path: Path) -> None:
    config = tmp_path / "ok.yaml"
    config.write_text("epochs: 0\nlr: 1e-3\nimg_size: 32\n")
    cfg = parse_config(RunConfig, ["--config", str(config), "--epochs", "3"], "run_folds.py", "")
    assert (cfg.epochs, cfg.lr, cfg.img_size) == (3, 1e-3, 32)
    assert isinstance(cfg.lr, float)


def test_every_bad_key_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        make_config(RunConfig, {"epochs": 0, "lr": -1.0}, "--config c.yaml")
    assert str(err.value).count("--config c.yaml") == 2


def test_python_callers_get_the_same_checks() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        RunConfig(epochs=0)


@pytest.mark.parametrize(("cls", "values", "names"), [
    (StackConfig, {"ensemble_size": 0}, "ensemble_size=0"),
    (StackConfig, {"threads": -1}, "threads=-1"),
    (AnalyzeConfig, {"bins": 0}, "bins=0"),
    (AnalyzeConfig, {"thumb_size": True}, "thumb_size=True"),
], ids=["stack-ensemble-size", "stack-threads", "analyze-bins", "analyze-thumb-size"])
def test_stack_and_analyze_configs_are_checked(cls: type, values: dict, names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        make_config(cls, values, "--config c.yaml")


def test_run_folds_refuses_before_writing_anything(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run_folds.py"), "--out", str(out), "--epochs", "-2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert "--epochs -2: Input should be greater than or equal to 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")),
                         ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_shipped_configs_and_recipes_are_valid(path: Path) -> None:
    from backbones import split_name

    cfg = parse_config(RunConfig, ["--config", str(path)], "run_folds.py", "")
    split_name(cfg.backbone)
    assert cfg.config == str(path)
