"""Issue 30 on the fold side: a run's cost in meta.json, ``--refit-full`` and ``--distill-from``.

The end-to-end test trains the real timm family in a subprocess (torch never enters the pytest
process, which may hold TensorFlow from the Keras tests); the distillation targets are checked
without training, against a teacher folder written by ``oof.rundir.write_run``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from oof.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, shutil, sys
from pathlib import Path
import numpy as np, pandas as pd
import backbones
from backbones.callbacks import Callback
from ensemble.cost import Cost, meta_cost
from oof.config import RunConfig
from oof.rundir import load_run
from runner.refit import train_refit
from runner.run import finish_run, prepare_run, run_folds
from serve.bundle import decode

data, out = Path(sys.argv[1]), Path(sys.argv[2])
base = dict(data=str(data), folds=2, epochs=2, img_size=16, batch_size=16, progress=False,
            augment="none", tta="hflip", threads=1, tta_save_views=True)


class Kill(Callback):
    armed = False  # a class attribute: not in the memory the template saves with the state

    def on_epoch_end(self, epoch, logs=None):
        if Kill.armed and epoch == 1:
            Kill.armed = False
            raise KeyboardInterrupt("killed mid-refit")


res = {}
first = run_folds(RunConfig(out=str(out / "a"), **base))  # the folds only, no refit
run_a = out / "a" / "data" / "timm-resnet10t_16px"
res["refit_before"] = first.run.refit_test() is None and first.refit is None
res["meta"] = load_run(run_a).meta
c = res["meta"]
res["meta_cost"] = meta_cost(c) == Cost(c["passes_per_image"], c["ms_per_image"])
names, views = first.run.views_oof()
vnames, vtest = first.run.views_test_per_fold()
res["view_names"] = [names, vnames]
res["views_mean_oof_diff"] = float(np.abs(views.mean(axis=0) - first.run.oof).max())
res["views_mean_test_diff"] = float(np.abs(vtest.mean(axis=0) - first.run.test_per_fold()).max())
res["views_differ"] = float(np.abs(views[0] - views[1]).max())
shutil.copytree(out / "a", out / "b")

# uninterrupted refit (the Kill callback present but disarmed, as in the resumed one)
prep = prepare_run(RunConfig(out=str(out / "a"), refit_full=True, **base))
train_refit(prep, callbacks=[Kill()])
done = finish_run(prep)  # finds the refit finished: records it, trains nothing
res["refit_meta"] = load_run(run_a).meta["refit"]

# killed in its last epoch, then resumed
run_b = out / "b" / "data" / "timm-resnet10t_16px"
prep = prepare_run(RunConfig(out=str(out / "b"), refit_full=True, **base))
Kill.armed = True
try:
    train_refit(prep, callbacks=[Kill()])
    res["killed"] = False
except KeyboardInterrupt:
    res["killed"] = True
res["marker_after_kill"] = (run_b / "refit" / "refit.json").exists()
res["resume_state_after_kill"] = (run_b / "work" / "refit" / "resume.pt").exists()
info_b = train_refit(prep, callbacks=[Kill()])
res["resumed_from_epoch"] = info_b["resumed_from_epoch"]
finish_run(prep)
a, b = load_run(run_a), load_run(run_b)
res["refit_equal"] = bool(np.array_equal(a.refit_test(), b.refit_test()))
res["checkpoint_equal"] = ((run_a / "checkpoints" / "refit.safetensors").read_bytes()
                           == (run_b / "checkpoints" / "refit.safetensors").read_bytes())
res["oof_unchanged"] = bool(np.array_equal(a.oof, first.run.oof))
res["rerun_trains_nothing"] = train_refit(prep)["seconds"] == info_b["seconds"]

# --remeasure-cost: the finished run's cost timed again, the refit's following; nothing else
import time
files_before = {q.name: q.read_bytes() for q in run_a.rglob("*.parquet")}
cost_before = a.meta["cost"]
time.sleep(1.1)  # measured_at has whole seconds
finish_run(prepare_run(RunConfig(out=str(out / "a"), refit_full=True, remeasure_cost=True,
                                 **base)))
m = load_run(run_a).meta
res["remeasured"] = {
    "new_time": m["cost"]["measured_at"] > cost_before["measured_at"],
    "each": m["cost"]["seconds_each"], "seconds": m["cost"]["seconds"],
    "ms": [m["ms_per_pass"], m["ms_per_image"], m["refit"]["ms_per_image"]],
    "files_same": files_before == {q.name: q.read_bytes() for q in run_a.rglob("*.parquet")},
    "refit_same": {k: v for k, v in m["refit"].items() if k != "ms_per_image"}
    == {k: v for k, v in a.meta["refit"].items() if k != "ms_per_image"}}
a = load_run(run_a)

# served as predict.py loads a model: the family's predictor on the decoded image files
family = backbones.get_backend("timm")
pred = family.load_predictor(a.meta, run_a / a.meta["refit"]["checkpoint"], 1, "cpu")
files = [data / "test_upload" / f"{i}" for i in a.test_ids]
served = pred.predict_proba(decode([str(f) for f in files], 16))
res["served_max_diff"] = float(np.abs(served - a.refit_test()).max())

# predict.py on a stack whose budget (2 passes: the refit's, not the 4 of the fold models)
# chose to serve run a by its refit model: the stack's rows are the refit's
from ensemble.stack import StackConfig, stack_runs
from serve.predict import predict_files
stacked = stack_runs(StackConfig(data=str(data), out=str(out / "a"), method="mean", budget=2,
                                 budget_views=False, compare=False, name="stack-refit"))
info = json.loads((out / "a" / "data" / "stack-refit" / "stacker.json").read_text())
res["stack_variant"] = info["runs"][0]["variant"]
table = predict_files(out / "a" / "data" / "stack-refit", [data / "test_upload"], None)
table = table.set_index("id").loc[list(a.test_ids)]
res["predict_py_refit_diff"] = float(np.abs(table[a.classes].to_numpy() - a.refit_test()).max())
rnames, rviews = a.refit_views_test()
res["refit_views"] = [rnames, float(np.abs(rviews.mean(axis=0) - a.refit_test()).max())]
res["refit_history"] = pd.read_csv(run_a / "refit" / "history.csv").to_dict("list")

# distilled students of run a (a level-1 run's OOF is leak-free too), fold 0 only: with
# alpha = 1 the targets are the exact one-hot labels, so the soft-target path must reproduce
# run a's fold 0 bit for bit; with alpha = 0.3 the stack's probabilities change the model
from runner.run import train_locked
for alpha in (1.0, 0.3):
    name = f"student{alpha:g}"
    prep = prepare_run(RunConfig(out=str(out / "a"), run_name=name, fold=0, distill_from=str(
        run_a), distill_alpha=alpha, distill_temperature=2.0, **base))
    train_locked(prep, prep.todo())
    got = pd.read_parquet(out / "a" / "data" / name / "parts" / "fold0_oof.parquet")
    want = pd.read_parquet(run_a / "parts" / "fold0_oof.parquet")
    res[name] = {"equal": bool(got.equals(want)),
                 "diff": float(np.abs(got[a.classes].to_numpy() - want[a.classes].to_numpy()
                                      ).max()),
                 "meta": json.loads((out / "a" / "data" / name / "meta.json").read_text())}

# the alpha 0.3 student killed in its fold's last epoch, then resumed: bit-identical to it
from backbones.callbacks import USER_CALLBACKS
USER_CALLBACKS["Kill"] = Kill  # a config callback: the resumed run has the same config
prep = prepare_run(RunConfig(out=str(out / "a"), run_name="student-killed", fold=0,
                             distill_from=str(run_a), distill_alpha=0.3, distill_temperature=2.0,
                             callbacks=[{"name": "Kill"}], **base))
Kill.armed = True
try:
    train_locked(prep, prep.todo())
    res["student_killed"] = False
except KeyboardInterrupt:
    res["student_killed"] = True
killed = out / "a" / "data" / "student-killed"
res["student_done_after_kill"] = prep.run.is_done(0)
res["student_resume_state"] = sorted(p.name for p in (killed / "work").rglob("resume*"))
prep = prepare_run(RunConfig(out=str(out / "a"), run_name="student-killed", fold=0,
                             distill_from=str(run_a), distill_alpha=0.3, distill_temperature=2.0,
                             callbacks=[{"name": "Kill"}], **base))
train_locked(prep, prep.todo())
res["student_resumed_from"] = prep.run.read_fold_info(0).get("resumed_from_epoch")
got = pd.read_parquet(killed / "parts" / "fold0_oof.parquet")
want = pd.read_parquet(out / "a" / "data" / "student0.3" / "parts" / "fold0_oof.parquet")
res["student_resumed_equal"] = bool(got.equals(want))
print(json.dumps(res, default=str))
"""


