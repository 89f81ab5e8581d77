"""stack.py end to end on synthetic runs written through the real contract (and one real e2e)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ensemble.evaluate import cross_val_level2, level1_matrix
from ensemble.stack import StackConfig, stack_runs
from ensemble.stackers import make_stacker
from oof.errors import ConfigError, RunMismatchError
from oof.folds import Folds, fold_fingerprint, make_folds
from oof.rundir import load_run, write_run
from tests.synthetic import synthetic_folds, synthetic_proba, synthetic_run

REPO = Path(__file__).resolve().parents[1]
N_TEST = 30


class Project:
    """A competition-layout dataset (empty image files) and its run root with 3 level-1 runs."""

    def __init__(self, tmp: Path, sample: bool = True) -> None:
        self.data = tmp / "synth"
        self.out = tmp / "runs"
        self.root = self.out / "synth"
        self.root.mkdir(parents=True)
        self.folds = synthetic_folds(self.root, n=300, k=3, n_classes=4)
        for i, lab in zip(self.folds.ids, self.folds.labels):
            (self.data / "train" / lab).mkdir(parents=True, exist_ok=True)
            (self.data / "train" / lab / i).write_bytes(b"")
        pd.DataFrame({"Id": self.folds.ids, "Category": self.folds.labels}).to_csv(
            self.data / "train.csv", index=False)
        (self.data / "test_upload").mkdir()
        self.test_ids = [f"test_{i:04d}.png" for i in range(N_TEST)]
        for t in self.test_ids:
            (self.data / "test_upload" / t).write_bytes(b"")
        # The sample lists the ids in another order than the runs (which sort them).
        self.sample_ids = list(np.random.default_rng(1).permutation(self.test_ids))
        if sample:
            pd.DataFrame({"Id": self.sample_ids, "Category": 0}).to_csv(
                self.data / "sample-submission.csv", index=False)
        self.runs = [synthetic_run(self.root, "good", self.folds, 0.7, 1, N_TEST),
                     synthetic_run(self.root, "weak", self.folds, 0.3, 2, N_TEST, 2.0),
                     synthetic_run(self.root, "noise", self.folds, 0.0, 3, N_TEST)]

    def cfg(self, **kw) -> StackConfig:
        return StackConfig(data=str(self.data), out=str(self.out), **kw)

    def files(self) -> dict[str, float]:
        return {str(p.relative_to(self.out)): p.stat().st_mtime_ns
                for p in self.out.rglob("*") if p.is_file()}


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


def test_stack_writes_table_submission_report_and_level2_run(project: Project) -> None:
    res = stack_runs(project.cfg())
    models = [r["model"] for r in res.rows]
    assert models == ["good", "noise", "weak", "stack-mean", "stack-geo", "stack-rank",
                      "stack-blend", "stack-greedy", "stack-logreg", "stack-lightgbm"]
    chosen = [r for r in res.rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["model"] == f"stack-{res.chosen}"
    level2 = [r for r in res.rows if r["level"] == 2]
    assert chosen[0]["log_loss"] == min(r["log_loss"] for r in level2)  # auto, metric log_loss
    assert res.out_dir == project.root / f"stack-{res.chosen}"
    for name in ("submission.csv", "submission_proba.csv", "report.json", "report.md",
                 "config.yaml"):
        assert (res.out_dir / name).is_file(), name
    assert res.test_accuracy is None  # no held-out labels in this dataset
    assert "submission" in res.summary()


def test_stacker_tests_cover_every_stacker_stack_py_builds(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/test_stackers.py runs its checks over ``stack_configurations()``: every stacker
    stack_runs builds (recorded where it calls make_stacker), with the default options and with
    each option that changes a stacker's parameters, is one of them and each of them is built;
    every method of STACKERS is among them."""
    import ensemble.stack as stack_module
    from ensemble.stackers import STACKERS
    from tests.stacker_configs import stack_configurations

    built: list[tuple[str, dict]] = []

    def recording(name: str, **params) -> object:
        built.append((name, params))
        return make_stacker(name, **params)

    monkeypatch.setattr(stack_module, "make_stacker", recording)
    stack_runs(project.cfg())  # every method, default options
    stack_runs(project.cfg(method="greedy", compare=False, metric="accuracy", name="g"))
    stack_runs(project.cfg(method="logreg", compare=False, inputs="proba", name="l"))
    covered = stack_configurations()
    assert [b for b in built if b not in covered] == []
    assert [c for c in covered if c not in built] == []
    assert sorted({m for m, _ in covered}) == sorted(STACKERS)


