"""One rule for a real part a test needs (a package, a program, a download): skip locally, fail
under CI.

A developer without Chromium or Ray still gets a useful local run, but CI (``CI=true``, as
GitHub Actions and most CI services set it) must never report green on a suite that quietly
skipped the only tests of the browser, the Ray executor or real ImageNet weights. Every such
test calls ``require_module``, ``require_program`` or ``missing`` below and never
``pytest.skip``/``importorskip`` itself; the only skips left in a CI run are hardware ones (no
GPU), marked with ``pytest.mark.skipif`` where they stand.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

INSTALL_DEV = "pip install -c constraints.txt -e .[dev]"
INSTALL_SERVE = "pip install -c constraints.txt -e .[serve]"
INSTALL_RAY = "pip install -c constraints.txt -e .[ray]"
MAKE_BROWSER = "make browser (Debian's chromium and chromium-driver)"


def in_ci() -> bool:
    """True under ``CI=true`` (or 1/yes): a missing part then fails the test instead."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(what: str, hint: str) -> NoReturn:
    """``what`` is not available: skip the test (or module) locally, fail it under CI."""
    message = f"{what} is missing; install it: {hint}"
    if in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require_module(name: str, hint: str) -> ModuleType:
    """Import ``name`` (e.g. ``selenium.webdriver``), or skip locally / fail under CI."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        error = str(exc)
    missing(f"Python module {name!r} ({error})", hint)  # outside the except: no chained trace


def require_program(name: str, hint: str) -> str:
    """The path of the program ``name``: the venv's own (next to this Python) first, then PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        missing(f"program {name!r} (not beside {sys.executable} nor on PATH)", hint)
    return found
