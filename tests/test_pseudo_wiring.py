"""Pseudo-labels end to end (issue 13): stack.py writes the leak-free per-fold source,
run_folds.py --pseudo-labels adds fold k's confident test images to fold k's training side only
and records where they came from, and stack.py refuses to stack the student with its teachers
unless told to."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ensemble.stack import StackConfig, StackResult, stack_runs, stacker_params
from ensemble.stackers import make_stacker
from oof.errors import ConfigError, RunMismatchError
from oof.folds import load_folds
from oof.pseudo import PSEUDO_FILE, check_source, load_pseudo_source
from oof.rundir import load_run, write_run
from tests.synthetic import synthetic_run
from tests.test_run_folds import FAST, RUN_NAME, assert_user_error, run_script
from tests.test_stack import N_TEST, Project

ROOT = Path(__file__).resolve().parents[1]


def test_stack_writes_a_per_fold_source_that_is_not_the_submission(tmp_path: Path) -> None:
    p = Project(tmp_path)
    result = stack_runs(p.cfg(method="logreg", compare=False, runs=["good", "weak"]))
    source = load_pseudo_source(result.out_dir)
    assert (result.out_dir / PSEUDO_FILE).is_file()
    assert source.proba.shape == (3, N_TEST, 4) and source.runs == ["good", "weak"]
    assert source.method == "logreg" and source.fingerprint == p.folds.fingerprint
    np.testing.assert_allclose(source.proba.sum(axis=2), 1.0, atol=1e-9)
    submission = np.loadtxt(result.out_dir / "submission_proba.csv", delimiter=",",
                            skiprows=1, usecols=range(1, 5))
    assert not np.allclose(source.proba[0], submission[np.argsort(p.sample_ids)])
    rows = check_source(source, source.classes, p.folds.fingerprint,
                        np.asarray(sorted(p.test_ids)))
    assert sorted(rows.tolist()) == list(range(N_TEST))


def test_student_is_not_stacked_with_its_teachers_unless_allowed(tmp_path: Path) -> None:
    p = Project(tmp_path)
    synthetic_run(p.root, "student", p.folds, 0.6, 7, N_TEST, meta_extra={
        "pseudo_labels": {"source": "runs/synth/stack-logreg", "source_runs": ["good", "weak"],
                          "threshold": 0.9}})
    with pytest.raises(RunMismatchError) as err:
        stack_runs(p.cfg(runs=["good", "student"], method="mean", compare=False))
    message = str(err.value)
    assert "student was trained on pseudo-labels from runs/synth/stack-logreg made by ['good']" \
        in message and "--allow-pseudo-mix" in message
    assert not (p.root / "stack-mean").exists()
    allowed = stack_runs(p.cfg(runs=["good", "student"], method="mean", compare=False,
                               allow_pseudo_mix=True))
    assert allowed.submission.is_file()
    stack_runs(p.cfg(runs=["noise", "student"], method="mean", compare=False, name="other"))


@pytest.fixture(scope="module")
def taught(demo_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained run root: a tiny timm run, its level-2 mean stack (the pseudo-label source) and a
    student trained on that source's confident test images (two trainings, ~1 minute)."""
    tmp = tmp_path_factory.mktemp("pseudo_wiring")
    out = tmp / "runs"
    base = ["--data", str(demo_subset), "--out", str(out), *FAST]
    assert run_script(base, tmp, timeout=600).returncode == 0
    stack = subprocess.run([sys.executable, str(ROOT / "stack.py"), "--data", str(demo_subset),
                            "--out", str(out), "--method", "mean", "--compare", "false"],
                           cwd=tmp, capture_output=True, text=True, timeout=300)
    assert stack.returncode == 0, stack.stderr[-2000:]
    proc = run_script([*base, "--run-name", "student", "--pseudo-labels",
                       str(out / demo_subset.name / "stack-mean"), "--pseudo-threshold", "0.15"],
                      tmp, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / demo_subset.name


@pytest.mark.slow
def test_run_folds_trains_on_its_folds_pseudo_labels(taught: Path, demo_subset: Path,
                                                     tmp_path: Path) -> None:
    out, source_dir = taught.parent, taught / "stack-mean"
    base = ["--data", str(demo_subset), "--out", str(out), *FAST]
    bad = run_script([*base, "--run-name", "student2", "--pseudo-labels", str(tmp_path)],
                     tmp_path)
    assert_user_error(bad, f"--pseudo-labels {tmp_path}: no {PSEUDO_FILE} there")
    assert not (taught / "student2").exists()

    meta = json.loads((taught / "student" / "meta.json").read_text())
    pseudo = meta["pseudo_labels"]
    source = load_pseudo_source(source_dir)
    want = [int((source.proba[k].max(axis=1) >= 0.15).sum()) for k in range(3)]
    assert pseudo["per_fold"] == want and sum(want) > 0
    assert pseudo["source_runs"] == [RUN_NAME] and pseudo["threshold"] == 0.15
    for k in range(3):
        info = meta["fold_info"][str(k)]
        assert info["n_pseudo"] == want[k] and info["n_train"] == 200 + want[k]
        assert info["n_val"] == 100  # the held-out side never gets pseudo-labels

    mixed = subprocess.run([sys.executable, str(ROOT / "stack.py"), "--data", str(demo_subset),
                            "--out", str(out), "--name", "both"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert mixed.returncode == 2 and "--allow-pseudo-mix" in mixed.stderr, mixed.stderr[-2000:]


# ------------------------------------------------------------------ stacks of stacks (issue 28)
# Two trained level-1 runs (the timm run and its student), a level-2 logreg stack of both and a
# level-3 logreg stack of that stack and the timm run. Fold k's pseudo row must come from the
# level-1 fold-k models and stackers fitted without fold k only, at level 2 and at level 3.


def _copy_root(root: Path, dest: Path) -> Path:
    """The run root's files that stacking reads (no checkpoints, image cache or parts)."""
    shutil.copytree(root, dest / "runs" / root.name,
                    ignore=shutil.ignore_patterns("checkpoints", "cache", "parts", "work"))
    return dest / "runs" / root.name


def _stack_levels(root: Path, data: Path) -> tuple[StackResult, StackResult, StackConfig]:
    cfg = StackConfig(data=str(data), out=str(root.parent), method="logreg", compare=False)
    level2 = stack_runs(replace(cfg, runs=[RUN_NAME, "student"], allow_pseudo_mix=True))
    level3 = stack_runs(replace(cfg, runs=[level2.out_dir.name, RUN_NAME], name="level3"))
    return level2, level3, cfg


@pytest.mark.slow
def test_level3_pseudo_rows_come_from_fold_k_models_only(taught: Path, demo_subset: Path,
                                                         tmp_path: Path) -> None:
    root = _copy_root(taught, tmp_path)
    level2, level3, cfg = _stack_levels(root, demo_subset)
    timm, student = (load_run(root / n) for n in (RUN_NAME, "student"))
    y, folds, k_count = timm.y, timm.folds, 3

    def fold_stacker(X: np.ndarray, k: int):
        return make_stacker("logreg", **stacker_params("logreg", cfg)).fit(X[folds != k],
                                                                          y[folds != k])

    # Recomputed here from the level-1 files alone: fold-k model rows, stackers without fold k.
    X1 = np.hstack([timm.oof, student.oof])
    T1 = [np.hstack([r.test_per_fold()[k] for r in (timm, student)]) for k in range(k_count)]
    s2 = [fold_stacker(X1, k) for k in range(k_count)]
    oof2 = np.empty_like(timm.oof)
    for k in range(k_count):
        oof2[folds == k] = s2[k].predict_proba(X1[folds == k])
    T2 = [s2[k].predict_proba(T1[k]) for k in range(k_count)]
    X3 = np.hstack([oof2, timm.oof])
    s3 = [fold_stacker(X3, k) for k in range(k_count)]
    T3 = [s3[k].predict_proba(np.hstack([T2[k], timm.test_per_fold()[k]]))
          for k in range(k_count)]
    # The old level-3 rows: fold stacker k on the level-2 run's fold stacker k applied to the
    # fold-mean test, made with the fold models that trained on fold k.
    mean_test1 = np.hstack([timm.test, student.test])
    leaky2 = [s2[k].predict_proba(mean_test1) for k in range(k_count)]
    leaky3 = [s3[k].predict_proba(np.hstack([leaky2[k], timm.test])) for k in range(k_count)]

    src2, src3 = load_pseudo_source(level2.out_dir), load_pseudo_source(level3.out_dir)
    assert (src3.test_ids == timm.test_ids).all() and src3.proba.shape == (k_count, 40, 10)
    np.testing.assert_allclose(load_run(level2.out_dir).oof, oof2, rtol=0, atol=1e-9)
    for k in range(k_count):
        np.testing.assert_allclose(src2.proba[k], T2[k], rtol=0, atol=1e-9)
        np.testing.assert_allclose(src3.proba[k], T3[k], rtol=0, atol=1e-9)
        assert np.abs(src3.proba[k] - leaky3[k]).max() > 1e-3, k
    assert src3.runs == [level2.out_dir.name, RUN_NAME, "student"]  # every teacher beneath
    # The submission and the stacks' test predictions are the fold-mean ones, as before.
    assert np.abs(load_run(level2.out_dir).test - np.mean(leaky2, axis=0)).max() < 1e-9
    final = make_stacker("logreg", **stacker_params("logreg", cfg)).fit(X3, y)
    want = final.predict_proba(np.hstack([np.mean(leaky2, axis=0), timm.test]))
    sub = pd.read_csv(level3.out_dir / "submission_proba.csv", dtype={"Id": str})
    got = sub.set_index("Id").loc[timm.test_ids, timm.classes].to_numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_other_folds_test_predictions_do_not_reach_fold_k_pseudo_rows(
        taught: Path, demo_subset: Path, tmp_path: Path) -> None:
    """Replacing the fold-j (j != k) models' test predictions of every level-1 run leaves fold
    k's pseudo row unchanged at level 2 and at level 3 (and changes the other rows)."""
    k = 1
    a = _copy_root(taught, tmp_path / "a")
    b = _copy_root(taught, tmp_path / "b")
    rng = np.random.default_rng(0)
    for name in (RUN_NAME, "student"):
        run = load_run(b / name)
        per_fold = run.test_per_fold()
        for j in range(len(per_fold)):
            if j != k:
                per_fold[j] = rng.dirichlet(np.ones(len(run.classes)), len(run.test_ids))
        write_run(run.path, run.name, run.classes, load_folds(b), run.oof, run.test_ids,
                  per_fold, run.meta)
    stacked_a, stacked_b = _stack_levels(a, demo_subset), _stack_levels(b, demo_subset)
    for level in (0, 1):  # the level-2 stack, then the level-3 stack over it
        pa_, pb_ = (load_pseudo_source(s[level].out_dir).proba for s in (stacked_a, stacked_b))
        np.testing.assert_allclose(pb_[k], pa_[k], rtol=0, atol=1e-12,
                                   err_msg=f"level {level + 2}: fold {k}'s pseudo row moved")
        others = [j for j in range(len(pa_)) if j != k]
        assert np.abs(pb_[others] - pa_[others]).max() > 0.05, level
def test_bad_threshold_is_a_config_error() -> None:
    from oof.config import RunConfig, parse_config

    with pytest.raises(ConfigError, match="--pseudo-threshold 1.5"):
        parse_config(RunConfig, ["--pseudo-threshold", "1.5"], "run_folds.py", "")


def _unmark_stack(run_dir: Path) -> None:
    """Make a stack folder what an older stack.py wrote: no fold-k-only mark in its meta."""
    meta_path = run_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("test_folds", None)
    meta_path.write_text(json.dumps(meta))


def _unmark_source(source_dir: Path) -> None:
    """Make a pseudo-label source what an older stack.py wrote: method, runs, classes, folds."""
    import pyarrow.parquet as pq

    path = source_dir / PSEUDO_FILE
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    info = json.loads(meta[b"foldstack_pseudo"])
    meta[b"foldstack_pseudo"] = json.dumps({k: info[k] for k in (
        "method", "runs", "classes", "fingerprint", "folds")}).encode()
    pq.write_table(table.replace_schema_metadata(meta), path)


def test_an_older_level2_stack_makes_no_pseudo_labels_above_it(tmp_path: Path, caplog) -> None:
    """A level-2 stack from before fold-k-only rows (issue 28) is stacked as before, but no
    pseudo-label source is made over it (an old one in the folder goes), and old level-3 sources
    are refused by the runner's loader, naming the folder; old level-2 sources still load."""
    from ensemble.pseudo import fold_test_proba
    from ensemble.stackers import MeanBlend

    p = Project(tmp_path)
    level2 = stack_runs(p.cfg(method="logreg", compare=False, runs=["good", "weak"]))
    cfg3 = p.cfg(method="mean", compare=False, runs=["stack-logreg", "good"], name="level3")
    level3 = stack_runs(cfg3)
    made = (level3.out_dir / PSEUDO_FILE).read_bytes()  # over a current level-2 stack: made
    _unmark_stack(level2.out_dir)
    with caplog.at_level("WARNING", logger="ensemble.stack"):
        again = stack_runs(cfg3)
    assert again.submission.is_file() and not (again.out_dir / PSEUDO_FILE).exists()
    assert f"stack-logreg ({level2.out_dir}): a level-2 stack written by an older stack.py" \
        in caplog.text and "rerun the stack.py command that wrote it" in caplog.text
    with pytest.raises(RunMismatchError, match=r"stack-logreg \(.*\): a level-2 stack written "
                                               r"by an older stack\.py"):
        fold_test_proba([load_run(level2.out_dir), load_run(p.root / "good")], MeanBlend())
    # Its own rows are not fold-k only either: nothing above it makes a source.
    level4 = stack_runs(p.cfg(method="mean", compare=False, runs=["level3", "weak"],
                              name="level4"))
    assert not (level4.out_dir / PSEUDO_FILE).exists()

    # The runner's loader: an unmarked source of a level-3 stack is refused, of level 2 kept.
    (level3.out_dir / PSEUDO_FILE).write_bytes(made)
    _unmark_source(level3.out_dir)
    with pytest.raises(ConfigError, match=rf"--pseudo-labels {level3.out_dir}: {PSEUDO_FILE} "
                                          r"was written by an older stack\.py of a level-3 stack"):
        load_pseudo_source(level3.out_dir)
    _unmark_source(level2.out_dir)
    assert load_pseudo_source(level2.out_dir).proba.shape == (3, N_TEST, 4)