def test_level2_scores_are_the_honest_cv_over_stored_folds(project: Project) -> None:
    res = stack_runs(project.cfg(method="logreg", compare=False))
    X, _ = level1_matrix(project.runs)
    ref = project.runs[0]
    expect = cross_val_level2("logreg", make_stacker("logreg"), X, ref.y, ref.folds, 4)
    row = next(r for r in res.rows if r["model"] == "stack-logreg")
    assert row["log_loss"] == pytest.approx(expect.scores["log_loss"])
    assert [r["model"] for r in res.rows][-2:] == ["stack-mean", "stack-logreg"]
    best_single = min(r.scores()["log_loss"] for r in project.runs)
    assert row["log_loss"] < best_single


def test_level2_oof_is_saved_as_a_loadable_run(project: Project) -> None:
    res = stack_runs(project.cfg(method="greedy"))
    run = load_run(res.level2_run)
    assert run.meta["level"] == 2 and run.meta["method"] == "greedy"
    assert [i["run"] for i in run.meta["inputs"]] == ["good", "noise", "weak"]
    ref = project.runs[0]
    assert (run.ids == ref.ids).all() and (run.folds == ref.folds).all()
    assert run.fingerprint == ref.fingerprint and run.classes == ref.classes
    assert not np.isnan(run.oof).any() and not np.isnan(run.test).any()
    row = next(r for r in res.rows if r["model"] == "stack-greedy")
    assert run.scores()["log_loss"] == pytest.approx(row["log_loss"])
    assert run.test_per_fold().shape == (3, N_TEST, 4)
    # Default discovery leaves level-2 runs out; naming one stacks it like any run.
    again = stack_runs(project.cfg(method="mean", compare=False))
    assert "stack-greedy" not in [r["model"] for r in again.rows]
    named = stack_runs(project.cfg(method="mean", compare=False, name="level3",
                                   runs=["stack-greedy", "goo*"]))
    assert [(r["model"], r["level"]) for r in named.rows[:2]] == [("stack-greedy", 2),
                                                                   ("good", 1)]
    # A stack of stacks is level 3: in its table, its meta and its report.
    assert {r["level"] for r in named.rows[2:]} == {3}
    assert load_run(named.level2_run).meta["level"] == 3
    assert (named.out_dir / "report.md").read_text().startswith("# Level-3 stack")


def test_submission_follows_the_sample_ids_order_and_labels(project: Project) -> None:
    res = stack_runs(project.cfg(method="logreg", compare=False))
    sub = pd.read_csv(res.submission, dtype=str)
    assert list(sub.columns) == ["Id", "Category"]
    assert list(sub["Id"]) == project.sample_ids
    assert set(sub["Category"]) <= set(project.runs[0].classes)
    proba = pd.read_csv(res.out_dir / "submission_proba.csv", dtype={"Id": str})
    assert list(proba["Id"]) == project.sample_ids
    p = proba[project.runs[0].classes].to_numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    assert list(np.asarray(project.runs[0].classes)[p.argmax(axis=1)]) == list(sub["Category"])


def test_submission_without_sample_uses_sorted_test_ids(tmp_path: Path) -> None:
    project = Project(tmp_path, sample=False)
    res = stack_runs(project.cfg(method="mean", compare=False))
    assert list(pd.read_csv(res.submission, dtype=str)["Id"]) == sorted(project.test_ids)


# Each breaker writes one bad run into the run root and returns (its name, the expected reason).
def _other_folds(p: Project) -> tuple[str, str]:
    other = make_folds(list(p.folds.ids), list(p.folds.labels), 3, seed=7)
    synthetic_run(p.root, "otherfolds", other, 0.5, 9, N_TEST)
    return "otherfolds", "fold fingerprint"


