"""One CLI system: every command parses a pydantic config with ``oof.config``'s parser builder,
refuses a bad value naming its flag (exit status 2), reads ``--subset`` one way, and is installed
as a console script that runs the same function as its root script.

Nothing here loads a model: the parsers refuse before any stack is read.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from oof.config import make_config, parse_config
from oof.errors import ConfigError
from serve.config import BundleConfig, PredictConfig, ServeConfig, parse_subset

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin/: pip install -e . puts the scripts there
COMMANDS = {"foldstack-run-folds": "run_folds.py", "foldstack-stack": "stack.py",
            "foldstack-analyze": "python -m oof.analyze", "foldstack-predict": "predict.py",
            "foldstack-serve": "serve.py", "foldstack-bundle": "python -m serve.bundle"}


@pytest.mark.parametrize(("given", "expected"), [
    (None, None), ("", None), ([], None), ("greedy", "greedy"), ("a", ["a"]),
    ("a,b", ["a", "b"]), (" a , b ", ["a", "b"]), (["a", "b"], ["a", "b"]),
])
def test_subset_is_read_one_way(given: object, expected: object) -> None:
    assert parse_subset(given) == expected
    assert make_config(BundleConfig, {"stack_dir": "s", "out": "o", "subset": given}
                       ).subset == expected


@pytest.mark.parametrize(("given", "message"), [
    ("a,,b", "an empty run name in 'a,,b'"), ("a,", "an empty run name"),
    (",", "an empty run name"), ("a,b,a", r"run\(s\) \['a'\] named twice"),
    (["a", ""], "an empty run name"), (3, "expected 'greedy' or run names"),
])
def test_a_bad_subset_is_refused(given: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_subset(given)


@pytest.mark.parametrize(("cls", "argv", "message"), [
    (ServeConfig, ["s", "--port", "70000"], "--port 70000: Input should be less than or equal"),
    (ServeConfig, ["s", "--port", "-1"], "--port -1: Input should be greater than or equal to 0"),
    (ServeConfig, ["s", "--max-mb", "0"], "--max-mb 0.0: Input should be greater than 0"),
    (ServeConfig, ["s", "--max-mb", "nan"], "--max-mb nan: Input should be"),
    (ServeConfig, ["s", "--threads", "0"], "--threads 0: Input should be greater than"),
    (ServeConfig, ["s", "--max-files", "0"], "--max-files 0: Input should be greater than"),
    (ServeConfig, ["s", "--model-threads", "0"], "--model-threads 0: Input should be greater"),
    (ServeConfig, ["s", "--subset", "a,,b"], "--subset a,,b: an empty run name"),
    (PredictConfig, ["s", "i.png", "--batch", "0"], "--batch 0: Input should be greater than"),
    (PredictConfig, ["s", "i.png", "--subset", ","], "--subset ,: an empty run name"),
    (BundleConfig, ["s", "--out", "o", "--subset", "x,x"], r"--subset x,x: run\(s\) \['x'\]"),
    (BundleConfig, ["", "--out", "o"], "STACK_DIR '': String should have at least 1"),
])
def test_bad_values_are_refused_naming_the_flag(cls: type, argv: list[str], message: str
                                                ) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(cls, argv, "prog", "")


def test_configs_read_flags_yaml_and_positionals(tmp_path: Path) -> None:
    """--config gives defaults, flags override; a BOOL flag alone before a positional argument
    is true, not a value read from the stack folder's name."""
    yaml_file = tmp_path / "serve.yaml"
    yaml_file.write_text("port: 9000\nmax_mb: 2\nsubset: [a, b]\nhost: 0.0.0.0\n")
    cfg = parse_config(ServeConfig, ["--config", str(yaml_file), "--allow-version-mismatch",
                                     "stack", "--port", "0"], "serve.py", "")
    assert (cfg.stack_dir, cfg.port, cfg.host, cfg.subset) == ("stack", 0, "0.0.0.0", ["a", "b"])
    assert cfg.allow_version_mismatch is True
    assert cfg.limits.max_bytes == 2 * 2**20 and cfg.limits.max_files == 32
    cfg = parse_config(PredictConfig, ["st", "a.png", "dir", "--allow-version-mismatch", "false",
                                       "--subset", "greedy"], "predict.py", "")
    assert (cfg.stack_dir, cfg.inputs, cfg.subset, cfg.batch) == ("st", ["a.png", "dir"],
                                                                  "greedy", 64)
    assert cfg.allow_version_mismatch is False
    yaml_file.write_text("port: 65536\n")
    with pytest.raises(ConfigError, match=r"--config .*serve.yaml: port=65536: Input should be"):
        parse_config(ServeConfig, ["--config", str(yaml_file), "stack"], "serve.py", "")


def _run(*argv: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_console_scripts_are_installed() -> None:
    """``pip install -e .`` put every command on the venv's PATH, as the function its root
    script calls (the entry points of setup.cfg)."""
    from importlib.metadata import entry_points

    installed = {e.name: e.value for e in entry_points(group="console_scripts")
                 if e.name.startswith("foldstack-")}
    assert sorted(installed) == sorted(COMMANDS)
    missing = [name for name in COMMANDS if not (BIN / name).is_file()]
    assert not missing, f"{missing} not in {BIN}: run pip install -c constraints.txt " \
                        "--no-deps -e ."
    root_scripts = {"foldstack-run-folds": "run_folds.py", "foldstack-stack": "stack.py",
                    "foldstack-predict": "predict.py", "foldstack-serve": "serve.py"}
    for name, script in root_scripts.items():  # the root script calls the same function
        assert installed[name].split(":")[1] in (ROOT / script).read_text(), (name, script)


def test_console_script_help_and_a_bad_flag() -> None:
    proc = _run(BIN / "foldstack-predict", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: foldstack-predict") and "IMAGE_OR_FOLDER" in proc.stdout
    assert "--allow-version-mismatch" in proc.stdout
    proc = _run(BIN / "foldstack-predict", "no_stack", "no.png", "--batch", "0")
    assert proc.returncode == 2, proc.stderr
    assert "--batch 0: Input should be greater than or equal to 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _run(BIN / "foldstack-bundle", "no_stack", "--out", "x", "--subset", "a,,b")
    assert proc.returncode == 2 and "--subset a,,b: an empty run name" in proc.stderr
    assert not (ROOT / "x").exists()


def test_root_script_refuses_like_the_console_script() -> None:
    proc = _run(sys.executable, ROOT / "serve.py", "no_stack", "--port", "70000")
    assert proc.returncode == 2, proc.stderr
    assert "--port 70000: Input should be less than or equal to 65535" in proc.stderr
    assert "Traceback" not in proc.stderr
