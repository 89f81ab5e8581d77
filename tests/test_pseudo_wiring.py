"""Pseudo-labels end to end (issue 13): stack.py writes the leak-free per-fold source,
run_folds.py --pseudo-labels adds fold k's confident test images to fold k's training side only
and records where they came from, and stack.py refuses to stack the student with its teachers
unless told to."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ensemble.stack import stack_runs
from oof.errors import ConfigError, RunMismatchError
from oof.pseudo import PSEUDO_FILE, check_source, load_pseudo_source
from tests.synthetic import synthetic_run
from tests.test_run_folds import FAST, assert_user_error, run_script
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


@pytest.mark.slow
def test_run_folds_trains_on_its_folds_pseudo_labels(demo_subset: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    base = ["--data", str(demo_subset), "--out", str(out), *FAST]
    assert run_script(base, tmp_path, timeout=600).returncode == 0
    stack = subprocess.run([sys.executable, str(ROOT / "stack.py"), "--data", str(demo_subset),
                            "--out", str(out), "--method", "mean", "--compare", "false"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert stack.returncode == 0, stack.stderr[-2000:]
    source_dir = out / demo_subset.name / "stack-mean"
    bad = run_script([*base, "--run-name", "student", "--pseudo-labels", str(tmp_path)],
                     tmp_path)
    assert_user_error(bad, f"--pseudo-labels {tmp_path}: no {PSEUDO_FILE} there")
    assert not (out / demo_subset.name / "student").exists()

    proc = run_script([*base, "--run-name", "student", "--pseudo-labels", str(source_dir),
                       "--pseudo-threshold", "0.15"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / demo_subset.name / "student" / "meta.json").read_text())
    pseudo = meta["pseudo_labels"]
    source = load_pseudo_source(source_dir)
    want = [int((source.proba[k].max(axis=1) >= 0.15).sum()) for k in range(3)]
    assert pseudo["per_fold"] == want and sum(want) > 0
    assert pseudo["source_runs"] == ["timm-resnet10t_16px"] and pseudo["threshold"] == 0.15
    for k in range(3):
        info = meta["fold_info"][str(k)]
        assert info["n_pseudo"] == want[k] and info["n_train"] == 200 + want[k]
        assert info["n_val"] == 100  # the held-out side never gets pseudo-labels

    mixed = subprocess.run([sys.executable, str(ROOT / "stack.py"), "--data", str(demo_subset),
                            "--out", str(out), "--name", "both"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert mixed.returncode == 2 and "--allow-pseudo-mix" in mixed.stderr, mixed.stderr[-2000:]


def test_bad_threshold_is_a_config_error() -> None:
    from oof.config import RunConfig, parse_config

    with pytest.raises(ConfigError, match="--pseudo-threshold 1.5"):
        parse_config(RunConfig, ["--pseudo-threshold", "1.5"], "run_folds.py", "")