def _other_ids(p: Project) -> tuple[str, str]:
    ids = np.array([f"x_{i}" for i in p.folds.ids], dtype=object)
    f = Folds(ids, p.folds.labels, p.folds.fold, p.folds.k, p.folds.seed,
              fold_fingerprint(ids, p.folds.fold, p.folds.k, p.folds.seed))
    synthetic_run(p.root, "otherids", f, 0.5, 9, N_TEST)
    return "otherids", "training ids differ"


def _write_bad(p: Project, name: str, edit, classes=None) -> None:
    good = p.runs[0]
    oof = edit(good.oof.copy())
    write_run(p.root / name, name, classes or good.classes, p.folds, oof, good.test_ids,
              good.test_per_fold(), {"level": 1})


def _class_order(p: Project) -> tuple[str, str]:
    _write_bad(p, "reordered", lambda o: o[:, ::-1], classes=p.runs[0].classes[::-1])
    return "reordered", "class order"


def _nan_rows(p: Project) -> tuple[str, str]:
    def edit(o):
        o[:5] = np.nan
        return o
    _write_bad(p, "holes", edit)
    return "holes", "5 OOF rows have no prediction"


def _inf(p: Project) -> tuple[str, str]:
    def edit(o):
        o[3, 1] = np.inf
        return o
    _write_bad(p, "infinite", edit)
    return "infinite", "contain inf"


def _not_summing(p: Project) -> tuple[str, str]:
    _write_bad(p, "unnormalised", lambda o: o * 0.9)
    return "unnormalised", "do not sum to 1"


def _incomplete(p: Project) -> tuple[str, str]:
    run = p.root / "halfdone"
    (run / "parts").mkdir(parents=True)
    (run / "parts" / "fold0.json").write_text("{}")
    (run / "meta.json").write_text('{"status": "running", "folds": 3}')
    return "halfdone", "incomplete (folds done: [0] of 3)"


def _other_test_set(p: Project) -> tuple[str, str]:
    rng = np.random.default_rng(5)
    per_fold = np.stack([synthetic_proba(np.zeros(N_TEST, int), 4, 0.5, rng) for _ in range(3)])
    ids = np.array([f"other_{i}.png" for i in range(N_TEST)], dtype=object)
    write_run(p.root / "othertest", "othertest", p.runs[0].classes, p.folds, p.runs[0].oof, ids,
              per_fold, {"level": 1})
    return "othertest", "test ids differ"


@pytest.mark.parametrize("breaker", [_other_folds, _other_ids, _class_order, _nan_rows, _inf,
                                     _not_summing, _incomplete, _other_test_set])
def test_each_refusal_names_the_run_and_reason_and_writes_nothing(project: Project,
                                                                  breaker) -> None:
    name, reason = breaker(project)
    before = project.files()
    with pytest.raises(RunMismatchError) as err:
        stack_runs(project.cfg(runs=["good", "weak", name]))
    msg = str(err.value)
    assert name in msg and reason in msg, msg
    assert project.files() == before


def test_refuses_runs_not_matching_the_sample_submission(project: Project) -> None:
    sample = pd.DataFrame({"Id": project.sample_ids + ["unseen.png"], "Category": 0})
    (project.data / "test_upload" / "unseen.png").write_bytes(b"")
    sample.to_csv(project.data / "sample-submission.csv", index=False)
    before = project.files()
    with pytest.raises(RunMismatchError, match=r"good .*1 id\(s\) have no test prediction"):
        stack_runs(project.cfg())
    assert project.files() == before


def test_refuses_runs_of_another_root_folds(project: Project, tmp_path: Path) -> None:
    other = make_folds(list(project.folds.ids), list(project.folds.labels), 3, seed=11)
    ext = tmp_path / "elsewhere"
    synthetic_run(ext, "a", other, 0.5, 1, N_TEST)
    synthetic_run(ext, "b", other, 0.4, 2, N_TEST)
    with pytest.raises(RunMismatchError, match=r"a \(.*folds.csv"):
        stack_runs(project.cfg(runs=[str(ext / "a"), str(ext / "b")]))


