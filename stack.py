#!/usr/bin/env python
"""Stack the runs of a dataset: honest level-2 scores over the stored folds, then a submission.
Also ``foldstack-stack``; the command lives in ``ensemble.cli``."""

from __future__ import annotations

import sys

from ensemble.cli import cli

if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:], prog="stack.py"))
