#!/usr/bin/env python
"""Train one backbone over K stratified folds; save its OOF and test probabilities."""

from __future__ import annotations

import sys

from oof.cli import format_table, main_guard
from oof.config import RunConfig, parse_config


def main(argv: list[str] | None = None) -> int | None:
    from runner.plan import executor_help, parse_executor_args

    ex, rest = parse_executor_args(sys.argv[1:] if argv is None else argv)
    if ex.plan:
        from runner.executors import run_plan
        from runner.plan import load_plan, run_flags

        return print_plan(run_plan(load_plan(ex.plan, run_flags(rest)), ex))
    cfg = parse_config(RunConfig, rest, "run_folds.py", f"{__doc__} {executor_help()}")
    if cfg.write_augment:
        from runner.run import write_augment

        print(f"wrote the --augment {cfg.augment} pipeline -> {write_augment(cfg)}")
        return 0
    if cfg.lr_find:
        from runner.run import lr_find

        found = lr_find(cfg)
        r = found.result
        print(f"suggested --lr {r.suggested_lr:.2g} (steepest descent; lowest loss at "
              f"{r.min_loss_lr:.2g}" + (f", diverged at {r.diverged_at:.2g}" if r.diverged_at
                                        else "") + f") -> {found.plot_path}")
        return 0
    if ex.executor != "local":
        from runner.executors import run_plan, single_run_plan

        return print_plan(run_plan(single_run_plan(cfg), ex))
    from runner.run import run_folds

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


def print_plan(result) -> int:  # noqa: ANN001 - runner.executors.PlanResult, imported lazily
    print(result.table)
    for run in result.runs:
        if run and run["complete"]:
            s = run["oof_scores"]
            print(f"OOF accuracy {s['accuracy']:.4f}  log loss {s['log_loss']:.4f}"
                  f"  -> {run['run_dir']}")
    if result.stack is not None:
        print(result.stack.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(lambda: main(sys.argv[1:]), hard_exit_on_disk_full=True))