@pytest.mark.slow
def test_cost_and_refit_end_to_end(demo_dir: Path, tmp_path: Path) -> None:
    """meta.json records passes and measured ms; the refit model trains on every row, resumes
    after a kill bit-identical to an uninterrupted refit, and serves its stored test rows."""
    from tests.conftest import write_demo_subset

    data = write_demo_subset(demo_dir, tmp_path / "data", 6, 10)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(data), str(tmp_path / "runs")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                               **{k: v for k, v in __import__("os").environ.items()
                                  if k not in ("PYTHONPATH",)}})
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])

    meta = got["meta"]  # 2 folds x 2 views (hflip)
    assert meta["passes_per_image"] == 4 and meta["ms_per_pass"] > 0
    assert meta["ms_per_image"] == pytest.approx(meta["ms_per_pass"] * 4)
    cost = meta["cost"]
    assert cost["threads"] == 1 and cost["views"] == 2 and cost["images"] == 10
    assert cost["cpu"] and cost["checkpoint"] == "checkpoints/fold0.safetensors"
    assert got["meta_cost"]  # what the level-2 code reads

    refit = got["refit_meta"]
    assert got["refit_before"] and refit["oof"] is None and "no OOF" in refit["oof_note"]
    assert refit["n_train"] == 60 and refit["epochs"] == 2 and refit["passes_per_image"] == 2
    assert refit["predict_weights"] == "last" and refit["seed"] == meta["train_seed"] + 2
    assert refit["ms_per_image"] == pytest.approx(meta["ms_per_pass"] * 2)
    assert all(np.isnan(v) for v in got["refit_history"]["val_loss"])  # nothing held out

    assert got["killed"] and not got["marker_after_kill"] and got["resume_state_after_kill"]
    assert got["resumed_from_epoch"] == 1
    assert got["refit_equal"] and got["checkpoint_equal"] and got["oof_unchanged"]
    assert got["rerun_trains_nothing"]
    again = got["remeasured"]  # --remeasure-cost: timed now, best of 3, nothing else moved
    assert again["new_time"] and again["files_same"] and again["refit_same"]
    assert len(again["each"]) == 3 and again["seconds"] == min(again["each"])
    ms_pass, ms_run, ms_refit = again["ms"]
    assert ms_run == pytest.approx(ms_pass * 4) and ms_refit == pytest.approx(ms_pass * 2)
    assert got["served_max_diff"] < 1e-6
    assert got["stack_variant"]["models"] == "refit"  # the budget's choice, served as chosen
    assert got["predict_py_refit_diff"] < 1e-6

    # --tta-save-views: each view's OOF and per-fold test rows alone; their mean is the run's
    assert got["view_names"] == [["identity", "hflip"]] * 2
    assert got["views_mean_oof_diff"] < 1e-6 and got["views_mean_test_diff"] < 1e-6
    assert got["views_differ"] > 1e-4  # two views, not one stored twice
    assert got["refit_views"][0] == ["identity", "hflip"] and got["refit_views"][1] < 1e-6

    # --distill-from: the soft targets reach the loss (alpha 0.3 moves the model), and the
    # soft-target path itself changes nothing (alpha 1: one-hot targets, bit-identical)
    assert got["student1"]["equal"], got["student1"]["diff"]
    assert got["student0.3"]["diff"] > 1e-4
    for name, alpha in (("student1", 1.0), ("student0.3", 0.3)):
        meta = got[name]["meta"]
        assert meta["student"] is True and meta["teacher"]["alpha"] == alpha
        assert meta["teacher"]["fold_fingerprint"] == got["meta"]["fold_fingerprint"]
        assert meta["teacher"]["temperature"] == 2.0 and "optimistic" in meta["teacher"]["note"]
    # a student resumes after a kill like any fold: no half fold, then the same bits
    assert got["student_killed"] and not got["student_done_after_kill"]
    assert got["student_resume_state"], "no resume state left by the killed student fold"
    assert got["student_resumed_from"] == 1 and got["student_resumed_equal"]


