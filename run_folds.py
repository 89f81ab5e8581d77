#!/usr/bin/env python
"""Train one backbone over K stratified folds; save its OOF and test probabilities.
Also ``foldstack-run-folds``; the command lives in ``runner.cli``."""

from __future__ import annotations

import sys

from runner.cli import cli, main  # noqa: F401 - run_folds.main: the body, which tests call

if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:], prog="run_folds.py"))
