"""Offline OOF analysis: numbers known by hand, the CLI's three files, refusals, and the report
rendered in a real (headless) browser with every image loaded."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from oof.analysis import (
    analyze,
    confusion_matrix,
    load_runs,
    per_class_scores,
    reliability,
)
from oof.errors import ConfigError, RunMismatchError
from oof.folds import Folds, fold_fingerprint, make_folds, write_folds
from oof.metrics import ece, ece_floor
from oof.rundir import check_compatible, load_run, write_run
from tests.requirements import MAKE_BROWSER, require_program
from tests.synthetic import synthetic_folds, synthetic_proba, synthetic_run

CLASSES = ["a", "b", "c"]
# Six rows, true classes a a b b c c, folds 0 1 0 1 0 1.
Y = np.array([0, 0, 1, 1, 2, 2])
RUN_A = np.array([  # argmax 0 1 1 1 2 0 -> right, wrong, right, right, right, wrong
    [0.90, 0.05, 0.05], [0.20, 0.70, 0.10], [0.10, 0.75, 0.15],
    [0.10, 0.62, 0.28], [0.32, 0.10, 0.58], [0.50, 0.20, 0.30]])
RUN_B = np.array([  # argmax 0 0 1 0 2 1 -> right, right, right, wrong, right, wrong
    [0.60, 0.30, 0.10], [0.80, 0.10, 0.10], [0.30, 0.40, 0.30],
    [0.80, 0.10, 0.10], [0.20, 0.20, 0.60], [0.10, 0.80, 0.10]])


def _tiny_folds(root: Path) -> Folds:
    ids = np.array([f"img{i}.png" for i in range(6)], dtype=object)
    labels = np.array([CLASSES[i] for i in Y], dtype=object)
    fold = np.array([0, 1, 0, 1, 0, 1])
    folds = Folds(ids, labels, fold, 2, 0, fold_fingerprint(ids, fold, 2, 0))
    write_folds(root, folds)
    return folds


def _write(root: Path, name: str, folds: Folds, oof: np.ndarray, meta: dict | None = None):
    c = oof.shape[1]
    test = np.full((folds.k, 2, c), 1.0 / c)
    return write_run(root / name, name, CLASSES[:c] if c <= 3 else [str(i) for i in range(c)],
                     folds, oof, np.array(["t0.png", "t1.png"], dtype=object), test,
                     meta or {"level": 1})


@pytest.fixture
def tiny(tmp_path: Path):
    folds = _tiny_folds(tmp_path)
    return [_write(tmp_path, "A", folds, RUN_A), _write(tmp_path, "B", folds, RUN_B)]


def test_numbers_known_by_hand(tiny) -> None:
    a = analyze(tiny, find_images=False)
    s = a.summary().set_index("run")
    assert s.loc["A", "accuracy"] == pytest.approx(4 / 6)
    assert s.loc["B", "accuracy"] == pytest.approx(4 / 6)
    p_true_a = [0.90, 0.20, 0.75, 0.62, 0.58, 0.30]
    assert s.loc["A", "log_loss"] == pytest.approx(-np.mean(np.log(p_true_a)))
    # fold 0 = rows 0, 2, 4 (A gets all right); fold 1 = rows 1, 3, 5 (A gets row 3 right)
    pf = a.runs[0].per_fold.set_index("fold")
    assert pf.loc[0, "accuracy"] == pytest.approx(1.0)
    assert pf.loc[1, "accuracy"] == pytest.approx(1 / 3)
    assert s.loc["A", "fold_acc_std"] == pytest.approx(1 / 3)
    # A predicts a b b b c a for a a b b c c
    np.testing.assert_array_equal(a.runs[0].confusion, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    pc = a.runs[0].per_class.set_index("class")
    np.testing.assert_allclose(pc["precision"], [1 / 2, 2 / 3, 1.0])
    np.testing.assert_allclose(pc["recall"], [1 / 2, 1.0, 1 / 2])
    # between runs: predictions differ on rows 1, 3, 5
    assert a.disagreement.loc["A", "B"] == pytest.approx(0.5)
    assert a.disagreement.loc["A", "A"] == 0
    assert a.one_right_other_wrong.loc["A", "B"] == 1  # row 3
    assert a.one_right_other_wrong.loc["B", "A"] == 1  # row 1
    assert a.oracle["oracle_accuracy"] == pytest.approx(5 / 6)  # only row 5 is missed by both
    assert a.oracle["rows_all_wrong"] == 1
    assert a.oracle["oracle_gain"] == pytest.approx(5 / 6 - 4 / 6)
    flat = np.corrcoef(RUN_A.ravel(), RUN_B.ravel())[0, 1]
    assert a.correlation.loc["A", "B"] == pytest.approx(flat)
    # A's six confidences fall in six different bins: ECE = mean |correct - confidence|
    gaps = [0.1, 0.7, 0.25, 0.38, 0.42, 0.5]
    assert a.runs[0].ece == pytest.approx(sum(gaps) / 6)
    # ensemble mean is wrong on row 5 (b 0.50 vs c 0.20) and row 3 (a 0.45 vs b 0.36)
    h = a.hardest
    assert list(h["id"]) == ["img5.png", "img3.png"]
    assert list(h["predicted"]) == ["b", "a"]
    assert list(h["true"]) == ["c", "b"]
    np.testing.assert_allclose(h["confidence"], [0.50, 0.45])
    np.testing.assert_allclose(h["p_true"], [0.20, 0.36])
    assert list(h["runs_wrong"]) == [2, 1]
    json.dumps(a.to_dict(), allow_nan=False)  # plain, valid JSON


def test_ece_bins_by_hand() -> None:
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.90, 0.10], [0.92, 0.08], [0.61, 0.39], [0.30, 0.70]])
    rel = reliability(y, proba, n_bins=15)
    assert len(rel) == 15 and rel["count"].sum() == 4
    # 0.90 and 0.92 share bin 13 (13/15, 14/15]; 0.61 -> bin 9; 0.70 -> bin 10
    assert rel.loc[13, "count"] == 2
    assert rel.loc[13, "confidence"] == pytest.approx(0.91)
    assert rel.loc[9, "accuracy"] == 0.0
    assert math.isnan(rel.loc[0, "accuracy"])  # empty bin
    assert ece(y, proba) == pytest.approx((2 * 0.09 + 0.61 + 0.30) / 4)
    # four rows at 0.75 confidence with three right: perfectly calibrated
    calibrated = np.array([[0.75, 0.25]] * 4)
    assert ece(np.array([0, 0, 0, 1]), calibrated) == pytest.approx(0.0)


def test_confusion_and_undefined_precision() -> None:
    cm = confusion_matrix(np.array([0, 1, 2, 2]), np.array([0, 0, 0, 2]), 3)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [1, 0, 0], [1, 0, 1]])
    pc = per_class_scores(cm, ["a", "b", "c"])
    assert math.isnan(pc.loc[1, "precision"])  # class b is never predicted
    assert pc.loc[0, "precision"] == pytest.approx(1 / 3)
    assert list(pc["support"]) == [1, 1, 2]


def test_mismatched_runs_refused_with_check_compatible_message(tmp_path: Path, capsys) -> None:
    from oof.analyze import main
    from oof.cli import main_guard
    from tests.test_stack import Project

    p = Project(tmp_path)
    a = p.runs[0]
    b = synthetic_run(p.root, "b", synthetic_folds(tmp_path / "y", n=60, seed=1), 0.8, 2)
    with pytest.raises(RunMismatchError) as expected:
        check_compatible([a, b])
    with pytest.raises(RunMismatchError) as got:
        load_runs(p.root, ["good", "b"])
    assert str(got.value) == str(expected.value)
    assert "fold fingerprint" in str(got.value)
    with pytest.raises(RunMismatchError):
        analyze([load_run(a.path), load_run(b.path)])
    assert main_guard(lambda: main(["--data", str(p.data), "--out", str(p.out), "--runs", "good",
                                    "b", "--report-dir", str(tmp_path / "rep")])) == 2
    assert str(expected.value) in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()
    with pytest.raises(RunMismatchError, match="no run folder"):
        load_runs(p.root, ["nope"])


def test_cli_writes_html_json_md(tmp_path: Path, capsys) -> None:
    from oof.analyze import main
    from tests.test_stack import Project

    p = Project(tmp_path)  # runs good, weak, noise in OUT/<dataset name>, as run_folds makes them
    flags = ["--data", str(p.data), "--out", str(p.out)]
    out = tmp_path / "report"
    assert main([*flags, "--runs", "good", "weak", "--report-dir", str(out), "--bins", "10",
                 "--hardest", "5", "--thumbnails", "false"]) == 0
    printed = capsys.readouterr().out
    assert "good" in printed and "noise" not in printed and "oracle accuracy" in printed
    data = json.loads((out / "report.json").read_text())
    assert [r["run"] for r in data["summary"]] == ["good", "weak"]
    assert data["calibration_bins"]["n_bins"] == 10
    assert len(data["runs"]["good"]["reliability"]) == 10
    assert len(data["hardest"]) == 5
    good = load_run(p.root / "good")
    assert data["runs"]["good"]["accuracy"] == pytest.approx(good.scores()["accuracy"])
    # the chance ECE of calibrated probabilities beside each ECE, as the held-out table has it
    want = ece_floor(good.y, good.oof, 10)
    assert [data["runs"]["good"][k] for k in ("ece_floor", "calibration_p")] == list(want)
    assert data["summary"][0]["ece_floor"] == want[0] and "ece_floor" in printed
    md = (out / "report.md").read_text()
    assert "## Between runs" in md and "| good" in md
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "Hardest images" in html
    assert "src=\"http" not in html and "<link" not in html  # nothing outside the file
    assert (out / "analyze_config.yaml").exists()
    assert main([*flags, "--thumbnails", "false"]) == 0  # all three runs, default report dir
    all_runs = json.loads((p.root / "analysis" / "report.json").read_text())
    assert len(all_runs["summary"]) == 3
    with pytest.raises(ConfigError, match="--data DATA --out OUT"):
        main([str(p.root)])  # the old positional RUN_ROOT: one way to name a run root


# ---------------------------------------------------------------- real images, real browser


def _run_with_images(root: Path, name: str, folds: Folds, data: Path, skill: float, seed: int,
                     history: bool, level: int = 1):
    """A run over the demo subset's ids whose meta points at the real image files."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(folds.labels.astype(str)))
    y = np.array([classes.index(lab) for lab in folds.labels.astype(str)])
    oof = synthetic_proba(y, len(classes), skill, rng)
    test = np.stack([synthetic_proba(np.zeros(4, int), len(classes), 0.5, rng)
                     for _ in range(folds.k)])
    meta = {"level": level, "config": {"data": str(data), "layout": "competition"}}
    if level == 1:
        meta["data"] = {"root": str(data), "layout": "competition"}
    run = write_run(root / name, name, classes, folds, oof,
                    np.array([f"t{i}.png" for i in range(4)], dtype=object), test, meta)
    if history:
        rows = [{"fold": f, "epoch": e, "loss": 2.0 / (e + 1), "accuracy": 0.5 + 0.1 * e,
                 "lr": 1e-3, "val_loss": 2.2 / (e + 1), "val_accuracy": 0.45 + 0.1 * e,
                 "seconds": 1.0} for f in range(folds.k) for e in range(3)]
        pd.DataFrame(rows).to_csv(run.path / "history.csv", index=False)
    return run


