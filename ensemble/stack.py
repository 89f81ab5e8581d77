"""``stack_runs``: level-1 run folders in, honest level-2 table + submission + report out.

Order of work: find and load the runs, check them all (nothing is written if any check fails),
score every method by CV over the stored folds, fit the chosen one on all OOF rows, apply it to
the runs' fold-mean test matrices, then write the level-2 run, the submission and the report.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ensemble.budget import (
    Budget,
    Search,
    candidates,
    cv_scorer,
    exact_limit,
    fit_predict,
    level2_oof,
    nested_cv,
    search,
)
from ensemble.calibrate import (
    TemperatureCV,
    TemperatureScaled,
    apply_temperature,
    cross_val_temperature,
)
from ensemble.cost import Variant, run_cost, total_cost
from ensemble.evaluate import Level2, cross_val_level2, describe, full_proba, level1_matrix
from ensemble.pseudo import (
    fold_k_test_matrix,
    source_runs,
    stale_stacks,
    write_stack_pseudo_source,
)
from ensemble.saved import save_stacker
from ensemble.stackers import STACKERS, make_stacker
from ensemble.submission import build_submission, submission_ids
from ensemble.variants import REFIT_NOTE, VariantRun
from oof.atomic import write_atomic, write_json, write_text
from oof.cli import format_table
from oof.config import (
    DatasetConfig,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    config_dataclass,
    config_dict,
    opt,
    save_config,
)
from oof.distill import STUDENT_FOOTNOTE, is_student, marked, teacher_runs
from oof.errors import ConfigError, DataError, FoldstackError, RunMismatchError
from oof.folds import Folds, load_folds
from oof.metrics import METRICS, accuracy, calibration, log_loss
from oof.pseudo import PSEUDO_FILE
from oof.rundir import FOLD_K_ONLY, META_FILE, Run, check_compatible, find_runs, load_run

log = logging.getLogger(__name__)

FRONT_PNG = "front.png"
METHODS = tuple(STACKERS)  # simplest first: the order of the table and of ties in `auto`
TABLE_COLUMNS = ["model", "level", "accuracy", "log_loss", "macro_f1", "top3", "ece", "ece_floor",
                 "calibration_p", "passes", "ms_per_image", "seconds", "chosen", "note"]
# Where the dataset ships held-out test labels (the demos): each model's CV (OOF) score beside its
# score on those labels. A run's test prediction is the mean of its fold models, a level-2
# method's the mean of its fold stackers; the submission row is the final stacker's.
HELD_OUT_COLUMNS = ["model", "level", "oof_accuracy", "oof_log_loss", "held_out_accuracy",
                    "held_out_log_loss", "held_out_ece", "held_out_ece_floor",
                    "held_out_calibration_p", "gain_vs_best_run", "mcnemar_p", "passes",
                    "ms_per_image"]


def _calibration_footnote(prefix: str, row: str) -> str:
    """What the floor and p beside an ECE mean, under a table of ``row``s."""
    return (f"`{prefix}ece_floor`: the ECE that exactly calibrated probabilities score on these "
            f"{row}s by chance (each {row}'s correctness drawn from its own confidence, 1,000 "
            f"draws, fewer above 50,000 {row}s); `{prefix}calibration_p`: the share of those "
            f"draws scoring at least `{prefix}ece`. A small p says the miscalibration is real; a "
            f"large one that the ECE is within chance on this many {row}s.")


LEVEL2_FOOTNOTE = _calibration_footnote("", "OOF row")
HELD_OUT_FOOTNOTE = _calibration_footnote("held_out_", "image")

# The budget front: one row per point better than every cheaper one (CV over the stored folds
# of the search method; the held-out columns where the dataset has held-out labels).
FRONT_COLUMNS = ["passes", "ms_per_image", "runs", "log_loss", "accuracy", "ece", "ece_floor",
                 "calibration_p", "held_out_log_loss", "held_out_accuracy", "chosen"]


@config_dataclass
class StackConfig(DatasetConfig):
    """Everything ``stack.py`` needs: where the runs are, which stacker, and its few knobs."""

    runs: list = opt([], "run folders or globs (relative to the run root or the current "
                         "folder); default: every complete level-1 run in the run root")
    method: str = opt("auto", "level-2 method for the submission; auto = best level-2 score",
                      ("auto", *METHODS))
    metric: str = opt("log_loss", "metric of auto (and of greedy selection: accuracy there "
                      "for any metric but log_loss)", tuple(METRICS))
    compare: bool = opt(True, "score every method for the table (false: mean + the chosen one)")
    name: str | None = opt(None, "output folder in the run root (default: stack-<method>)")
    ensemble_size: PositiveInt = opt(25, "greedy: steps of ensemble selection (with replacement)")
    inputs: str = opt("log", "logreg: features are log-probabilities or probabilities",
                      ("log", "proba"))
    allow_pseudo_mix: bool = opt(
        False, "stack a pseudo-labelled run with the runs whose test predictions labelled its "
        "training images (refused by default: their errors on those images are correlated)")
    allow_teacher_mix: bool = opt(
        False, "stack a distilled student with its teacher or the runs its teacher stacked "
        "(refused by default: its OOF is optimistic, its targets came from their OOF, so the "
        "level-2 CV would overweight it)")
    temperature: str = opt(
        "off", "temperature scaling of the chosen method's output (one T fitted by CV over the "
        "stored folds): auto = applied when it lowers the level-2 CV log loss; always; off",
        ("off", "auto", "always"))
    budget: PositiveInt | None = opt(
        None, "forward passes per image the stack may cost (runs x folds x TTA views): the "
        "runs entering the stack are the subset with the best level-2 CV --metric within it")
    budget_ms: PositiveFloat | None = opt(
        None, "milliseconds per image the stack may cost (every run must have measured "
        "ms_per_image in its meta.json)")
    budget_refit: bool = opt(
        True, "under a budget, a run with a --refit-full model may be served by it (V passes "
        "instead of K x V; chosen by its run's OOF, as it has none of its own, so at equal "
        "score the cheaper refit wins)")
    budget_views: bool = opt(
        True, "under a budget, a run trained with --tta-save-views may be served on a subset of "
        "its TTA views")
    threads: PositiveInt = opt(1, "lightgbm threads")
    seed: NonNegativeInt = opt(0, "seed of the stackers' inner CV splits")


@dataclass
class StackResult:
    """What ``stack_runs`` did: the side-by-side table, the choice, and where files went."""

    rows: list[dict[str, Any]]
    columns: list[str]
    chosen: str
    out_dir: Path
    submission: Path
    level2_run: Path
    test_accuracy: float | None = None
    report: dict[str, Any] = field(default_factory=dict)
    held_out: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        """The lines a script prints under the table."""
        row = next(r for r in self.rows if r["chosen"])
        lines = [f"chosen: {self.chosen} (level-2 CV accuracy {row['accuracy']:.4f}, "
                 f"log loss {row['log_loss']:.4f}) -> {self.submission}"]
        if self.report.get("front"):
            b = self.report["budget"]
            lines += ["", f"cost front ({b['metric']} by the level-2 CV of {b['method']}; the "
                      f"chosen point's score is optimistic; {FRONT_PNG} in the stack folder):",
                      format_table(self.report["front"], FRONT_COLUMNS)]
        if self.held_out:
            lines += ["", f"held-out test labels ({self.report.get('held_out_rows')} images) "
                      "against the CV (OOF) scores:",
                      format_table(self.held_out, HELD_OUT_COLUMNS)]
        if self.test_accuracy is not None:
            lines.append(f"submission accuracy on the held-out test labels: "
                         f"{self.test_accuracy:.4f}")
        if self.report.get("students"):  # under the level-2 table and the held-out table
            lines.append(STUDENT_FOOTNOTE)
        return "\n".join(lines)


def stacker_params(method: str, cfg: StackConfig) -> dict[str, Any]:
    """Config -> keyword arguments of one stacker."""
    if method == "greedy":
        return {"ensemble_size": cfg.ensemble_size,
                "metric": "log_loss" if cfg.metric == "log_loss" else "accuracy"}
    if method == "logreg":
        return {"inputs": cfg.inputs, "random_state": cfg.seed}
    if method == "lightgbm":
        return {"n_jobs": cfg.threads, "random_state": cfg.seed}
    return {}


def resolve_run_paths(run_root: Path, patterns: list[str]) -> list[Path]:
    """Run folders named by ``--runs`` (names or globs), or every complete run of the root."""
    if not patterns:
        found = find_runs(run_root)
        skipped = sorted(set(find_runs(run_root, complete_only=False)) - set(found))
        for p in skipped:
            log.warning("skipping incomplete run %s (finish it with its run_folds.py command)", p)
        if not found:
            raise RunMismatchError(
                f"{run_root}: no complete runs to stack; train some first with "
                "run_folds.py (same --data and --out), or name them with --runs"
            )
        return found
    paths: list[Path] = []
    for pat in patterns:
        if glob.has_magic(pat):
            hits = [Path(h) for base in (run_root, Path.cwd())
                    for h in sorted(glob.glob(os.path.join(base, pat)))
                    if (Path(h) / "meta.json").exists()]
        else:
            hits = [next((c for c in (run_root / pat, Path(pat)) if c.exists()), run_root / pat)]
        if not hits:
            raise ConfigError(f"--runs {pat!r}: matches no run folder under {run_root} or "
                              f"{Path.cwd()}")
        paths.extend(hits)
    unique: dict[Path, Path] = {}
    for p in paths:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def load_checked(paths: list[Path], run_root: Path, explicit: bool) -> tuple[list[Run], Folds]:
    """Load every run and refuse the set, naming each bad run and why, before any work."""
    stored = load_folds(run_root)
    runs, problems, damaged = [], [], False
    for p in paths:
        try:
            runs.append(load_run(p, stored))
        except (FoldstackError, OSError, KeyError, ValueError) as exc:
            problems.append(f"{p}: {exc}")
            damaged = damaged or isinstance(exc, DataError)
    if problems:  # a damaged file is a DataError (it names the file), a mismatch is not
        error = DataError if damaged else RunMismatchError
        raise error("these runs cannot be stacked:\n  " + "\n  ".join(problems))
    if not explicit:
        level2 = [r for r in runs if run_level(r) >= 2]
        runs = [r for r in runs if run_level(r) < 2]
        if level2:
            log.info("not stacking stacks by default: %s (name them with --runs to do so)",
                     ", ".join(r.name for r in level2))
        if not runs:
            raise RunMismatchError(f"{run_root}: only level-2 runs found; train level-1 runs "
                                   "first with run_folds.py")
    check_compatible(runs)
    ref = runs[0]
    if stored is not None and stored.fingerprint != ref.fingerprint:
        raise RunMismatchError(
            "these runs cannot be stacked:\n  " + "\n  ".join(
                f"{r.name} ({r.path}): fold fingerprint {r.fingerprint} != {stored.fingerprint} "
                f"of {run_root / 'folds.csv'}: trained on other folds" for r in runs))
    k = stored.k if stored else int(ref.meta.get("folds", len(np.unique(ref.folds))))
    seed = stored.seed if stored else int(ref.meta.get("fold_seed", -1))
    folds = Folds(ref.ids, ref.labels, ref.folds, k, seed, ref.fingerprint)
    return runs, folds


def run_level(run: Run) -> int:
    """1 for a trained backbone, 2 for a stack of those, 3 for a stack of stacks..."""
    return int(run.meta.get("level", 1))


def _note(method: str, level2: Level2) -> str:
    """One short cell: what each fold's stacker learned."""
    f = level2.folds
    if method in ("greedy", "blend"):
        w = np.mean([list(d["weights"].values()) for d in f], axis=0)
        names = list(f[0]["weights"])
        return "mean weights " + " ".join(f"{n}={v:.2f}" for n, v in zip(names, w) if v > 0)
    if method == "logreg":
        return "C per fold " + ",".join(f"{d['C']:g}" for d in f)
    if method == "lightgbm":
        return "rounds per fold " + ",".join(str(d["boosting_rounds"]) for d in f)
    return {"geo": "geometric mean", "rank": "mean of per-class ranks"}.get(method,
                                                                            "equal weights")


