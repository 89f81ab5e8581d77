"""The analysis tolerates missing, partial and damaged histories (issue 10): two processes on
one fold once left a history that made ``oof.analyze`` fail with a TypeError in oof/report.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from oof.analysis import analyze, load_history
from oof.report import write_report
from tests.test_analysis import RUN_A, RUN_B, _tiny_folds, _write

GOOD = "fold,epoch,loss,accuracy,val_loss,val_accuracy\n0,0,1.0,0.5,1.1,0.4\n0,1,0.8,0.6,0.9,0.5\n"
DAMAGED = {
    # a second writer repeated the header and its rows, and was cut mid-line
    "interleaved": GOOD + "fold,epoch,loss,accuracy,val_loss,val_accuracy\n0,0,1.0,0.5,1.1,0.4\n"
                   "0,1,0.8,0.6,0.9,0.5\n1,0,1.2,0.4,1.3,0.3\n1,1,0.9",
    "garbage cell": GOOD + "1,0,oops,0.4,1.3,0.3\n",
    "header only": "fold,epoch,loss,accuracy,val_loss,val_accuracy\n",
    "no epoch column": "fold,step,loss\n0,1,0.5\n",
    "binary junk": None,
    "ragged lines": GOOD + "1,0,1.2,0.4,1.3,0.3,9,9,9\n1,1\n",
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_history_never_breaks_the_report(tmp_path: Path, case: str) -> None:
    folds = _tiny_folds(tmp_path)
    runs = [_write(tmp_path, "A", folds, RUN_A), _write(tmp_path, "B", folds, RUN_B)]
    text = DAMAGED[case]
    path = runs[0].path / "history.csv"
    if text is None:
        path.write_bytes(b"\x00\xff\xfe" * 50)
    else:
        path.write_text(text)
    (runs[1].path / "history.csv").write_text(GOOD)  # B is fine; A is damaged
    hist = load_history(runs[0])
    if hist is not None:
        assert hist["epoch"].dtype.kind == "i" and hist["loss"].dtype.kind == "f"
        assert not hist.duplicated(subset=["fold", "epoch"]).any()
    if case == "interleaved":
        assert hist is not None and sorted(hist["fold"].unique()) == [0, 1]
    a = analyze(runs, find_images=False)
    paths = write_report(a, tmp_path / "analysis", with_thumbnails=False)
    assert paths["html"].exists() and len(a.runs) == 2


def test_missing_history_is_noted(tmp_path: Path) -> None:
    folds = _tiny_folds(tmp_path)
    runs = [_write(tmp_path, "A", folds, RUN_A), _write(tmp_path, "B", folds, RUN_B)]
    paths = write_report(analyze(runs, find_images=False), tmp_path / "rep", with_thumbnails=False)
    assert "No history.csv" in paths["html"].read_text()