LOADED_MARKER = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute('data-images', ok + '/' + imgs.length);
});
</script></body>"""


def test_report_renders_in_headless_chromium(demo_subset: Path, tmp_path: Path) -> None:
    from oof.analyze import main

    chromium = require_program("chromium", MAKE_BROWSER)
    train = pd.read_csv(demo_subset / "train.csv", dtype=str)
    root = tmp_path / "runs" / demo_subset.name
    folds = make_folds(list(train["Id"]), list(train["Category"]), 3, 0)
    write_folds(root, folds)
    _run_with_images(root, "alpha", folds, demo_subset, 0.5, 1, history=True)
    _run_with_images(root, "beta", folds, demo_subset, 0.3, 2, history=True)
    _run_with_images(root, "stack", folds, demo_subset, 0.6, 3, history=False, level=2)
    out = tmp_path / "report"
    assert main(["--data", str(demo_subset), "--out", str(tmp_path / "runs"), "--report-dir",
                 str(out), "--hardest", "12", "--duplicates", "false"]) == 0
    data = json.loads((out / "report.json").read_text())
    assert len(data["hardest"]) == 12
    assert all(Path(h["path"]).is_file() for h in data["hardest"])
    assert data["ensemble_mean"]["members"] == ["alpha", "beta"]  # level 2 is already a blend
    html = (out / "report.html").read_text()
    assert html.count('class="thumb"') == 12
    assert "No history.csv for: stack" in html
    n_images = html.count("<img ")
    assert n_images == 5 + 12  # folds, confusion, pairwise, reliability, curves + thumbnails

    probe = tmp_path / "probe.html"  # the report plus a script counting decoded images
    probe.write_text(html.replace("</body>", LOADED_MARKER, 1))
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}",
           "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert found, f"marker missing from the DOM: {dom[:500]!r}"
    assert (int(found[1]), int(found[2])) == (n_images, n_images)
    assert "Hardest images" in dom and "Learning curves" in dom


def test_report_lists_planted_near_duplicates_with_thumbnails(tmp_path: Path) -> None:
    """A resized copy under another label (mixed-label group) and a recompressed copy in the
    test set (train/test pair) are found among distinct photos-like images, and shown."""
    from PIL import Image

    from oof.analyze import main

    rng = np.random.default_rng(0)
    data = tmp_path / "dupdata"
    rows = []
    for i in range(30):
        label = "abc"[i % 3]
        (data / "train" / label).mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).resize(
            (96, 96), Image.Resampling.BICUBIC)
        img.save(data / "train" / label / f"im{i:02d}.png")
        rows.append((f"im{i:02d}.png", label))
    src = Image.open(data / "train" / "a" / "im00.png")
    src.resize((80, 80), Image.Resampling.LANCZOS).save(data / "train" / "b" / "copy.png")
    rows.append(("copy.png", "b"))
    (data / "test_upload").mkdir()
    src.convert("RGB").save(data / "test_upload" / "t0.jpg", quality=85)
    Image.open(data / "train" / "c" / "im05.png").transpose(Image.Transpose.ROTATE_90).save(
        data / "test_upload" / "t1.png")  # a different picture, not a duplicate
    pd.DataFrame(rows, columns=["Id", "Category"]).to_csv(data / "train.csv", index=False)

    train = pd.read_csv(data / "train.csv", dtype=str)
    root = tmp_path / "runs" / data.name
    folds = make_folds(list(train["Id"]), list(train["Category"]), 3, 0)
    write_folds(root, folds)
    _run_with_images(root, "alpha", folds, data, 0.5, 1, history=False)
    out = tmp_path / "report"
    assert main(["--data", str(data), "--out", str(tmp_path / "runs"), "--report-dir", str(out),
                 "--hardest", "3"]) == 0
    dup = json.loads((out / "report.json").read_text())["duplicates"]
    assert dup["groups"] == [["im00.png", "copy.png"]]
    assert dup["mixed_label_groups"] == [["im00.png", "copy.png"]]
    # the test copy pairs with both training copies; the rotated image pairs with none
    assert sorted(p[:2] for p in dup["train_test_pairs"]) == [["copy.png", "t0.jpg"],
                                                              ["im00.png", "t0.jpg"]]
    html = (out / "report.html").read_text()
    section = html.split("id='duplicates'")[1].split("id='curves'")[0]
    assert section.count('class="thumb"') == 2 + 2 * 2  # the group's two, two per pair
    assert "mixed labels" in section
    assert "1 groups in train" not in html  # the terminal line is printed, not in the page
    md = (out / "report.md").read_text()
    assert "im00.png, copy.png (mixed labels)" in md and "test t0.jpg" in md


def test_report_page_escapes_what_it_shows(tiny, tmp_path: Path) -> None:
    """The page comes from a Jinja2 template with autoescape: a title (or run, class, file name)
    holding markup is shown as text, never run by the browser."""
    from oof.report import write_report

    hostile = "<script>alert('x')</script> & co"
    paths = write_report(analyze(tiny, find_images=False), tmp_path / "r", title=hostile,
                         with_thumbnails=False)
    page = paths["html"].read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; co" in page
    assert page.count("<table>") >= 4 and page.count("<h2 id=") == 10
