"""The run directory: atomic writes, per-fold parts, assembly, NaN holes, loading, compatibility."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from oof import check_compatible, find_runs, load_run
from oof.atomic import write_atomic, write_json, write_text
from oof.errors import RunMismatchError
from oof.folds import Folds
from oof.rundir import FoldPart, RunDir, column_names, write_run
from tests.synthetic import synthetic_folds, synthetic_run

N_TEST = 20


# --------------------------------------------------------------------------- atomic writes


def _boom(path: Path) -> None:
    path.write_text("half of a fi")
    raise RuntimeError("disk full")


def test_failed_write_keeps_old_file_and_leaves_no_partial(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "meta.json"
    write_json(target, {"ok": 1})
    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, _boom)
    assert json.loads(target.read_text()) == {"ok": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["meta.json"]  # no temp file


def test_failed_first_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        write_atomic(tmp_path / "fold0.json", _boom)
    assert list(tmp_path.iterdir()) == []
    write_text(tmp_path / "fold0.json", "{}")
    assert (tmp_path / "fold0.json").read_text() == "{}"


def test_leftover_temp_file_does_not_mark_a_fold_done(tmp_path: Path) -> None:
    """A process killed inside ``atomic_path`` leaves ``.fold0.json.<random>.tmp``."""
    run = RunDir(tmp_path / "run")
    run.parts.mkdir(parents=True)
    (run.parts / ".fold0.json.abc123.tmp").write_text('{"fold": 0}')
    (run.parts / "fold1_oof.parquet").write_bytes(b"PAR1")  # data written, marker not yet
    assert not run.is_done(0) and not run.is_done(1)
    assert run.done_folds() == []


# --------------------------------------------------------------------------- assembly


def _classes(folds: Folds) -> list[str]:
    return sorted(set(folds.labels.astype(str)))


def _rows(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    p = rng.random((n, c)) + 0.05
    return p / p.sum(axis=1, keepdims=True)


def _write_parts(run: RunDir, folds: Folds, classes: list[str], which: list[int],
                 seed: int = 0) -> dict[int, FoldPart]:
    """Write real fold parts (held-out rows shuffled, as a backend might return them)."""
    rng = np.random.default_rng(seed)
    parts = {}
    for k in which:
        _, held = folds.split(k)
        held = rng.permutation(held)
        part = FoldPart(
            fold=k, val_ids=folds.ids[held], val_proba=_rows(rng, len(held), len(classes)),
            test_proba=_rows(rng, N_TEST, len(classes)),
            history=[{"epoch": e, "loss": 1.0 / (e + 1), "accuracy": 0.5} for e in range(2)],
            info={"accuracy": 0.5, "log_loss": 1.0, "seconds": 1.5},
        )
        run.write_fold(part, classes)
        parts[k] = part
    return parts


@pytest.fixture
def folds(tmp_path: Path) -> Folds:
    return synthetic_folds(tmp_path, n=90, k=3, n_classes=4, seed=1)


def test_assemble_oof_invariants(tmp_path: Path, folds: Folds) -> None:
    classes = _classes(folds)
    run = RunDir(tmp_path / "m1")
    parts = _write_parts(run, folds, classes, [0, 1, 2])
    assert run.done_folds() == [0, 1, 2]
    test_ids = np.array([f"t{i}" for i in range(N_TEST)], dtype=object)
    loaded = run.assemble("m1", classes, folds, test_ids, {"config": {"epochs": 2}})

    # every train id exactly once, in folds.csv order, with its stored fold and label
    assert list(loaded.ids) == list(folds.ids.astype(str))
    assert len(set(loaded.ids)) == len(loaded.ids)
    np.testing.assert_array_equal(loaded.folds, folds.fold)
    assert list(loaded.labels) == list(folds.labels)
    assert loaded.classes == classes
    np.testing.assert_allclose(loaded.oof.sum(axis=1), 1.0, atol=1e-9)
    assert not np.isnan(loaded.oof).any()
    # each row holds the prediction of the model that did NOT train on it
    pos = {i: n for n, i in enumerate(loaded.ids)}
    for k, part in parts.items():
        rows = [pos[i] for i in part.val_ids]
        assert (loaded.folds[rows] == k).all()
        np.testing.assert_allclose(loaded.oof[rows], part.val_proba)
    # test = mean of the fold models; per-fold arrays kept
    per_fold = np.stack([parts[k].test_proba for k in range(3)])
    np.testing.assert_allclose(loaded.test, per_fold.mean(axis=0))
    np.testing.assert_allclose(loaded.test_per_fold(), per_fold)
    assert list(loaded.test_ids) == list(test_ids)

    # columns named <run>__<class>; class order in the parquet metadata
    cols = column_names("m1", classes)
    assert cols == [f"m1__{c}" for c in classes]
    oof_df = pd.read_parquet(run.path / "oof.parquet")
    assert list(oof_df.columns) == ["id", "label", "fold", *cols]
    assert list(pd.read_parquet(run.path / "test.parquet").columns) == ["id", *cols]
    assert list(pd.read_parquet(run.path / "test_folds.parquet").columns) == ["id", "fold", *cols]
    schema_meta = json.loads(pq.read_schema(run.path / "oof.parquet").metadata[b"foldstack"])
    assert schema_meta == {"run": "m1", "classes": classes, "fingerprint": folds.fingerprint}

    meta = json.loads((run.path / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["fold_fingerprint"] == folds.fingerprint
    assert meta["config"] == {"epochs": 2} and meta["rows_without_prediction"] == 0
    assert sorted(meta["fold_info"]) == ["0", "1", "2"]
    history = pd.read_csv(run.path / "history.csv")
    assert list(history.columns[:2]) == ["fold", "epoch"] and len(history) == 6


def test_load_run_round_trip(tmp_path: Path, folds: Folds) -> None:
    written = synthetic_run(tmp_path, "net_a", folds, skill=0.7, seed=3, n_test=N_TEST)
    again = load_run(tmp_path / "net_a")
    assert again.name == "net_a" and again.classes == written.classes
    for attr in ("ids", "labels", "y", "folds", "test_ids"):
        np.testing.assert_array_equal(getattr(again, attr), getattr(written, attr))
    np.testing.assert_array_equal(again.oof, written.oof)
    np.testing.assert_array_equal(again.test, written.test)
    assert again.fingerprint == folds.fingerprint
    assert [again.classes[i] for i in again.y] == list(again.labels)
    assert again.columns == [f"net_a__{c}" for c in again.classes]
    assert set(again.scores()) == {"accuracy", "log_loss", "macro_f1", "top3"}
    assert find_runs(tmp_path) == [tmp_path / "net_a"]


def test_missing_fold_is_refused_not_assembled(tmp_path: Path, folds: Folds) -> None:
    """A fold whose data files exist but whose marker does not (killed inside write_fold)
    is not finished: assembly names it instead of reading its parts or filling zeros."""
    classes = _classes(folds)
    run = RunDir(tmp_path / "m1")
    _write_parts(run, folds, classes, [0, 1, 2])
    (run.parts / "fold1.json").unlink()
    with pytest.raises(RunMismatchError, match=r"folds \[1\] are not finished"):
        run.assemble("m1", classes, folds, np.array(["t"] * N_TEST, dtype=object), {})
    assert not (run.path / "oof.parquet").exists()


def test_incomplete_run_is_not_loadable(tmp_path: Path, folds: Folds) -> None:
    run = RunDir(tmp_path / "m1")
    _write_parts(run, folds, _classes(folds), [0, 2])
    run.write_meta({"status": "partial", "folds": 3})
    with pytest.raises(RunMismatchError, match=r"incomplete \(folds done: \[0, 2\] of 3\)"):
        load_run(run.path)
    assert find_runs(tmp_path) == [] and find_runs(tmp_path, complete_only=False) == [run.path]
    with pytest.raises(RunMismatchError, match="not a run folder"):
        load_run(tmp_path / "nothing")


def test_part_with_rows_of_another_fold_refused(tmp_path: Path, folds: Folds) -> None:
    classes = _classes(folds)
    run = RunDir(tmp_path / "m1")
    _write_parts(run, folds, classes, [0, 1, 2])
    _, held_of_1 = folds.split(1)
    run.write_fold(FoldPart(0, folds.ids[held_of_1], _rows(np.random.default_rng(0),
                            len(held_of_1), len(classes)), np.zeros((N_TEST, len(classes)))),
                   classes)
    with pytest.raises(RunMismatchError, match="fold 0 predicted rows outside fold 0"):
        run.assemble("m1", classes, folds, np.array(["t"] * N_TEST, dtype=object), {})


def test_rows_no_fold_predicted_stay_nan(tmp_path: Path, folds: Folds) -> None:
    classes = _classes(folds)
    rng = np.random.default_rng(0)
    oof = _rows(rng, len(folds.ids), len(classes))
    hole = folds.fold == 2
    oof[hole] = np.nan
    per_fold = np.stack([_rows(rng, N_TEST, len(classes)) for _ in range(3)])
    run = write_run(tmp_path / "holey", "holey", classes, folds, oof,
                    np.array([f"t{i}" for i in range(N_TEST)], dtype=object), per_fold, {})
    raw = pd.read_parquet(tmp_path / "holey" / "oof.parquet")[run.columns].to_numpy()
    assert np.isnan(raw[hole]).all() and not np.isnan(raw[~hole]).any()
    assert not (raw[hole] == 0).any()
    assert np.isnan(run.oof[hole]).all()
    meta = json.loads((tmp_path / "holey" / "meta.json").read_text())
    assert meta["rows_without_prediction"] == int(hole.sum())
    assert 0 <= meta["oof_metrics"]["accuracy"] <= 1  # scored on the predicted rows only
    with pytest.raises(RunMismatchError, match=f"{int(hole.sum())} OOF rows have no prediction"):
        check_compatible([run])


def test_no_fold_models_gives_nan_test_not_zero(tmp_path: Path, folds: Folds) -> None:
    classes = _classes(folds)
    oof = np.full((len(folds.ids), len(classes)), np.nan)
    run = write_run(tmp_path / "empty", "empty", classes, folds, oof,
                    np.array(["t0", "t1"], dtype=object), np.zeros((0, 2, len(classes))), {})
    assert np.isnan(run.test).all()


# --------------------------------------------------------------------------- compatibility


def test_compatible_runs_pass(tmp_path: Path, folds: Folds) -> None:
    a = synthetic_run(tmp_path, "a", folds, 0.8, 1)
    b = synthetic_run(tmp_path, "b", folds, 0.5, 2)
    check_compatible([a, b])


def test_other_folds_refused(tmp_path: Path, folds: Folds) -> None:
    a = synthetic_run(tmp_path, "a", folds, 0.8, 1)
    other = synthetic_folds(tmp_path / "other_root", n=90, k=3, n_classes=4, seed=2)
    b = synthetic_run(tmp_path / "other_root", "b", other, 0.8, 1)
    with pytest.raises(RunMismatchError) as err:
        check_compatible([a, b])
    message = str(err.value)
    assert f"b ({b.path}): fold fingerprint {other.fingerprint} != {folds.fingerprint}" in message
    assert "trained on other folds" in message


def test_other_class_order_ids_and_names_refused(tmp_path: Path, folds: Folds) -> None:
    a = synthetic_run(tmp_path, "a", folds, 0.8, 1)
    b = synthetic_run(tmp_path / "x", "a", folds, 0.8, 2)
    with pytest.raises(RunMismatchError, match=r"run names used twice: \['a'\]"):
        check_compatible([a, b])
    c = synthetic_run(tmp_path, "c", folds, 0.8, 3)
    c.classes = c.classes[::-1]
    with pytest.raises(RunMismatchError, match="c .*: class order"):
        check_compatible([a, c])
    d = synthetic_run(tmp_path, "d", folds, 0.8, 4)
    d.test_ids = d.test_ids[::-1].copy()
    with pytest.raises(RunMismatchError, match="d .*: test ids differ from a"):
        check_compatible([a, d])
    e = synthetic_run(tmp_path, "e", folds, 0.8, 5)
    e.ids = e.ids[::-1].copy()
    with pytest.raises(RunMismatchError, match="e .*: training ids differ from a"):
        check_compatible([a, e])
    with pytest.raises(RunMismatchError, match="no runs"):
        check_compatible([])


def test_rows_not_summing_to_one_refused(tmp_path: Path, folds: Folds) -> None:
    a = synthetic_run(tmp_path, "a", folds, 0.8, 1)
    classes = _classes(folds)
    bad = np.full((len(folds.ids), len(classes)), 0.5)
    per_fold = np.full((3, len(a.test_ids), len(classes)), 1.0 / len(classes))
    b = write_run(tmp_path / "b", "b", classes, folds, bad, a.test_ids, per_fold, {})
    with pytest.raises(RunMismatchError, match=f"b .*: {len(folds.ids)} OOF rows do not sum to 1"):
        check_compatible([a, b])