def test_unknown_run_pattern_and_empty_root_are_clear(project: Project, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing_like_this"):
        stack_runs(project.cfg(runs=["nothing_like_this*"]))
    with pytest.raises(RunMismatchError, match="no complete runs"):
        stack_runs(StackConfig(data=str(project.data), out=str(tmp_path / "empty")))


_PROBE = """
import atexit, runpy, sys
def report():
    bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorflow', 'keras'))
    print('HEAVY_MODULES=' + ','.join(bad), file=sys.stderr)
    import numpy
    print('HUGEPAGE_ADVICE=%s' % numpy._core.multiarray._get_madvise_hugepage(), file=sys.stderr)
atexit.register(report)
sys.argv = ['stack.py'] + sys.argv[1:]
runpy.run_path('stack.py', run_name='__main__')
"""


def test_stack_script_never_imports_torch_or_tensorflow(project: Project) -> None:
    """Nor does it let numpy advise 2 MB pages (kernel compaction stalls at 1.5M rows)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, "--data", str(project.data), "--out", str(project.out),
         "--compare", "false", "--method", "greedy"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "| stack-greedy" in out.stdout and "chosen: greedy" in out.stdout
    assert "HEAVY_MODULES=\n" in out.stderr, out.stderr
    assert "HUGEPAGE_ADVICE=False" in out.stderr, out.stderr


def test_stack_script_reports_errors_without_traceback(project: Project) -> None:
    out = subprocess.run(
        [sys.executable, "stack.py", "--data", str(project.data), "--out", str(project.out),
         "--runs", "no_such_run"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert "error:" in out.stderr and "no_such_run" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_tiny_end_to_end_train_stack_submit(demo_subset: Path, tmp_path: Path) -> None:
    """Two tiny real timm runs on real PNGs, then stack.py; the submission matches the sample."""
    out = tmp_path / "runs"
    for name, seed in (("r10a", "1"), ("r10b", "2")):
        args = ["--data", str(demo_subset), "--out", str(out), "--backbone", "timm/resnet10t",
                "--epochs", "1", "--img-size", "16", "--folds", "3", "--progress", "false",
                "--run-name", name, "--train-seed", seed, "--threads", "1"]
        code = f"import sys, run_folds; sys.exit(run_folds.main({args!r}))"
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    res = stack_runs(StackConfig(data=str(demo_subset), out=str(out)))
    assert [r["model"] for r in res.rows if r["level"] == 1] == ["r10a", "r10b"]
    sample = pd.read_csv(demo_subset / "sample-submission.csv", dtype=str)
    sub = pd.read_csv(res.submission, dtype=str)
    assert list(sub["Id"]) == list(sample["Id"])
    assert res.test_accuracy is not None and 0.0 <= res.test_accuracy <= 1.0
    assert load_run(res.level2_run).meta["level"] == 2
    # The held-out table: each real run's fold-mean test matrix scored on test_labels.csv,
    # recomputed here from the saved files; the submission row is the scorer's accuracy.
    truth = pd.read_csv(demo_subset / "test_labels.csv", dtype=str)
    table = {r["model"]: r for r in res.held_out}
    assert len(res.held_out) == 2 + 7 + 1 and res.report["held_out_rows"] == len(truth) == 40
    for name in ("r10a", "r10b"):
        run = load_run(out / demo_subset.name / name)
        pos = {i: n for n, i in enumerate(run.test_ids)}
        p = run.test[[pos[i] for i in truth["Id"]]]
        y = np.array([run.classes.index(c) for c in truth["Category"]])
        assert table[name]["held_out_accuracy"] == pytest.approx((p.argmax(1) == y).mean())
        assert table[name]["held_out_log_loss"] == pytest.approx(
            -np.log(np.clip(p[np.arange(len(y)), y], 1e-15, 1)).mean())
        assert table[name]["oof_accuracy"] == pytest.approx(run.scores()["accuracy"])
    assert table[f"submission (stack-{res.chosen})"]["held_out_accuracy"] == pytest.approx(
        res.test_accuracy)
    assert "held-out test labels (40 images)" in res.summary()
    assert "held_out_accuracy" in (res.out_dir / "report.md").read_text()


def test_held_out_table_scores_every_model_on_the_test_labels(project: Project) -> None:
    """Known test labels (in shuffled order): each row's held-out scores by hand; ids that do
    not match the runs' test set give a warning and no table, not a failed stack."""
    truth = project.runs[0].meta["y_test_truth"]
    classes = project.runs[0].classes
    order = np.random.default_rng(3).permutation(N_TEST)
    labels = pd.DataFrame({"Id": [f"test_{i:04d}.png" for i in order],
                           "Category": [classes[truth[i]] for i in order]})
    labels.to_csv(project.data / "test_labels.csv", index=False)
    res = stack_runs(project.cfg(method="logreg"))
    rows = {r["model"]: r for r in res.held_out}
    assert list(rows)[:3] == ["good", "noise", "weak"]
    assert list(rows)[-1] == "submission (stack-logreg)"
    for run in project.runs:
        hand = (run.test.argmax(1) == np.array(truth)).mean()
        assert rows[run.name]["held_out_accuracy"] == pytest.approx(hand)
        assert rows[run.name]["oof_log_loss"] == pytest.approx(run.scores()["log_loss"])
    assert rows["good"]["held_out_accuracy"] > 0.6 > rows["noise"]["held_out_accuracy"]
    # each model against the best single run ("good") on the same images: gain and McNemar
    assert "gain_vs_best_run" not in rows["good"]
    right = {run.name: run.test.argmax(1) == np.array(truth) for run in project.runs}
    assert rows["noise"]["gain_vs_best_run"] == pytest.approx(
        right["noise"].mean() - right["good"].mean())
    only_noise = int((right["noise"] & ~right["good"]).sum())
    only_good = int((right["good"] & ~right["noise"]).sum())
    assert rows["noise"]["mcnemar_p"] == pytest.approx(
        min(1.0, 2 * sum(math.comb(only_noise + only_good, i)
                         for i in range(min(only_noise, only_good) + 1))
            / 2 ** (only_noise + only_good)))
    assert rows["noise"]["mcnemar_p"] < 0.01
    level2 = load_run(res.level2_run)
    assert rows["stack-logreg"]["held_out_accuracy"] == pytest.approx(
        (level2.test.argmax(1) == np.array(truth)).mean())
    assert rows["submission (stack-logreg)"]["held_out_accuracy"] == pytest.approx(
        res.test_accuracy)

    labels.iloc[:-1].to_csv(project.data / "test_labels.csv", index=False)
    again = stack_runs(project.cfg(method="mean", compare=False, name="again"))
    assert again.held_out == [] and "held-out" not in again.summary()


def test_resolved_config_is_written_and_reusable(project: Project) -> None:
    from oof.config import parse_config

    res = stack_runs(project.cfg(method="mean", compare=False, ensemble_size=7))
    cfg = parse_config(StackConfig, ["--config", str(res.out_dir / "config.yaml"),
                                     "--method", "greedy"], "stack.py", "")
    assert cfg.ensemble_size == 7 and cfg.method == "greedy" and cfg.out == str(project.out)
    with pytest.raises(ConfigError, match="ensemble_size"):
        parse_config(StackConfig, ["--config", str(_yaml(project, "ensemble_sise: 3"))], "s", "")


def _yaml(project: Project, text: str) -> Path:
    path = project.out / "bad.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("metric", ["macro_f1", "top3", "accuracy"])
def test_metric_selects_the_best_method_by_that_metric(project: Project, metric: str) -> None:
    res = stack_runs(project.cfg(metric=metric, name=f"by-{metric}"))
    level2 = [r for r in res.rows if r["level"] == 2]
    assert {r["model"] for r in level2} == {f"stack-{m}" for m in
                                            ("mean", "geo", "rank", "blend", "greedy", "logreg",
                                             "lightgbm")}
    best = max(r[metric] for r in level2)
    chosen = next(r for r in level2 if r["chosen"])
    assert chosen[metric] == best and chosen["model"] == f"stack-{res.chosen}"
    assert all(0 <= r["macro_f1"] <= 1 and r["top3"] >= r["accuracy"] for r in res.rows)
    md = (res.out_dir / "report.md").read_text()
    assert "macro_f1" in md and "top3" in md


def test_unknown_metric_is_refused(project: Project) -> None:
    with pytest.raises(ConfigError, match="metric"):
        stack_runs(project.cfg(metric="auc"))