def test_runs_without_refit_or_views_load_as_before(tmp_path: Path) -> None:
    """A run folder without the issue-30 additions loads, with no refit and no views."""
    from oof.folds import make_folds
    from oof.rundir import load_run, write_run

    ids = [f"i{n}" for n in range(12)]
    folds = make_folds(ids, ["a", "b"] * 6, 3, 1)
    rng = np.random.default_rng(1)
    write_run(tmp_path / "r", "r", ["a", "b"], folds, rng.dirichlet([1, 1], 12), ["t0"],
              rng.dirichlet([1, 1], (3, 1)), {"level": 1})
    run = load_run(tmp_path / "r")
    assert run.refit_test() is None and run.views_oof() is None and run.refit_views_test() is None
    assert run.views_test_per_fold() is None


def test_refit_epochs_follow_the_folds() -> None:
    from runner.refit import refit_epochs

    infos = [{"epochs_run": 10, "best_epoch": 3}, {"epochs_run": 7, "best_epoch": 6},
             {"epochs_run": 10, "best_epoch": 4}]
    assert refit_epochs(infos, "last")[0] == 10
    assert refit_epochs(infos, "best")[0] == 5  # median of best epoch + 1: 4, 7, 5
    assert refit_epochs(infos[:2], "last")[0] == 9  # 8.5 rounds up
    assert refit_epochs([{"epochs_run": 4, "best_epoch": None}] * 2, "best")[0] == 4


