#!/usr/bin/env python
"""Stack the runs of a dataset: honest level-2 scores over the stored folds, then a submission."""

from __future__ import annotations

import os
import sys

# Before numpy loads: its 2 MB-page advice on big arrays made the kernel compact memory on first
# touch (THP defrag=madvise, a common default), 1.7 s of 3.9 for the mean blend's CV at 1.5M
# rows (bench/stack_scale.py). The user's own setting wins.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")

from oof.cli import format_table, main_guard
from oof.config import parse_config


def main(argv: list[str] | None = None) -> int | None:
    from ensemble.stack import StackConfig, stack_runs

    cfg = parse_config(StackConfig, argv, "stack.py", __doc__ or "")
    result = stack_runs(cfg)
    print(format_table(result.rows, result.columns))
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(lambda: main(sys.argv[1:])))
