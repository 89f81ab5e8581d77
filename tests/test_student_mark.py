"""A distilled student is marked in every table (issue 30 item 4): its OOF score is optimistic
(its training targets came from models that saw its held-out rows), so the level-2 table, the
held-out table, the stack report, the OOF analysis report and a bundle's manifest say so, and
stacking it beside its teacher's runs is refused unless --allow-teacher-mix. Synthetic run
folders (tests.synthetic), level 2 only: no training."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from ensemble.stack import stack_runs
from oof.distill import STUDENT_FOOTNOTE, STUDENT_MARK, student_entry
from oof.errors import RunMismatchError
from tests.synthetic import synthetic_run
from tests.test_stack import N_TEST, Project


@pytest.fixture
def project(tmp_path) -> Project:
    return Project(tmp_path)


def _student(project: Project, stacked: list[str]) -> None:
    """A run 'pupil' whose meta.json says it learnt from a stack 'stack-t' of ``stacked``."""
    teacher = {"path": str(project.root / "stack-t"), "run": "stack-t", "level": 2,
               "method": "logreg", "fold_fingerprint": project.folds.fingerprint,
               "oof_metrics": {}, "alpha": 0.5, "temperature": 2.0, "stacked_runs": stacked,
               "note": "distilled student: its OOF score is optimistic"}
    project.runs.append(synthetic_run(project.root, "pupil", project.folds, 0.8, 4, N_TEST,
                                      meta_extra={"student": True, "teacher": teacher}))
    truth = project.runs[0].meta["y_test_truth"]
    classes = project.runs[0].classes
    pd.DataFrame({"Id": [f"test_{i:04d}.png" for i in range(N_TEST)],
                  "Category": [classes[t] for t in truth]}).to_csv(
        project.data / "test_labels.csv", index=False)


def test_a_student_is_marked_in_the_level2_and_held_out_tables_and_report(
        project: Project) -> None:
    _student(project, ["weak"])
    res = stack_runs(project.cfg(runs=["good", "noise", "pupil"], method="mean",
                                 compare=False))
    marked = "pupil" + STUDENT_MARK
    table = {r["model"]: r for r in res.rows}
    held = {r["model"]: r for r in res.held_out}
    assert marked in table and "pupil" not in table
    assert marked in held and "pupil" not in held
    assert {"good", "noise"} <= set(table) & set(held)  # the other runs are not marked
    assert not any(STUDENT_MARK in m for m in [*table, *held] if not m.startswith("pupil"))
    # the row still holds the student's own numbers
    pupil = next(r for r in project.runs if r.name == "pupil")
    assert table[marked]["log_loss"] == pytest.approx(pupil.scores()["log_loss"])
    assert held[marked]["held_out_accuracy"] == pytest.approx(
        (pupil.test.argmax(1) == np.array(project.runs[0].meta["y_test_truth"])).mean())
    md = (res.out_dir / "report.md").read_text()
    assert f"| {marked}" in md and md.count(STUDENT_FOOTNOTE) == 2  # level-2 + held-out
    assert STUDENT_FOOTNOTE in res.summary()
    report = json.loads((res.out_dir / "report.json").read_text())
    assert report["students"] == ["pupil"]
    assert [r.get("student", False) for r in report["runs"]] == [False, False, True]

    plain = stack_runs(project.cfg(runs=["good", "noise"], method="mean", compare=False,
                                   name="plain"))
    assert STUDENT_FOOTNOTE not in (plain.out_dir / "report.md").read_text()
    assert STUDENT_FOOTNOTE not in plain.summary()
    assert not any(STUDENT_MARK in r["model"] for r in [*plain.rows, *plain.held_out])


def test_a_student_beside_its_teachers_runs_is_refused_unless_allowed(
        project: Project, caplog: pytest.LogCaptureFixture) -> None:
    _student(project, ["good", "weak"])
    before = set(project.out.rglob("*"))
    with pytest.raises(RunMismatchError, match=r"(?s)pupil.*\['good'\].*--allow-teacher-mix"):
        stack_runs(project.cfg(runs=["good", "noise", "pupil"], method="mean", compare=False))
    assert set(project.out.rglob("*")) == before  # nothing written
    # any run the teacher stacked clashes
    with pytest.raises(RunMismatchError, match=r"(?s)pupil.*\['weak'\]"):
        stack_runs(project.cfg(runs=["weak", "pupil"], method="mean", compare=False))
    with caplog.at_level(logging.WARNING, logger="ensemble.stack"):
        res = stack_runs(project.cfg(runs=["good", "noise", "pupil"], method="mean",
                                     compare=False, allow_teacher_mix=True))
    assert "--allow-teacher-mix" in caplog.text and "optimistic" in caplog.text
    assert "pupil" + STUDENT_MARK in {r["model"] for r in res.rows}
    # runs the teacher did not stack mix freely
    stack_runs(project.cfg(runs=["noise", "pupil"], method="mean", compare=False, name="free"))


def test_the_oof_analysis_report_marks_a_student(project: Project, tmp_path) -> None:
    from oof.analysis import analyze, load_runs
    from oof.report import write_report

    _student(project, ["weak"])
    a = analyze(load_runs(project.root, ["good", "pupil"]), find_images=False)
    runs = list(a.summary()["run"])
    assert runs == ["good", "pupil" + STUDENT_MARK] and a.students == ["pupil"]
    paths = write_report(a, tmp_path / "report", with_thumbnails=False)
    for kind in ("md", "html"):
        text = paths[kind].read_text()
        assert "pupil" + STUDENT_MARK in text
        assert STUDENT_FOOTNOTE.split(":")[1].strip()[:40] in text
    plain = analyze(load_runs(project.root, ["good", "noise"]), find_images=False)
    assert plain.students == [] and STUDENT_FOOTNOTE not in write_report(
        plain, tmp_path / "plain", with_thumbnails=False)["md"].read_text()


def test_bundle_entries_of_a_student_say_so() -> None:
    assert student_entry({"level": 1}) == {}
    entry = student_entry({"student": True, "teacher": {"run": "stack-t", "note": "n"}})
    assert entry == {"student": True, "teacher": "stack-t", "student_note": "n"}
