"""The layer contract (``.importlinter``) holds: every import points down, checked by import-linter.

import-linter sees imports inside functions too, so a lazy ``import backbones`` in ``oof/`` breaks
the contract as surely as one at the top. Every package the contract names must exist: a
missing (renamed, deleted) one fails the check instead of being left out of it.
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


def contract_packages() -> list[str]:
    """The root packages the contract names (every one of them must exist)."""
    parser = configparser.ConfigParser()
    parser.read(CONTRACT)
    return parser["importlinter"]["root_packages"].split()


def lint(root: Path, contract: Path = CONTRACT) -> subprocess.CompletedProcess:
    """``lint-imports`` with the repository's contract file (as it is), on the code in ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT, str(contract), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_repository_keeps_its_layers() -> None:
    proc = lint(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout
    assert "KEPT" in proc.stdout
    kept = [ln for ln in proc.stdout.splitlines() if ln.endswith("KEPT")]
    assert len(kept) == 3, proc.stdout  # layers and both framework bans: none left out


def _copy_tree(dest: Path) -> Path:
    for pkg in contract_packages():
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_every_listed_package_exists_and_none_is_optional() -> None:
    assert [p for p in contract_packages() if not (REPO / p / "__init__.py").is_file()] == []
    assert not re.search(r"^\s*\(", CONTRACT.read_text(), re.M)  # no optional "(layer)"


def test_a_listed_package_that_does_not_exist_fails_the_check(tmp_path: Path) -> None:
    """The contract naming a package the code lacks (renamed here: ``runner`` -> ``runner_gone``)
    is an error, not a layer quietly left out of the check. (A copy of the tree without
    ``runner/`` would not do: the editable install still resolves ``runner`` to this checkout.)"""
    contract = tmp_path / "contract.ini"
    contract.write_text(re.sub(r"\brunner\b", "runner_gone", CONTRACT.read_text()))
    proc = lint(REPO, contract)
    assert proc.returncode != 0, proc.stdout
    assert "runner_gone" in proc.stdout + proc.stderr


@pytest.mark.parametrize("where, line, broken", [
    # a lazy import inside a function, climbing from the contract to the adapters
    ("oof/images.py", "\n\ndef _climb():\n    import backbones  # noqa\n", "layers"),
    # level 2 reaching a framework through its own import
    ("ensemble/stack.py", "\n\ndef _climb():\n    import torch  # noqa\n", "level 2"),
    # the contract importing the runner above it
    ("oof/folds.py", "\nfrom runner import run_folds  # noqa\n", "layers"),
])
def test_a_climbing_import_breaks_the_contract(tmp_path: Path, where: str, line: str,
                                               broken: str) -> None:
    """The same contract on a copy of the code with one arrow pointing up must fail."""
    root = _copy_tree(tmp_path / "tree")
    with open(root / where, "a") as fh:
        fh.write(line)
    proc = lint(root)
    assert proc.returncode != 0, proc.stdout
    broken_lines = [ln for ln in proc.stdout.splitlines() if ln.endswith("BROKEN")]
    assert any(ln.startswith(broken) for ln in broken_lines), proc.stdout
    module = where.removesuffix(".py").replace("/", ".")
    assert re.search(rf"-\s+{re.escape(module)} -> ", proc.stdout)  # names the importer
