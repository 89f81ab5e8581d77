"""``tests.requirements``: a missing part skips a test locally and fails it under ``CI=true``.

Each case is a real pytest run in a subprocess on a small test file that needs a module and a
program that do not exist, at module level and inside a test, with and without ``CI=true``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

NEEDS_PARTS = """
from tests.requirements import require_module, require_program

def test_needs_a_module():
    require_module("foldstack_no_such_module", "pip install foldstack-no-such-module")

def test_needs_a_program():
    require_program("foldstack-no-such-program", "apt-get install no-such-program")

def test_needs_nothing():
    pass
"""

NEEDS_A_MODULE_TO_IMPORT = """
from tests.requirements import require_module

require_module("foldstack_no_such_module", "pip install foldstack-no-such-module")

def test_never_runs_without_it():
    pass
"""


def _pytest(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    """Both test files in one plain pytest run (no plugins, no config: fast and isolated)."""
    (tmp_path / "test_parts.py").write_text(NEEDS_PARTS)
    (tmp_path / "test_module_level.py").write_text(NEEDS_A_MODULE_TO_IMPORT)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PYTHONPATH=str(REPO), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", "--rootdir",
         str(tmp_path), "-c", os.devnull, "--continue-on-collection-errors", "test_parts.py",
         "test_module_level.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


HINTS = ("Python module 'foldstack_no_such_module'", "pip install foldstack-no-such-module",
         "program 'foldstack-no-such-program'", "apt-get install no-such-program")


def test_missing_part_skips_locally_and_fails_under_ci(tmp_path: Path) -> None:
    local = _pytest(tmp_path, None)
    out = local.stdout
    assert local.returncode == 0, out + local.stderr
    assert "1 passed, 3 skipped" in out and "failed" not in out and "error" not in out, out
    assert all(h in out for h in HINTS), out  # the skip reason says what to install

    ci = _pytest(tmp_path, "true")
    out = ci.stdout
    assert ci.returncode != 0, out
    assert "skipped" not in out, out
    assert "2 failed, 1 passed, 1 error" in out, out  # the module-level one: a collection error
    assert out.count("CI=true and ") >= 3 and all(h in out for h in HINTS), out


# A skip for the hardware a test runs on (no GPU, one core) is legitimate in CI too; its line
# says so with one of these words.
HARDWARE = re.compile(r"GPU|nvidia|cores", re.I)
SKIPPING = re.compile(r"importorskip\(|\.skip\(|skipif\(|allow_module_level")


def test_every_skip_goes_through_the_one_rule() -> None:
    """No test skips for a missing part on its own (it would pass green in CI): only
    ``tests/requirements.py`` skips, and the hardware skips that name their hardware."""
    own = {Path(__file__).name, "requirements.py"}
    found = [f"{path.name}:{n}: {line.strip()}"
             for path in sorted((REPO / "tests").glob("*.py")) if path.name not in own
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if SKIPPING.search(line) and not HARDWARE.search(line)]
    assert found == [], ("use tests.requirements (require_module, require_program, missing) "
                         "instead of skipping:\n" + "\n".join(found))
