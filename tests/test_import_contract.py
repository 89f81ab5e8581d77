"""The layer contract (``.importlinter``) holds: every import points down, checked by import-linter.

import-linter sees imports inside functions too, so a lazy ``import backbones`` in ``oof/`` breaks
the contract as surely as one at the top. A root package named in the contract that does not
exist yet (``serve/`` while it is being written) is left out of the run rather than failing it.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONTRACT = REPO / ".importlinter"
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (dev "
                                "extra: pip install -e .[dev])")


def contract_for(root: Path, dest: Path) -> Path:
    """The repository's contract, minus root packages that ``root`` does not hold yet."""
    parser = configparser.ConfigParser()
    parser.read(CONTRACT)
    packages = parser["importlinter"]["root_packages"].split()
    present = [p for p in packages if (root / p / "__init__.py").is_file()]
    parser["importlinter"]["root_packages"] = "\n" + "\n".join(present)
    for name in parser.sections():
        section = parser[name]
        if section.get("type") == "forbidden":
            mods = [m for m in section["source_modules"].split() if m.split(".")[0] in present]
            section["source_modules"] = "\n" + "\n".join(mods)
    with open(dest, "w") as fh:
        parser.write(fh)
    return dest


def lint(root: Path, config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), str(config), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_repository_keeps_its_layers(tmp_path: Path) -> None:
    proc = lint(REPO, contract_for(REPO, tmp_path / "contract.ini"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout
    assert "KEPT" in proc.stdout


def _copy_tree(dest: Path) -> Path:
    for pkg in ("oof", "recipe", "backbones", "ensemble", "runner", "serve"):
        if (REPO / pkg).is_dir():
            shutil.copytree(REPO / pkg, dest / pkg,
                            ignore=shutil.ignore_patterns("__pycache__"))
    return dest


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
    proc = lint(root, contract_for(root, tmp_path / "contract.ini"))
    assert proc.returncode != 0, proc.stdout
    broken_lines = [ln for ln in proc.stdout.splitlines() if ln.endswith("BROKEN")]
    assert any(ln.startswith(broken) for ln in broken_lines), proc.stdout
    module = where.removesuffix(".py").replace("/", ".")
    assert re.search(rf"-\s+{re.escape(module)} -> ", proc.stdout)  # names the importer
