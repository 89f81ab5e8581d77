"""Stored folds: stratification, the fingerprint, written once, reused, and guarded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oof.errors import ConfigError, DataError
from oof.folds import (
    FOLDS_FILE,
    FOLDS_META,
    ensure_folds,
    fold_fingerprint,
    load_folds,
    make_folds,
)


def _dataset(n: int = 60, n_classes: int = 3) -> tuple[list[str], list[str]]:
    ids = [f"img_{i:03d}.png" for i in range(n)]
    labels = [f"c{i % n_classes}" for i in range(n)]
    return ids, labels


@st.composite
def label_vectors(draw: st.DrawFn) -> tuple[list[str], int, int]:
    """Random class sizes (each >= K), shuffled into a label vector, plus K and seed."""
    k = draw(st.integers(2, 6))
    sizes = draw(st.lists(st.integers(k, 25), min_size=2, max_size=6))
    labels = [f"class{c}" for c, n in enumerate(sizes) for _ in range(n)]
    order = draw(st.permutations(range(len(labels))))
    return [labels[i] for i in order], k, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None)
@given(label_vectors())
def test_fold_invariants(case: tuple[list[str], int, int]) -> None:
    labels, k, seed = case
    ids = [f"id{i}" for i in range(len(labels))]
    folds = make_folds(ids, labels, k, seed)
    assert list(folds.ids) == ids and list(folds.labels) == labels  # input order kept
    assert set(folds.fold.tolist()) == set(range(k))  # every fold used, no -1 left
    held = np.concatenate([folds.split(f)[1] for f in range(k)])
    assert sorted(held.tolist()) == list(range(len(ids)))  # every id held out exactly once
    for f in range(k):
        train, val = folds.split(f)
        assert not set(train) & set(val) and len(train) + len(val) == len(ids)
    labels_arr = np.asarray(labels)
    for c in set(labels):  # stratified: per class, fold sizes differ by at most one
        counts = np.bincount(folds.fold[labels_arr == c], minlength=k)
        assert counts.max() - counts.min() <= 1


def test_same_inputs_same_folds_and_fingerprint() -> None:
    ids, labels = _dataset()
    a, b = make_folds(ids, labels, 5, 7), make_folds(ids, labels, 5, 7)
    np.testing.assert_array_equal(a.fold, b.fold)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16


def test_fingerprint_changes_with_k_seed_and_assignment() -> None:
    ids, labels = _dataset()
    base = make_folds(ids, labels, 5, 7)
    assert make_folds(ids, labels, 4, 7).fingerprint != base.fingerprint
    assert make_folds(ids, labels, 5, 8).fingerprint != base.fingerprint
    moved = base.fold.copy()
    moved[0] = (moved[0] + 1) % 5
    assert fold_fingerprint(base.ids, moved, 5, 7) != base.fingerprint
    # same (id, fold) pairs with same K and seed: same hash, whatever the row order
    perm = np.random.default_rng(0).permutation(len(ids))
    assert fold_fingerprint(base.ids[perm], base.fold[perm], 5, 7) == base.fingerprint


def test_folds_written_once_and_reused(tmp_path: Path) -> None:
    ids, labels = _dataset()
    first = ensure_folds(tmp_path, ids, labels, 3, 11)
    stored = pd.read_csv(tmp_path / FOLDS_FILE, dtype=str)
    assert list(stored.columns) == ["id", "label", "fold"]
    assert list(stored["id"]) == ids
    meta = json.loads((tmp_path / FOLDS_META).read_text())
    assert meta == {"k": 3, "seed": 11, "fingerprint": first.fingerprint, "rows": 60,
                    "group": "none"}
    mtime = (tmp_path / FOLDS_FILE).stat().st_mtime_ns

    for k, seed in ((3, 11), (None, None), (3, None), (None, 11)):  # same or unspecified: reuse
        again = ensure_folds(tmp_path, ids, labels, k, seed)
        assert again.fingerprint == first.fingerprint and (again.k, again.seed) == (3, 11)
        np.testing.assert_array_equal(again.fold, first.fold)
    assert (tmp_path / FOLDS_FILE).stat().st_mtime_ns == mtime  # never rewritten
    # the dataset's row order does not matter, only its ids and labels
    rev = ensure_folds(tmp_path, ids[::-1], labels[::-1], None, None)
    assert rev.fingerprint == first.fingerprint


def test_defaults_when_unspecified(tmp_path: Path) -> None:
    ids, labels = _dataset()
    folds = ensure_folds(tmp_path, ids, labels, None, None)
    assert (folds.k, folds.seed) == (5, 42)


@pytest.mark.parametrize(("k", "seed", "flag"), [(5, None, "--folds 5"), (None, 12, "--seed 12"),
                                                 (4, 13, "--folds 4")])
def test_other_k_or_seed_refused(tmp_path: Path, k: int | None, seed: int | None,
                                 flag: str) -> None:
    ids, labels = _dataset()
    ensure_folds(tmp_path, ids, labels, 3, 11)
    with pytest.raises(ConfigError) as err:
        ensure_folds(tmp_path, ids, labels, k, seed)
    message = str(err.value)
    assert str(tmp_path / FOLDS_FILE) in message and "K=3, seed=11" in message
    assert flag in message
    assert "--out OTHER_DIR" in message  # how to start a new run root


def test_edited_folds_csv_detected(tmp_path: Path) -> None:
    ids, labels = _dataset()
    ensure_folds(tmp_path, ids, labels, 3, 11)
    df = pd.read_csv(tmp_path / FOLDS_FILE)
    df.loc[0, "fold"] = (df.loc[0, "fold"] + 1) % 3
    df.to_csv(tmp_path / FOLDS_FILE, index=False)
    with pytest.raises(DataError, match="edited by hand"):
        load_folds(tmp_path)
    with pytest.raises(DataError, match="edited by hand"):
        ensure_folds(tmp_path, ids, labels, None, None)


def test_edited_labels_or_ids_detected(tmp_path: Path) -> None:
    ids, labels = _dataset()
    ensure_folds(tmp_path, ids, labels, 3, 11)
    relabelled = list(labels)
    relabelled[4] = "c0" if labels[4] != "c0" else "c1"
    with pytest.raises(DataError, match=r"labels changed .* 1 id\(s\), e.g. \['img_004.png'\]"):
        ensure_folds(tmp_path, ids, relabelled, None, None)
    with pytest.raises(DataError, match="ids differ"):
        ensure_folds(tmp_path, ids[:-1], labels[:-1], None, None)


def test_folds_meta_missing_refused_once_a_run_used_the_folds(tmp_path: Path) -> None:
    ids, labels = _dataset()
    ensure_folds(tmp_path, ids, labels, 3, 11)
    (tmp_path / FOLDS_META).unlink()
    (tmp_path / "some-run").mkdir()
    (tmp_path / "some-run" / "meta.json").write_text("{}")
    with pytest.raises(DataError, match=rf"{FOLDS_META}.* missing.*'some-run'"):
        load_folds(tmp_path)


def test_kill_between_the_two_folds_files_is_recovered(tmp_path: Path) -> None:
    """Killed after one of folds.json / folds.csv: the next call makes the same folds again."""
    ids, labels = _dataset()
    folds = ensure_folds(tmp_path, ids, labels, 3, 11)
    csv_text = (tmp_path / FOLDS_FILE).read_text()
    for lost in (FOLDS_FILE, FOLDS_META):  # folds.json is written first, but old half states too
        (tmp_path / lost).unlink()
        again = ensure_folds(tmp_path, ids, labels, 3, 11)
        assert again.fingerprint == folds.fingerprint
        assert (tmp_path / FOLDS_FILE).read_text() == csv_text
        assert load_folds(tmp_path).fingerprint == folds.fingerprint


def test_folds_json_is_written_before_folds_csv(tmp_path: Path, monkeypatch) -> None:
    """folds.csv is the commit marker: a kill after the first write leaves no folds.csv."""
    import oof.folds

    written: list[str] = []
    real = oof.folds.write_atomic

    def spy(path, writer):  # noqa: ANN001, ANN202 - records the order of the atomic writes
        written.append(Path(path).name)
        return real(path, writer)

    monkeypatch.setattr(oof.folds, "write_atomic", spy)
    monkeypatch.setattr("oof.atomic.write_atomic", spy)
    ensure_folds(tmp_path, *_dataset(), 3, 11)
    assert written == [FOLDS_META, FOLDS_FILE]


@pytest.mark.parametrize("text", ["", '{"k": 3, "seed"', "[1, 2]"])
def test_damaged_folds_json_is_named(tmp_path: Path, text: str) -> None:
    ids, labels = _dataset()
    ensure_folds(tmp_path, ids, labels, 3, 11)
    (tmp_path / FOLDS_META).write_text(text)
    with pytest.raises(DataError, match=f"{FOLDS_META}: not a readable folds record"):
        load_folds(tmp_path)


def test_too_few_folds_refused() -> None:
    ids, labels = _dataset()
    with pytest.raises(ConfigError, match="at least 2 folds"):
        make_folds(ids, labels, 1, 0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=3, max_size=40))
def test_small_classes_refused_or_split(labels: list[str]) -> None:
    ids = [str(i) for i in range(len(labels))]
    counts = pd.Series(labels).value_counts()
    if len(counts) == 1:  # nothing to classify
        with pytest.raises(DataError, match=f"only one class, {labels[0]!r}"):
            make_folds(ids, labels, 3, 0)
    elif counts.min() < 3:
        with pytest.raises(DataError, match="every class needs at least 3 images"):
            make_folds(ids, labels, 3, 0)
    else:
        assert set(make_folds(ids, labels, 3, 0).fold) == {0, 1, 2}


@pytest.mark.parametrize("edit", ["fold_not_a_number", "column_dropped"])
def test_unparseable_folds_csv_is_a_clear_error(tmp_path: Path, edit: str) -> None:
    ids, labels = _dataset()
    ensure_folds(tmp_path, ids, labels, 3, 11)
    df = pd.read_csv(tmp_path / FOLDS_FILE, dtype=str)
    if edit == "fold_not_a_number":
        df.loc[3, "fold"] = "two"
    else:
        df = df.drop(columns="fold")
    df.to_csv(tmp_path / FOLDS_FILE, index=False)
    with pytest.raises(DataError, match=f"{FOLDS_FILE}: not a folds file .*edited by hand"):
        load_folds(tmp_path)