# ------------------------------------------------------------------------------ distillation
@pytest.fixture
def teacher_root(tmp_path: Path) -> tuple[Path, object, list[str], np.ndarray]:
    """A run root's folds and a level-2 teacher folder on them with random OOF rows."""
    from oof.folds import ensure_folds
    from oof.rundir import write_run

    classes = ["a", "b", "c"]
    ids = [f"img{i:02d}.png" for i in range(30)]
    labels = [classes[i % 3] for i in range(30)]
    folds = ensure_folds(tmp_path, ids, labels, 3, 7)
    rng = np.random.default_rng(0)
    oof = rng.dirichlet(np.ones(3), size=30)
    test_ids = np.array(["t0.png", "t1.png"], dtype=object)
    write_run(tmp_path / "stack-mean", "stack-mean", classes, folds, oof, test_ids,
              rng.dirichlet(np.ones(3), size=(3, 2)), {"level": 2, "method": "mean"})
    return tmp_path / "stack-mean", folds, classes, oof


def test_each_target_comes_from_the_teachers_oof_row(teacher_root) -> None:
    from oof.distill import distill_targets, load_teacher

    stack, folds, classes, _ = teacher_root
    teacher = load_teacher(stack, folds, classes)
    y = np.array([classes.index(lab) for lab in folds.labels])
    alpha, temp = 0.3, 2.0
    targets = distill_targets(teacher, y, alpha, temp)
    df = pd.read_parquet(stack / "oof.parquet").set_index("id")
    for i, row_id in enumerate(folds.ids.astype(str)):  # row by row, from the file itself
        stored = df.loc[row_id]
        assert int(stored["fold"]) == int(folds.fold[i])  # made by a model that held it out
        p = stored[[f"stack-mean__{c}" for c in classes]].to_numpy(np.float64) ** (1 / temp)
        want = alpha * np.eye(3)[y[i]] + (1 - alpha) * p / p.sum()
        np.testing.assert_allclose(targets[i], want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-12)
    assert np.array_equal(distill_targets(teacher, y, 1.0, temp), np.eye(3)[y])  # hard only
    # label smoothing eps smooths the one-hot part only; the teacher's part is not flattened
    eps = 0.1
    smoothed = distill_targets(teacher, y, alpha, temp, eps)
    np.testing.assert_allclose(smoothed - targets, alpha * (eps / 3 - eps * np.eye(3)[y]),
                               rtol=0, atol=1e-7)  # the smoothing is float32, as the losses'
    np.testing.assert_allclose(smoothed.sum(axis=1), 1.0, atol=1e-7)
    meta = teacher.describe(alpha, temp)
    assert meta["fold_fingerprint"] == folds.fingerprint and meta["level"] == 2
    assert "optimistic" in meta["note"]