def _backbone(run: Run) -> str:
    bb = run.meta.get("backbone")
    return str(bb.get("name", "")) if isinstance(bb, dict) else str(bb or "")


def variant_name(run: Run) -> str:
    """'<run>[refit]', '<run>[folds:identity]'...: a run as a budget serves it (a student's name
    marked as every table marks it)."""
    name = f"{run.name}[{run.variant.label}]" if isinstance(run, VariantRun) else run.name
    return marked(name, run.meta)


def variant_note(run: VariantRun) -> str:
    """What a variant row's OOF scores mean (a refit model has no OOF of its own)."""
    views = "" if run.variant.views is None else f"TTA views {'+'.join(run.variant.views)} only"
    if run.variant.models == "refit":
        return REFIT_NOTE + (f"; {views}" if views else "")
    return f"its {run.meta.get('folds', '')} fold models, {views} (OOF = their mean)"


def choose(results: dict[str, Level2], metric: str) -> str:
    """Best level-2 score; ties go to the simpler method (the METHODS order)."""
    def key(m: str) -> tuple[float, float, int]:
        s = results[m].scores
        first = -s[metric] if METRICS[metric] else s[metric]
        return (first, s["log_loss"], METHODS.index(m))

    return min(results, key=key)


def _markdown(report: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    top = report["level"]
    lines = [f"# Level-{top} stack of {report['dataset']}", "",
             f"Chosen: **{report['chosen']}** ({report['choice']}).", "",
             f"Input rows: each run's OOF scores. Level-{top} rows: CV over the stored folds "
             f"(K={report['folds']['k']}); the stacker scoring fold k was fitted on the other "
             "folds' rows only. With `auto`, picking the best of several scores makes the "
             "chosen score slightly optimistic. `ece`: expected calibration error (15 equal-width "
             "bins of top-label confidence); `ece_floor` and `calibration_p`: see the footnote. "
             "`passes`: forward passes per image (fold models x "
             "TTA views, summed over the runs a stack serves); `ms_per_image`: measured at "
             "training, blank where not measured.", "", format_table(rows, TABLE_COLUMNS), "",
             LEVEL2_FOOTNOTE, ""]
    footnote = [STUDENT_FOOTNOTE, ""] if report.get("students") else []
    lines += footnote
    t = report.get("temperature")
    if t:
        lines += [f"Temperature scaling of {report['chosen']}: T = {t['temperature']:.4f} "
                  f"(fitted on all OOF rows), {'applied' if t['applied'] else 'not applied'} "
                  f"({t['rule']}; the CV row fits the T of fold k without fold k).", ""]
    b = report.get("budget")
    if b:
        nested = b["nested_cv_scores"]
        lines += [f"## Budget: {b['passes'] or '-'} passes, {b['ms'] or '-'} ms per image", "",
                  f"Runs in the stack: {', '.join(b['chosen'])} ({b['passes_chosen']} passes), "
                  f"the best level-2 CV {b['metric']} of `{b['method']}` among "
                  f"{b['subsets_scored']} subsets ({'all' if b['exact_search'] else 'greedy'}). "
                  "That CV chose it, so its score is optimistic"
                  + (f"; nested CV (chosen on K-1 folds, scored on the K-th): log loss "
                     f"{nested['log_loss']:.4f}, accuracy {nested['accuracy']:.4f}." if nested
                     else " (fewer than 3 folds: no nested CV)."), "",
                  f"![front]({FRONT_PNG})", "",
                  "The front (each point better than every cheaper one):", "",
                  format_table(report["front"], FRONT_COLUMNS), ""]
    if report.get("held_out"):
        lines += [f"Held-out test labels ({report['held_out_rows']} images) against the CV "
                  "(OOF) scores:", "", format_table(report["held_out"], HELD_OUT_COLUMNS), "",
                  HELD_OUT_FOOTNOTE, "", *footnote]
    if report.get("test_accuracy") is not None:
        lines += [f"Submission accuracy on held-out test labels: {report['test_accuracy']:.4f}",
                  ""]
    learned = {k: v for k, v in report["final"].items() if k not in ("method", "params")}
    lines += [f"Final stacker, fitted on all OOF rows: **{report['chosen']}**, learned {learned}, "
              f"parameters {report['final']['params']}.", "",
              f"Submission: `{report['submission']}` ({report['submission_ids']})", ""]
    return "\n".join(lines)


def held_out_rows(truth: Any, test_ids: np.ndarray, classes: list[str],
                  models: list[tuple[Any, ...]],
                  source: str = "test_labels.csv") -> list[dict[str, Any]]:
    """One row per model: its OOF scores and its test probabilities (rows in ``test_ids`` order)
    scored on the held-out labels ``truth`` (``Id``, ``Category``: every test id, once).

    ``models``: (name, level, OOF scores, test probabilities[, extra cells such as the cost]).
    """
    pos = {str(i): n for n, i in enumerate(test_ids)}
    ids, labels = [str(i) for i in truth["Id"]], [str(c) for c in truth["Category"]]
    if sorted(ids) != sorted(pos):
        raise DataError(f"{source}: its {len(ids)} ids are not the runs' {len(pos)} test ids")
    index = {c: k for k, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DataError(f"{source}: labels outside the class set {classes}: {unknown[:5]}")
    rows_of = np.array([pos[i] for i in ids])
    y = np.array([index[c] for c in labels])
    out, right = [], []
    for name, level, oof_scores, proba, *extra in models:
        p = np.asarray(proba)[rows_of]
        right.append(p.argmax(axis=1) == y)
        out.append({"model": name, "level": level, "oof_accuracy": oof_scores["accuracy"],
                    "oof_log_loss": oof_scores["log_loss"],
                    "held_out_accuracy": accuracy(y, p), "held_out_log_loss": log_loss(y, p),
                    **{f"held_out_{k}": v for k, v in calibration(y, p).items()},
                    **(extra[0] if extra else {})})
    singles = [k for k, row in enumerate(out) if row["level"] == 1]
    if singles:  # every model against the best level-1 run, on the same images
        best = max(singles, key=lambda k: out[k]["held_out_accuracy"])
        for k, row in enumerate(out):
            if k != best:
                row["gain_vs_best_run"] = row["held_out_accuracy"] - out[best]["held_out_accuracy"]
                row["mcnemar_p"] = mcnemar_p(right[k], right[best])
    return out


def mcnemar_p(a_right: np.ndarray, b_right: np.ndarray) -> float:
    """Exact two-sided McNemar test of two classifiers on the same images: the p-value of the
    images only one of them gets right splitting this unevenly if both were equally accurate."""
    from scipy.stats import binomtest

    only_a = int(np.sum(a_right & ~b_right))
    only_b = int(np.sum(b_right & ~a_right))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def check_pseudo_mix(runs: list[Run], allowed: bool) -> None:
    """Refuse a pseudo-labelled run next to a run whose predictions labelled its images."""
    names = {r.name for r in runs}
    clashes = []
    for r in runs:
        source = (r.meta.get("pseudo_labels") or {})
        shared = sorted(names & set(source.get("source_runs", [])))
        if shared:
            clashes.append(f"{r.name} was trained on pseudo-labels from {source.get('source')} "
                           f"made by {shared}")
    if clashes and not allowed:
        raise RunMismatchError(
            "these runs should not be stacked together:\n  " + "\n  ".join(clashes)
            + "\n  (their errors on the pseudo-labelled test images are correlated; leave one "
            "side out with --runs, or pass --allow-pseudo-mix)")
    for line in clashes:
        log.warning("stacking anyway (--allow-pseudo-mix): %s", line)


def check_teacher_mix(runs: list[Run], allowed: bool) -> None:
    """Refuse a distilled student next to its teacher or the runs its teacher stacked."""
    names = {r.name for r in runs}
    clashes = []
    for r in runs:
        shared = [n for n in teacher_runs(r.meta) if n in names]
        if shared:
            clashes.append(f"{r.name} is a distilled student of "
                           f"{(r.meta.get('teacher') or {}).get('path')} whose predictions came "
                           f"from {shared}")
    if clashes and not allowed:
        raise RunMismatchError(
            "these runs should not be stacked together:\n  " + "\n  ".join(clashes)
            + "\n  (the student's OOF is optimistic: its targets were their OOF rows, so the "
            "level-2 CV would overweight it; leave one side out with --runs, or pass "
            "--allow-teacher-mix)")
    for line in clashes:
        log.warning("stacking anyway (--allow-teacher-mix; the level-2 CV score is "
                    "optimistic): %s", line)


def stack_runs(cfg: StackConfig) -> StackResult:
    """Check, score (level-2 CV), choose, fit on all rows, write the submission and report."""
    from oof.datasets import load_dataset

    started = time.perf_counter()
    if cfg.metric not in METRICS:
        raise ConfigError(f"--metric {cfg.metric!r}: choose one of {list(METRICS)}")
    if cfg.method != "auto" and cfg.method not in METHODS:
        raise ConfigError(f"--method {cfg.method!r}: choose one of {['auto', *METHODS]}")
    dataset = load_dataset(cfg.data, cfg.layout, cfg.test)
    run_root = Path(cfg.out) / dataset.name
    runs, folds = load_checked(resolve_run_paths(run_root, list(cfg.runs)), run_root,
                               explicit=bool(cfg.runs))
    ref = runs[0]
    names = [r.name for r in runs]
    check_pseudo_mix(runs, cfg.allow_pseudo_mix)
    check_teacher_mix(runs, cfg.allow_teacher_mix)
    if ref.classes != [str(c) for c in dataset.classes]:
        raise RunMismatchError(f"{ref.name} ({ref.path}): class order {ref.classes} != the "
                               f"dataset's {dataset.classes} ({dataset.root})")
    ids, id_source = submission_ids(dataset)
    # Built before any write so a test-id mismatch refuses the whole job.
    build_submission(ids, ref.test_ids, ref.test, ref.classes, dataset.submission_columns,
                     f"{ref.name} ({ref.path}) vs {id_source}")

    all_runs, budgeted = runs, None
    if cfg.budget is not None or cfg.budget_ms is not None:
        budgeted = choose_under_budget(runs, folds, cfg)
        # each chosen run as the budget serves it (fold models or refit, some or all views)
        runs = [budgeted.cands[i].run for i in budgeted.search.chosen.members]
        ref, names = runs[0], [r.name for r in runs]
    X, X_test = level1_matrix(runs)
    y, n_classes = ref.y, len(ref.classes)
    # The inputs' fold-k test rows (fold-k models only), for this stack's own fold-k rows and its
    # pseudo-label source; a stack written by an older stack.py has none (issue 28).
    stale = stale_stacks(runs)
    X_test_folds = None if stale else fold_k_test_matrix(runs)
    methods = list(METHODS) if cfg.compare or cfg.method == "auto" else \
        list(dict.fromkeys(["mean", cfg.method]))
    results: dict[str, Level2] = {}
    for m in methods:
        log.info("level-2 CV of %s over %d stored folds (%d rows x %d runs)", m, folds.k, len(y),
                 len(runs))
        results[m] = cross_val_level2(m, make_stacker(m, **stacker_params(m, cfg)), X, y,
                                      folds.fold, n_classes, X_test, names, X_test_folds)
        log.info("  %s: %s in %.1f s", m, results[m].scores, results[m].seconds)
    chosen = choose(results, cfg.metric) if cfg.method == "auto" else cfg.method
    out_dir = run_root / (cfg.name or f"stack-{chosen}")
    if out_dir.name in names:
        raise ConfigError(f"output {out_dir} is one of the input runs; pass another --name")

    tcv = None if cfg.temperature == "off" else cross_val_temperature(
        results[chosen].oof, y, folds.fold, cfg.temperature)
    final = make_stacker(chosen, **stacker_params(chosen, cfg)).fit(X, y)
    served = TemperatureScaled(final, tcv.temperature) if tcv and tcv.applied else final
    test_proba = full_proba(served, X_test, n_classes)
    sub = build_submission(ids, ref.test_ids, test_proba, ref.classes,
                           dataset.submission_columns, id_source)

    level = 1 + max(run_level(r) for r in runs)  # a stack of stacks is level 3
    cost = total_cost(runs).row()
    left_out = [r for r in all_runs if r.name not in names]
    variants = [r for r in runs if isinstance(r, VariantRun)]  # served not as trained
    rows = [{"model": marked(r.name, r.meta), "level": run_level(r), **r.scores(),
             **calibration(r.y, r.oof), **run_cost(r).row(), "seconds": None, "chosen": "",
             "note": _backbone(r) + (" (left out by the budget)" if r in left_out else "")
             + "".join(f" (served as {v.variant.label})" for v in variants if v.name == r.name)}
            for r in all_runs]
    rows += [{"model": variant_name(r), "level": run_level(r), **r.scores(),
              **calibration(r.y, r.oof), **run_cost(r).row(), "seconds": None,
              "chosen": "", "note": variant_note(r)} for r in variants]
    rows += [{"model": f"stack-{m}", "level": level, **res.scores, **calibration(y, res.oof),
              **cost, "seconds": round(res.seconds, 2),
              "chosen": "*" if m == chosen and not (tcv and tcv.applied) else "",
              "note": _note(m, res)}
             for m, res in results.items()]
    if tcv is not None:
        rows.append(_temperature_row(chosen, level, tcv, y, cost))
    if budgeted is not None:
        rows.append(budgeted.row(level))

    # All checks passed and everything is computed: write. meta.json (status complete) is the
    # completion marker and goes last; the old one goes first, so a kill at any moment leaves a
    # folder that does not look complete, and a rerun redoes it.
    level2 = results[chosen]
    inputs = [{"run": r.name, "path": str(r.path), "fingerprint": r.fingerprint,
               "oof_metrics": r.scores(), **run_cost(r).row(),
               **({"student": True} if is_student(r.meta) else {}),
               "variant": getattr(r, "variant", Variant()).to_dict()} for r in runs]
    begin_output(out_dir)
    sub_path = out_dir / "submission.csv"
    sub.write(sub_path, out_dir / "submission_proba.csv")
    test_acc = _held_out_accuracy(sub_path, dataset.root)
    held_out, n_truth = _held_out_table(dataset.root, ref, [
        *((marked(r.name, r.meta), run_level(r), r.scores(), r.test, run_cost(r).row())
          for r in all_runs),
        *((variant_name(r), run_level(r), r.scores(), r.test, run_cost(r).row())
          for r in variants),
        *((f"stack-{m}", level, res.scores, res.test_per_fold.mean(axis=0), cost)
          for m, res in results.items()),
        *([] if tcv is None else [(
            f"stack-{chosen}+T", level, tcv.scores, np.mean(
                [apply_temperature(results[chosen].test_per_fold[k], t)
                 for k, t in tcv.per_fold.items()], axis=0), cost)]),
        (f"submission (stack-{chosen}{'+T' if served is not final else ''})", level,
         tcv.scores if served is not final else results[chosen].scores, test_proba, cost)])
    front = [] if budgeted is None else budgeted.front_rows(dataset.root, ref, level, y)
    report = {
        "dataset": dataset.name, "run_root": str(run_root), "level": level, "runs": inputs,
        "students": [r.name for r in all_runs if is_student(r.meta)],
        "folds": {"k": folds.k, "seed": folds.seed, "fingerprint": folds.fingerprint},
        "methods": {m: {"scores": r.scores, "seconds": round(r.seconds, 3), "folds": r.folds}
                    for m, r in results.items()},
        "chosen": chosen,
        "choice": (f"best level-2 {cfg.metric} of {methods}" if cfg.method == "auto"
                   else "--method"),
        "final": {"method": chosen, "params": final.get_params(), **describe(final, names),
                  **({"temperature": served.temperature} if served is not final else {})},
        "temperature": None if tcv is None else tcv.to_dict(),
        "cost": cost, "budget": None if budgeted is None else budgeted.to_dict(),
        "front": front,
        "level2_run": str(out_dir), "submission": str(sub_path), "submission_ids": id_source,
        "test_accuracy": test_acc, "held_out": held_out,
        "held_out_rows": n_truth,
        "seconds": round(time.perf_counter() - started, 2),
        "config": config_dict(cfg), "table": rows,
    }
    # fold k's test predictions from fold-k models and a stacker fitted without fold k: the
    # leak-free source of run_folds.py --pseudo-labels, never made from leaky fold-k rows
    if level2.fold_k_test is not None:
        write_stack_pseudo_source(out_dir, runs, chosen, level2.fold_k_test, level)
    else:
        (out_dir / PSEUDO_FILE).unlink(missing_ok=True)  # a rerun's old source must not stay
        log.warning("no pseudo-label source (%s) in %s, and its test_folds.parquet is not "
                    "fold-k only:\n  %s", PSEUDO_FILE, out_dir, stale)
    if budgeted is not None:
        from oof.report import cost_front_figure

        write_atomic(out_dir / FRONT_PNG, lambda p: Path(p).write_bytes(cost_front_figure(
            front, budgeted.search_points(), cfg.metric, budgeted.describe())))
    else:
        (out_dir / FRONT_PNG).unlink(missing_ok=True)
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", _markdown(report, rows))
    save_config(cfg, out_dir / "config.yaml")
    # the fitted final stacker (temperature-scaled when applied), for serving (ensemble.saved;
    # loaded by serve.bundle)
    save_stacker(out_dir, served, chosen, runs, ref.classes, folds.fingerprint,
                 tcv.scores if served is not final else level2.scores)
    run = _write_level2(out_dir, chosen, ref, folds, level2, inputs, cfg, level,
                        source_runs(runs), {**cost, "temperature": report["temperature"]})
    return StackResult(rows, TABLE_COLUMNS, chosen, out_dir, sub_path, run.path, test_acc, report,
                       held_out)


def _temperature_row(method: str, level: int, tcv: TemperatureCV, y: np.ndarray,
                     cost: dict[str, Any]) -> dict[str, Any]:
    """The chosen method temperature-scaled: CV scores (T of fold k fitted without fold k)."""
    per_fold = ",".join(f"{t:.3f}" for t in tcv.per_fold.values())
    return {"model": f"stack-{method}+T", "level": level, **tcv.scores,
            **calibration(y, tcv.oof),
            **cost, "seconds": None, "chosen": "*" if tcv.applied else "",
            "note": f"temperature {tcv.temperature:.3f} (per fold {per_fold}): "
                    f"{'applied' if tcv.applied else 'not applied'}, {tcv.rule}"}


@dataclass
class BudgetChoice:
    """The runs chosen under ``--budget``/``--budget-ms``, every subset scored, and the rule's
    nested-CV score."""

    budget: Budget
    method: str
    params: dict[str, Any]
    metric: str
    cands: list[Any]
    search: Search
    nested: Any  # ensemble.budget.Nested, or None with fewer than 3 folds
    y: np.ndarray
    folds: np.ndarray  # each OOF row's stored fold

    def names(self, members: tuple[int, ...]) -> list[str]:
        return [self.cands[i].name for i in members]

    def describe(self) -> str:
        return f"budget {self.budget.describe()}"

    def row(self, level: int) -> dict[str, Any]:
        """The table's row for the budget rule: nested CV where possible, else marked."""
        chosen = self.search.chosen
        base = {"model": f"budget ({self.method}, nested CV)", "level": level,
                **chosen.cost.row(), "seconds": None, "chosen": ""}
        if self.nested is None:
            return {**base, "model": f"budget ({self.method}, optimistic)", **chosen.scores,
                    "note": f"{self.describe()}: {self.names(chosen.members)}; its CV chose it "
                            "(optimistic: fewer than 3 folds leave no inner CV)"}
        per = "; ".join(f"fold {f['fold']}: {'+'.join(f['chosen'])}"
                        for f in self.nested.per_fold)
        return {**base, **self.nested.scores,
                **calibration(self.y, self.nested.oof),
                "note": f"{self.describe()}: subset chosen on K-1 folds, scored on the K-th "
                        f"({per})"}

    def search_points(self) -> list[dict[str, Any]]:
        return [{**p.cost.row(), **p.scores} for p in self.search.points]

    def front_rows(self, data_root: Path, ref: Run, level: int,
                   y: np.ndarray) -> list[dict[str, Any]]:
        """The front as table rows, each with its held-out scores where there are labels."""
        chosen = self.search.chosen
        points = self.search.front(self.metric)
        if chosen not in points:  # a --budget-ms choice need not be on the passes front
            points = sorted([*points, chosen], key=lambda p: p.cost.passes or 0)
        held, _ = _held_out_table(data_root, ref, [
            (str(n), level, p.scores, fit_predict(self.cands, p.members, y, self.method,
                                                  self.params))
            for n, p in enumerate(points)])
        out = []
        for n, p in enumerate(points):
            out.append({**p.cost.row(), "runs": "+".join(self.names(p.members)),
                        "log_loss": p.scores["log_loss"], "accuracy": p.scores["accuracy"],
                        **calibration(y, level2_oof(self.cands, p.members, y, self.folds,
                                                    self.method, self.params)),
                        "held_out_log_loss": held[n]["held_out_log_loss"] if held else None,
                        "held_out_accuracy": held[n]["held_out_accuracy"] if held else None,
                        "chosen": "* (optimistic)" if p is chosen else ""})
        return out

    def to_dict(self) -> dict[str, Any]:
        chosen = self.search.chosen
        return {"passes": self.budget.passes, "ms": self.budget.ms, "method": self.method,
                "metric": self.metric, "exact_search": self.search.exact,
                "subsets_scored": len(self.search.points),
                "chosen": self.names(chosen.members),
                "passes_chosen": chosen.cost.passes, "ms_chosen": chosen.cost.ms_per_image,
                "chosen_cv_scores": chosen.scores,
                "nested_cv_scores": None if self.nested is None else self.nested.scores,
                "nested_per_fold": None if self.nested is None else self.nested.per_fold}


def choose_under_budget(runs: list[Run], folds: Folds, cfg: StackConfig) -> BudgetChoice:
    """Search the subsets of ``runs`` by level-2 CV within the budget (``--method``, or the mean
    under auto: nothing learned, and cheap enough to score every subset), and score the rule by
    nested CV."""
    budget = Budget(cfg.budget, cfg.budget_ms)
    cands = [c for c in candidates(runs)
             if (cfg.budget_refit or c.variant.models == "folds")
             and (cfg.budget_views or c.variant.views is None)]
    no_ms = [c.name for c in cands if c.cost.ms_per_image is None]
    if cfg.budget_ms is not None and no_ms:
        raise ConfigError(f"--budget-ms {cfg.budget_ms:g}: no measured ms_per_image in the "
                          f"meta.json of {no_ms}; use --budget PASSES, or leave them out with "
                          "--runs")
    no_passes = [c.name for c in cands if c.cost.passes is None]
    if cfg.budget is not None and no_passes:
        raise ConfigError(f"--budget {cfg.budget}: the passes per image of {no_passes} are "
                          "unknown (no passes_per_image or folds in their meta.json, or a "
                          "stack whose inputs are gone)")
    method = "mean" if cfg.method == "auto" else cfg.method
    params = stacker_params(method, cfg)
    y = runs[0].y
    log.info("budget %s: scoring subsets of %d candidates (%d runs, each served one way at "
             "most) by level-2 CV of %s", budget.describe(), len(cands), len(runs), method)
    limit = exact_limit(method)
    found = search(cands, cv_scorer(cands, y, folds.fold, method, params), cfg.metric, budget,
                   limit)
    nested = nested_cv(cands, y, folds.fold, method, params, cfg.metric, budget, limit)
    choice = BudgetChoice(budget, method, params, cfg.metric, cands, found, nested, y,
                          folds.fold)
    log.info("budget: %s chosen (%s), %d subsets scored", choice.names(found.chosen.members),
             found.chosen.cost.row(), len(found.points))
    return choice


def begin_output(out_dir: Path) -> None:
    """Unmark a folder about to be (re)written and drop temporaries a killed writer left."""
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / META_FILE
    if marker.exists():
        marker.unlink()
    for tmp in out_dir.glob(".*.tmp"):  # oof.atomic's temporaries: ".<name>.<random>.tmp"
        tmp.unlink(missing_ok=True)


def _write_level2(out_dir: Path, method: str, ref: Run, folds: Folds, level2: Level2,
                  inputs: list[dict[str, Any]], cfg: StackConfig, level: int,
                  stacked: list[str], extra: dict[str, Any]) -> Run:
    """The stack's CV OOF saved like any run (meta level = 1 + its inputs' highest level), so it
    can be analysed and stacked again.

    Its test prediction is the fold stackers' mean on the inputs' fold-mean test; its per-fold
    test rows are the fold-k-only ones (``Level2.fold_k_test``, marked FOLD_K_ONLY) so that a
    stack over it can make leak-free pseudo-labels, or, over an older stack, the fold stackers'
    rows on the fold-mean test, unmarked.
    """
    from oof.rundir import write_run

    meta = {"level": level, "method": method, "inputs": inputs, "config": config_dict(cfg),
            "backbone": {"name": f"stack/{method}"}, "fold_info": level2.folds,
            "level2_seconds": round(level2.seconds, 3), "stacked_runs": stacked,
            # its cost (passes_per_image, ms_per_image: what a stack over it pays for it) and
            # the temperature of the served stacker; this OOF is the method's, before it
            "passes_per_image": extra["passes"], "ms_per_image": extra["ms_per_image"],
            "temperature": extra["temperature"]}
    per_fold = level2.test_per_fold
    if level2.fold_k_test is not None:
        per_fold, meta["test_folds"] = level2.fold_k_test, FOLD_K_ONLY
    return write_run(out_dir, out_dir.name, ref.classes, folds, level2.oof, ref.test_ids,
                     per_fold, meta, test=level2.test_per_fold.mean(axis=0))


def _held_out_table(data_root: Path, ref: Run, models: list[tuple[Any, ...]],
                    ) -> tuple[list[dict[str, Any]], int | None]:
    """``held_out_rows`` where the dataset ships held-out labels (the demos), else nothing."""
    from oof.demo import TEST_LABELS, held_out_labels

    try:
        truth = held_out_labels(data_root)
        if truth is None:
            return [], None
        return held_out_rows(truth, ref.test_ids, ref.classes, models,
                             str(data_root / TEST_LABELS)), len(truth)
    except (FoldstackError, KeyError, ValueError) as exc:
        log.warning("could not score the runs against %s's held-out labels: %s", data_root, exc)
        return [], None


def _held_out_accuracy(submission: Path, data_root: Path) -> float | None:
    """Accuracy on held-out labels where the dataset ships them (the demo's test_labels.csv)."""
    if not (data_root / "test_labels.csv").exists():
        return None
    from oof.demo import score_submission

    try:
        return score_submission(submission, data_root)
    except (FoldstackError, KeyError, ValueError) as exc:
        log.warning("could not score %s against %s: %s", submission, data_root, exc)
        return None
