"""Bad-input corpus for run folders and OOF files (issue 10): each damaged or edited file is
refused by both readers (stack.py and the analysis) with a message naming the file, the row or
the run at fault, and nothing is written or changed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ensemble.stack import stack_runs
from oof.analysis import load_runs
from oof.errors import DataError, FoldstackError, RunMismatchError
from tests.test_stack import Project


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_parquet(path: Path, edit: Callable, keep_meta: bool = True) -> None:
    """Rewrite a parquet file through pandas, keeping its foldstack metadata (as an edit would)."""
    import pyarrow as pa

    table = pq.read_table(path)
    df = edit(table.to_pandas())
    out = pa.Table.from_pandas(df, preserve_index=False)
    if keep_meta:
        out = out.replace_schema_metadata(table.schema.metadata)
    pq.write_table(out, path)


def _edit_meta(path: Path, edit: Callable) -> None:
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(edit(meta)))


def _set(d: dict, key: str, value) -> dict:
    return {**d, key: value}


def _nan_row(df):
    df.iloc[4, 3] = np.nan
    return df


def _halve_row(df):
    df.iloc[2, 3:] = df.iloc[2, 3:] * 0.5
    return df


def _dup_id(df):
    df.loc[7, "id"] = df.loc[3, "id"]
    return df


def _bad_label(df):
    df["label"] = df["label"].astype(str)
    df.loc[5, "label"] = "class9"
    return df


def _bad_fold(df):
    df.loc[6, "fold"] = 7
    return df


def _moved_fold(df):
    df.loc[6, "fold"] = (df.loc[6, "fold"] + 1) % 3
    return df


def _renamed_id(df):
    df.loc[8, "id"] = "stranger.png"
    return df


def _dup_test(df):
    df.loc[1, "id"] = df.loc[0, "id"]
    return df


# name -> (damage the run folder 'weak', exception type, words the message must contain)
CASES: dict[str, tuple[Callable[[Path], None], type, list[str]]] = {
    "oof truncated": (lambda r: _truncate(r / "oof.parquet"), DataError,
                      ["oof.parquet", "not a readable parquet"]),
    "oof zero bytes": (lambda r: _truncate(r / "oof.parquet", 0), DataError,
                       ["oof.parquet", "not a readable parquet"]),
    "test truncated": (lambda r: _truncate(r / "test.parquet", 0.7), DataError,
                       ["test.parquet", "not a readable parquet"]),
    "oof missing": (lambda r: (r / "oof.parquet").unlink(), DataError,
                    ["oof.parquet", "missing"]),
    "meta truncated": (lambda r: _truncate(r / "meta.json", 0.6), DataError,
                       ["meta.json", "damaged JSON"]),
    "meta not an object": (lambda r: (r / "meta.json").write_text("[1, 2]"), DataError,
                           ["meta.json", "expected a JSON object"]),
    "meta class order edited": (
        lambda r: _edit_meta(r / "meta.json", lambda m: _set(m, "classes", m["classes"][::-1])),
        DataError, ["meta.json", "class order", "oof.parquet", "edited"]),
    "meta fingerprint edited": (
        lambda r: _edit_meta(r / "meta.json", lambda m: _set(m, "fold_fingerprint", "0" * 16)),
        DataError, ["meta.json", "fold fingerprint"]),
    "parquet without foldstack metadata": (
        lambda r: _edit_parquet(r / "oof.parquet", lambda d: d, keep_meta=False), DataError,
        ["oof.parquet", "not written by foldstack"]),
    "class column missing": (
        lambda r: _edit_parquet(r / "oof.parquet", lambda d: d.drop(columns=["weak__class2"])),
        DataError, ["oof.parquet", "weak__class2", "missing"]),
    "fold column missing": (
        lambda r: _edit_parquet(r / "oof.parquet", lambda d: d.drop(columns=["fold"])),
        DataError, ["oof.parquet", "'fold'", "missing"]),
    "duplicated id": (lambda r: _edit_parquet(r / "oof.parquet", _dup_id), DataError,
                      ["oof.parquet", "row 7", "appears twice", "row 3"]),
    "missing row": (lambda r: _edit_parquet(r / "oof.parquet", lambda d: d.drop(index=[11])),
                    DataError, ["oof.parquet", "1 training id(s) of folds.csv have no row"]),
    "foreign id": (lambda r: _edit_parquet(r / "oof.parquet", _renamed_id), DataError,
                   ["oof.parquet", "row 8", "stranger.png"]),
    "unknown label": (lambda r: _edit_parquet(r / "oof.parquet", _bad_label), DataError,
                      ["oof.parquet", "row 5", "class9"]),
    "fold out of range": (lambda r: _edit_parquet(r / "oof.parquet", _bad_fold), DataError,
                          ["oof.parquet", "row 6", "fold 7"]),
    "row moved to another fold": (lambda r: _edit_parquet(r / "oof.parquet", _moved_fold),
                                  DataError, ["oof.parquet", "row 6", "folds.csv says"]),
    "test of another run": (
        lambda r: (r / "test.parquet").write_bytes((r.parent / "good" / "test.parquet")
                                                   .read_bytes()),
        DataError, ["test.parquet", "run name", "different runs"]),
    "duplicated test id": (lambda r: _edit_parquet(r / "test.parquet", _dup_test), DataError,
                           ["test.parquet", "row 1", "appears twice"]),
    "NaN probability": (lambda r: _edit_parquet(r / "oof.parquet", _nan_row), RunMismatchError,
                        ["weak", "1 OOF rows have no prediction"]),
    "row not summing to 1": (lambda r: _edit_parquet(r / "oof.parquet", _halve_row),
                             RunMismatchError, ["weak", "1 OOF rows do not sum to 1"]),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Project:
    return Project(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("reader", ["stack", "analyze"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_run_folder_refused_naming_culprit(pristine: Project, tmp_path: Path, case: str,
                                               reader: str) -> None:
    import shutil

    shutil.copytree(pristine.data.parent, tmp_path, dirs_exist_ok=True)
    p = Project.__new__(Project)
    p.data, p.out, p.root = tmp_path / "synth", tmp_path / "runs", tmp_path / "runs" / "synth"
    damage, kind, words = CASES[case]
    damage(p.root / "weak")
    before = p.files()
    with pytest.raises(FoldstackError) as err:
        if reader == "stack":
            stack_runs(p.cfg(runs=["good", "weak"]))
        else:
            load_runs(p.root, ["good", "weak"])
    msg = str(err.value)
    assert isinstance(err.value, kind), (type(err.value), msg)
    assert all(w in msg for w in words), msg
    assert "weak" in msg, msg
    assert p.files() == before  # nothing written or changed


def test_pristine_copy_stacks(pristine: Project, tmp_path: Path) -> None:
    """The corpus starts from a project that stacks: each refusal is the damage's doing."""
    import shutil

    shutil.copytree(pristine.data.parent, tmp_path, dirs_exist_ok=True)
    p = Project.__new__(Project)
    p.data, p.out, p.root = tmp_path / "synth", tmp_path / "runs", tmp_path / "runs" / "synth"
    assert [r.name for r in load_runs(p.root, ["good", "weak"])] == ["good", "weak"]
    assert stack_runs(p.cfg(runs=["good", "weak"], compare=False, method="mean")).submission