def test_a_students_loss_does_not_smooth_its_targets_again() -> None:
    """The loss smooths every target it gets; a student's targets carry their smoothing (on the
    one-hot part), so a fold job on soft targets trains with the loss's smoothing off, and other
    jobs keep theirs."""
    from backbones.base import FoldJob
    from oof.config import RunConfig

    cfg = RunConfig(label_smoothing=0.1)

    def job(soft: np.ndarray | None) -> FoldJob:
        y = np.zeros(3, dtype=np.int64)
        return FoldJob(spec=None, cfg=cfg, fold=0, classes=["a", "b"], x_train=None, y_train=y,
                       x_val=None, y_val=y, x_test=None, checkpoint_path=Path("c"),
                       work_dir=Path("w"), history_path=Path("h"), y_train_soft=soft)

    assert job(None).cfg is cfg
    assert job(np.full((3, 2), 0.5)).cfg.label_smoothing == 0.0
    assert cfg.label_smoothing == 0.1  # the run's own config (config.yaml) is untouched


def test_a_teacher_on_other_folds_or_classes_is_refused(teacher_root, tmp_path: Path) -> None:
    from oof.distill import load_teacher
    from oof.folds import make_folds

    stack, folds, classes, _ = teacher_root
    other = make_folds(list(folds.ids.astype(str)), list(folds.labels.astype(str)), 3, 8)
    with pytest.raises(ConfigError, match=r"--distill-from .*made on folds .* same folds"):
        load_teacher(stack, other, classes)
    with pytest.raises(ConfigError, match=r"class order"):
        load_teacher(stack, folds, ["c", "b", "a"])
    with pytest.raises(ConfigError, match=r"--distill-from .*not a run folder"):
        load_teacher(tmp_path / "nowhere", folds, classes)


def test_distillation_refusals_name_the_flag(teacher_root) -> None:
    """Rows without a teacher OOF row, and a family whose loader takes only class indices, are
    refused before the teacher is read (the probe fits a classifier on class indices);
    --refit-full with --pseudo-labels too."""
    import backbones
    from oof.config import RunConfig
    from runner.refit import check_refit
    from runner.run import _teacher

    stack, folds, classes, _ = teacher_root
    timm, probe = backbones.get_backend("timm"), backbones.get_backend("probe")
    for extra, name in (({"extra_train": "x"}, "--extra-train"),
                        ({"pseudo_labels": "y"}, "--pseudo-labels")):
        cfg = RunConfig(distill_from=str(stack), **extra)
        with pytest.raises(ConfigError, match=f"--distill-from .* with {name}"):
            _teacher(cfg, timm, None, folds)
    assert backbones.get_backend("keras").soft_targets  # Keras trains on them too
    with pytest.raises(ConfigError, match="probe family cannot train on soft targets"):
        _teacher(RunConfig(distill_from=str(stack)), probe, None, folds)
    with pytest.raises(ConfigError, match="--refit-full with --pseudo-labels"):
        check_refit(RunConfig(refit_full=True, pseudo_labels="z"))
    assert _teacher(RunConfig(), timm, None, folds) == (None, None)
