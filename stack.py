#!/usr/bin/env python
"""Stack the runs of a dataset: honest level-2 scores over the stored folds, then a submission."""

from __future__ import annotations

import sys

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
