"""The import contracts (``.importlinter``) hold, checked by import-linter, and each one bites.

The layers point down, ``ensemble`` and ``backbones`` are independent siblings, and torch /
tensorflow / lightgbm are imported only by the module that owns them. import-linter sees imports
inside functions too, so a lazy ``import torch`` in ``oof/`` breaks a contract as surely as one
at the top. Every package and family module the contracts name must exist: a missing (renamed,
deleted) one fails the check instead of being left out of it.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.requirements import INSTALL_DEV, require_program

REPO = Path(__file__).resolve().parents[1]
CONTRACT = REPO / ".importlinter"
LINT = require_program("lint-imports", INSTALL_DEV)


def _config() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(CONTRACT)
    return parser


def contract_packages() -> list[str]:
    """The root packages the contract names (every one of them must exist)."""
    return _config()["importlinter"]["root_packages"].split()


def contract_names() -> dict[str, str]:
    """Contract id (``[importlinter:contract:ID]``) -> the name lint-imports prints for it."""
    config = _config()
    return {section.rsplit(":", 1)[1]: config[section]["name"]
            for section in config.sections() if section.startswith("importlinter:contract:")}


def lint(root: Path, contract: Path = CONTRACT) -> subprocess.CompletedProcess:
    """``lint-imports`` with the repository's contract file (as it is), on the code in ``root``."""
    # COLUMNS: one line per contract in the report (rich wraps at 80 columns when piped)
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}
    return subprocess.run([LINT, str(contract), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def outcomes(stdout: str) -> dict[str, str]:
    """Contract id -> ``KEPT``/``BROKEN`` as lint-imports reported it (ids it did not report are
    absent)."""
    status = {}
    for ident, name in contract_names().items():
        for line in stdout.splitlines():
            if line.startswith(name + " ") and line.split()[-1] in ("KEPT", "BROKEN"):
                status[ident] = line.split()[-1]
    return status


def test_repository_keeps_every_contract() -> None:
    """Every contract in the file is run and KEPT: none left out, none broken."""
    proc = lint(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout
    assert outcomes(proc.stdout) == dict.fromkeys(contract_names(), "KEPT"), proc.stdout
    assert len(contract_names()) == 5  # layers, the reach ban, torch, Keras, lightgbm


def _copy_tree(dest: Path) -> Path:
    for pkg in contract_packages():
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_every_listed_package_exists_and_none_is_optional() -> None:
    assert [p for p in contract_packages() if not (REPO / p / "__init__.py").is_file()] == []
    assert not re.search(r"^\s*\(", CONTRACT.read_text(), re.M)  # no optional "(layer)"


@pytest.mark.parametrize("name, renamed, error", [
    # a package the code lacks is an error, not a layer quietly left out of the check
    ("runner", "runner_gone", "Could not find package 'runner_gone'"),
    # a family's one contract line naming a module the code lacks (the module before issue 29
    # made it a package) is an error, not a family whose framework is now allowed nowhere
    ("backbones.timm", "backbones.timm_backend",
     '"backbones.timm_backend" not present in the graph'),
])
def test_a_listed_module_that_does_not_exist_fails_the_check(tmp_path: Path, name: str,
                                                             renamed: str, error: str) -> None:
    """The contract naming a module the code lacks fails the check. (A copy of the tree without
    ``runner/`` would not do: the editable install still resolves ``runner`` to this checkout.)"""
    contract = tmp_path / "contract.ini"
    text = CONTRACT.read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() == name]
    assert len(lines) == 1 or name == "runner", lines  # a family is named in one place only
    contract.write_text(re.sub(rf"(?m)^(\s+){re.escape(name)}$", rf"\g<1>{renamed}", text))
    proc = lint(REPO, contract)
    assert proc.returncode != 0, proc.stdout
    assert error in proc.stdout + proc.stderr


LAZY = "\n\ndef _lazy():\n    {}  # noqa\n"

#: (file, the violating import appended to it, the contracts it must break: no more, no fewer)
VIOLATIONS = [
    # the OOF contract importing the adapters above it, lazily
    ("oof/images.py", LAZY.format("import backbones"), {"layers"}),
    # the OOF contract importing the runner above it, at the top
    ("oof/folds.py", "\nfrom runner import run_folds  # noqa\n", {"layers"}),
    # level 2 importing a backbone, and a backbone importing level 2: independent siblings
    ("ensemble/stack.py", LAZY.format("import backbones"), {"layers"}),
    ("backbones/base.py", LAZY.format("from ensemble import stack"), {"layers"}),
    # a framework imported lazily outside its family
    ("oof/images.py", LAZY.format("import torch"), {"frameworks-reach", "frameworks-torch"}),
    ("serve/app.py", LAZY.format("import tensorflow as tf"),
     {"frameworks-reach", "frameworks-keras"}),
    ("ensemble/stack.py", LAZY.format("from safetensors import safe_open"),
     {"frameworks-reach", "frameworks-torch"}),
    # the runner reaching torch through the family module instead of backbones.resolve
    ("runner/run.py", LAZY.format("from backbones import timm"), {"frameworks-reach"}),
    # the Keras family importing torch (a KERAS_BACKEND=torch must not load it)
    ("backbones/keras/runtime.py", LAZY.format("import torch"), {"frameworks-torch"}),
    # a framework-free module (the shared augmentation) importing a framework
    ("recipe/augment.py", LAZY.format("import h5py"),
     {"frameworks-keras", "frameworks-reach"}),  # reach: recipe is below the families
    # LightGBM outside the level-2 stackers
    ("ensemble/evaluate.py", LAZY.format("import lightgbm"), {"lightgbm"}),
]


def test_every_contract_is_bitten_by_some_violation() -> None:
    """A new contract comes with a violation below that proves it can fail."""
    assert set().union(*(broken for _, _, broken in VIOLATIONS)) == set(contract_names())


@pytest.mark.parametrize("where, line, broken", VIOLATIONS,
                         ids=[f"{w}:{sorted(b)}" for w, _, b in VIOLATIONS])
def test_one_violating_import_breaks_its_contracts(tmp_path: Path, where: str, line: str,
                                                   broken: set[str]) -> None:
    """The same contracts on a copy of the code with one violating import must fail, naming
    the contracts it breaks and the importer; every other contract stays KEPT."""
    root = _copy_tree(tmp_path / "tree")
    with open(root / where, "a") as fh:
        fh.write(line)
    proc = lint(root)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    expected = {ident: "BROKEN" if ident in broken else "KEPT" for ident in contract_names()}
    assert outcomes(proc.stdout) == expected, proc.stdout
    module = where.removesuffix(".py").replace("/", ".")
    assert re.search(rf"-\s+{re.escape(module)} -> ", proc.stdout), proc.stdout  # the importer
