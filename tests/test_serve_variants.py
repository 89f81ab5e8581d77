"""A budgeted stack that serves runs another way than as trained (issue 30 items 1 and 3).

One real timm run (resnet10t, 16 px, K=2, one epoch, hflip TTA) trained with --refit-full and
--tta-save-views on the demo subset's real PNGs; stack.py --budget then chooses its refit model
on one view (1 pass) or, refit refused, its fold models on one view (2 passes). The exported
bundle through predict.py, and the stack folder served by serve.py on 127.0.0.1, give the
stack's own submission probabilities to 1e-6; /health and the upload page show the passes and
milliseconds per image of each run as served and of the whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.test_serve import _py, _serving, requests

RUN = "timm-resnet10t_16px"
CLASSES = [str(c) for c in range(10)]


@pytest.fixture(scope="module")
def run_root(demo_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("variant_runs")
    _py("run_folds.py", "--data", str(demo_subset), "--out", str(out), "--folds", "2",
        "--epochs", "1", "--progress", "false", "--threads", "1", "--backbone",
        "timm/resnet10t", "--img-size", "16", "--tta", "hflip", "--tta-save-views",
        "--refit-full")
    return out


def _stack(demo_subset: Path, run_root: Path, name: str, *flags: str) -> Path:
    _py("stack.py", "--data", str(demo_subset), "--out", str(run_root), "--method", "logreg",
        "--compare", "false", "--name", name, *flags)
    return run_root / demo_subset.name / name


def _submission(stack: Path) -> pd.DataFrame:
    return pd.read_csv(stack / "submission_proba.csv", dtype={"Id": str}).set_index("Id")


@pytest.mark.slow
def test_refit_and_view_variants_are_chosen_recorded_and_served(
        run_root: Path, demo_subset: Path, tmp_path: Path) -> None:
    # refit allowed: one model on one view (1 pass) has the fold models' OOF on that view
    refit = _stack(demo_subset, run_root, "stack-refit", "--budget", "1")
    info = json.loads((refit / "stacker.json").read_text())
    assert [r["variant"]["models"] for r in info["runs"]] == ["refit"]
    (view,) = info["runs"][0]["variant"]["views"]
    report = json.loads((refit / "report.json").read_text())
    assert report["budget"]["chosen"] == [f"{RUN}[refit:{view}]"]
    assert report["budget"]["passes_chosen"] == 1
    rows = {r["model"]: r for r in report["table"]}
    assert "no OOF of its own" in rows[f"{RUN}[refit:{view}]"]["note"]
    assert "can serve overconfident" in rows[f"{RUN}[refit:{view}]"]["note"]
    assert rows[RUN]["passes"] == 4 and rows["stack-logreg"]["passes"] == 1
    bundle = tmp_path / "bundle"
    _py("-m", "serve.bundle", str(refit), "--out", str(bundle))
    manifest = json.loads((bundle / "manifest.json").read_text())
    (entry,) = manifest["runs"]
    assert entry["variant"] == {"models": "refit", "views": [view]} and entry["passes"] == 1
    assert [c["file"] for c in entry["checkpoints"]] == [f"runs/{RUN}/refit.safetensors"]
    preds = tmp_path / "preds.csv"
    _py("predict.py", str(bundle), str(demo_subset / "test_upload"), "--out", str(preds))
    got = pd.read_csv(preds, dtype={"id": str}).set_index("id")
    sub = _submission(refit)
    np.testing.assert_allclose(got.loc[sub.index, CLASSES].to_numpy(float),
                               sub[CLASSES].to_numpy(float), rtol=0, atol=1e-6)

    # refit refused: the fold models on one view (2 passes of the run's 4), served by serve.py
    views = _stack(demo_subset, run_root, "stack-views", "--budget", "2", "--budget-refit",
                   "false")
    info = json.loads((views / "stacker.json").read_text())
    assert info["runs"][0]["variant"] == {"models": "folds", "views": [view]}
    sub = _submission(views)
    with _serving(views) as url:
        health = requests.get(url + "/health", timeout=30).json()
        (model,) = health["models"]
        assert (model["served_as"], model["models"], model["views"], model["passes"]) == (
            f"folds:{view}", 2, [view], 2)
        ms = json.loads((run_root / demo_subset.name / RUN / "meta.json").read_text())[
            "ms_per_image"]
        assert model["ms_per_image"] == pytest.approx(ms / 2, abs=1e-3)
        assert health["cost"] == {"passes": 2, "ms_per_image": model["ms_per_image"]}
        page = requests.get(url + "/", timeout=30).text
        assert f"served as folds:{view}: 2 passes" in page and "cost per image" in page
        files = [("file", (name, (demo_subset / "test_upload" / name).read_bytes(), "image/png"))
                 for name in sub.index[:8]]
        answer = requests.post(url + "/predict", files=files, timeout=120).json()
    served = np.array([[p["probabilities"][c] for c in CLASSES]
                       for p in answer["predictions"]])
    np.testing.assert_allclose(served, sub.loc[sub.index[:8], CLASSES].to_numpy(float),
                               rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_students_run_folder_is_a_predictor_and_a_bundle(
        run_root: Path, demo_subset: Path, tmp_path: Path) -> None:
    """A distilled student trained with --refit-full is served from its run folder as one model
    (issue 30 item 4): predict.py on its exported bundle and serve.py on the folder itself (the
    loader predict.py shares) give the refit model's stored test rows to 1e-6, and say it is a
    student."""
    from oof.errors import ConfigError
    from oof.rundir import load_run
    from serve.bundle import describe_run

    teacher = _stack(demo_subset, run_root, "stack-teacher", "--runs", RUN)
    _py("run_folds.py", "--data", str(demo_subset), "--out", str(run_root), "--folds", "2",
        "--epochs", "1", "--progress", "false", "--threads", "1", "--backbone",
        "timm/resnet10t", "--img-size", "16", "--run-name", "student", "--distill-from",
        str(teacher), "--refit-full")
    student = run_root / demo_subset.name / "student"
    run = load_run(student)
    want = pd.DataFrame(run.refit_test(), index=run.test_ids, columns=run.classes)
    assert run.meta["student"] is True and run.meta["refit"]["passes_per_image"] == 1
    assert np.abs(run.refit_test() - run.test).max() > 1e-4  # the refit is not the fold mean

    bundle = tmp_path / "student-bundle"
    _py("-m", "serve.bundle", str(student), "--out", str(bundle))
    manifest = json.loads((bundle / "manifest.json").read_text())
    (entry,) = manifest["runs"]
    assert entry["variant"] == {"models": "refit", "views": None} and entry["passes"] == 1
    assert entry["student"] is True and entry["teacher"] == "stack-teacher"
    assert [c["file"] for c in entry["checkpoints"]] == ["runs/student/refit.safetensors"]
    assert manifest["stacker"]["method"] == "mean" and manifest["cost"]["passes"] == 1
    preds = tmp_path / "bundle.csv"
    _py("predict.py", str(bundle), str(demo_subset / "test_upload"), "--out", str(preds))
    got = pd.read_csv(preds, dtype={"id": str}).set_index("id")
    np.testing.assert_allclose(got.loc[want.index, CLASSES].to_numpy(float),
                               want[CLASSES].to_numpy(float), rtol=0, atol=1e-6)

    with _serving(student) as url:  # the run folder itself, as predict.py would load it
        health = requests.get(url + "/health", timeout=30).json()
        (model,) = health["models"]
        assert (model["served_as"], model["models"], model["passes"]) == ("refit", 1, 1)
        assert model["student"] is True and health["cost"]["passes"] == 1
        names = list(want.index[:4])
        files = [("file", (n, (demo_subset / "test_upload" / n).read_bytes(), "image/png"))
                 for n in names]
        answer = requests.post(url + "/predict", files=files, timeout=120).json()
    served = np.array([[p["probabilities"][c] for c in CLASSES]
                       for p in answer["predictions"]])
    np.testing.assert_allclose(served, want.loc[names, CLASSES].to_numpy(float), rtol=0,
                               atol=1e-6)
    with pytest.raises(ConfigError, match="one run folder"):
        describe_run(student, "greedy")
