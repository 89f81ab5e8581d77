"""``run_folds.py`` / ``foldstack-run-folds``: train one backbone over K stratified folds (or a
plan of runs, locally or on Ray); save its OOF and test probabilities.

``main`` parses ``oof.config.RunConfig`` (and ``runner.plan.ExecutorConfig``) and calls one
library function; ``cli`` is ``main`` under ``oof.cli.main_guard`` (a FoldstackError -> one line,
exit status 2), the function the root script and the console script call.
"""

from __future__ import annotations

import sys

from oof.cli import format_table, main_guard
from oof.config import RunConfig, parse_config

DOC = "Train one backbone over K stratified folds; save its OOF and test probabilities."


def main(argv: list[str] | None = None, prog: str = "foldstack-run-folds") -> int | None:
    from runner.plan import executor_help, parse_executor_args

    ex, rest = parse_executor_args(sys.argv[1:] if argv is None else argv)
    if ex.plan:
        from runner.executors import run_plan
        from runner.plan import load_plan, run_flags

        return print_plan(run_plan(load_plan(ex.plan, run_flags(rest)), ex))
    cfg = parse_config(RunConfig, rest, prog, f"{DOC} {executor_help()}")
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
        meta = summary.run.meta if summary.run is not None else {}
        if meta.get("passes_per_image") is not None:
            print(f"cost: {meta['passes_per_image']} passes per image, "
                  f"{meta['ms_per_image']:.2f} ms per image (measured)")
        if summary.refit is not None:
            r = summary.refit
            print(f"refit model: {r['epochs_run']} epochs on all {r['n_train']} training rows, "
                  f"{r['passes_per_image']} passes per image -> {r['checkpoint']} (no OOF of "
                  "its own: the OOF above estimates it)")
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


def cli(argv: list[str] | None = None, prog: str = "foldstack-run-folds") -> int:
    """``main`` for a process of its own: after a full disk it ends at once (``main_guard``)."""
    return main_guard(lambda: main(argv, prog), hard_exit_on_disk_full=True)
