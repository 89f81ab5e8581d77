"""``stack.py`` / ``foldstack-stack``: stack the runs of a dataset: honest level-2 scores over
the stored folds, then a submission.

``main`` parses ``ensemble.stack.StackConfig`` and calls ``stack_runs``; ``cli`` is ``main`` under
``oof.cli.main_guard`` (a FoldstackError -> one line, exit status 2), the function the root
script and the console script call.
"""

from __future__ import annotations

import os

# Before numpy loads (``ensemble/__init__`` imports nothing, so this runs first): numpy's 2 MB-page
# advice on big arrays made the kernel compact memory on first touch (THP defrag=madvise, a
# common default), 1.7 s of 3.9 for the mean blend's CV at 1.5M rows (bench/stack_scale.py).
# The user's own setting wins.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")

from oof.cli import format_table, main_guard  # noqa: E402 - after the numpy setting
from oof.config import parse_config  # noqa: E402

DOC = ("Stack the runs of a dataset: honest level-2 scores over the stored folds, then a "
       "submission.")


def main(argv: list[str] | None = None, prog: str = "foldstack-stack") -> int:
    from ensemble.stack import StackConfig, stack_runs

    cfg = parse_config(StackConfig, argv, prog, DOC)
    result = stack_runs(cfg)
    print(format_table(result.rows, result.columns))
    print(result.summary())
    return 0


def cli(argv: list[str] | None = None, prog: str = "foldstack-stack") -> int:
    return main_guard(lambda: main(argv, prog))
