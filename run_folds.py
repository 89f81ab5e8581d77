#!/usr/bin/env python
"""Train one backbone over K stratified folds; save its OOF and test probabilities."""

from __future__ import annotations

import sys

from oof.cli import format_table, main_guard
from oof.config import RunConfig, parse_config


def main(argv: list[str] | None = None) -> int | None:
    from runner.run import lr_find, run_folds

    cfg = parse_config(RunConfig, argv, "run_folds.py", __doc__ or "")
    if cfg.lr_find:
        found = lr_find(cfg)
        r = found.result
        print(f"suggested --lr {r.suggested_lr:.2g} (steepest descent; lowest loss at "
              f"{r.min_loss_lr:.2g}" + (f", diverged at {r.diverged_at:.2g}" if r.diverged_at
                                        else "") + f") -> {found.plot_path}")
        return 0
    summary = run_folds(cfg)
    columns = ["fold", "accuracy", "log_loss", "seconds", "epochs_run"]
    print(format_table(summary.fold_rows, columns))
    if summary.complete:
        s = summary.oof_scores
        print(f"OOF accuracy {s['accuracy']:.4f}  log loss {s['log_loss']:.4f}"
              f"  -> {summary.run_dir}")
    else:
        print(f"run incomplete: folds done {[r['fold'] for r in summary.fold_rows]} "
              f"-> {summary.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(lambda: main(sys.argv[1:]), hard_exit_on_disk_full=True))
