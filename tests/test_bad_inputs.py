"""The bad-input corpus: images, CSVs, layouts, folds files and data folders that must be refused.

Every case asserts two things: a ``FoldstackError`` whose message names the culprit (file, row,
column or argument), and that nothing on disk was written or changed (the data folder and the
run root are snapshotted, byte for byte, before and after). Cases run in-process on real files;
the one end-to-end case through ``run_folds.py`` (decode before ``meta.json``) is marked slow.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from oof.datasets import load_dataset
from oof.errors import ConfigError, DataError, FoldstackError
from oof.folds import FOLDS_FILE, FOLDS_META, ensure_folds
from runner.run import decode_first
from tests.imaging import make_imagefolder, write_image

REPO = Path(__file__).resolve().parents[1]
Snapshot = dict[str, tuple[int, str]]


def snapshot(*roots: Path) -> Snapshot:
    """Every entry under ``roots``: its file type and, for regular files, a hash of its bytes.

    ``lstat`` only: a FIFO is never opened (it would block) and a link is recorded, not followed.
    """
    out: Snapshot = {}
    for root in roots:
        if not root.exists() and not root.is_symlink():
            continue
        for p in [root, *root.rglob("*")]:
            st = os.lstat(p)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else (
                os.readlink(p) if stat.S_ISLNK(st.st_mode) else "")
            out[os.fsencode(p).hex()] = (stat.S_IFMT(st.st_mode), digest)
    return out


def refused(tmp_path: Path, action: Callable[[], object], *culprits: str,
            error: type[FoldstackError] = DataError) -> str:
    """Run ``action``; it must raise ``error`` naming every culprit and leave tmp_path as it was."""
    before = snapshot(tmp_path)
    with pytest.raises(error) as err:
        action()
    message = str(err.value)
    for culprit in culprits:
        assert culprit in message, message
    assert snapshot(tmp_path) == before, "the refused input changed or wrote files"
    return message


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A valid ImageFolder dataset (3 classes of 4, 3 test images) to break in one place."""
    return make_imagefolder(tmp_path / "data", {"cat": 4, "dog": 4, "owl": 4}, test=3, size=16)


@pytest.fixture
def comp(demo_subset: Path, copy_dataset: Callable[..., Path]) -> Path:
    """A private copy of the competition-layout demo subset."""
    return copy_dataset(demo_subset)


def _decode(data: Path, out: Path) -> Callable[[], None]:
    """What run_folds does first: load the dataset, then decode every image into the cache."""
    def go() -> None:
        ds = load_dataset(data)
        decode_first(ds, 16, out / ds.name)
    return go


# --------------------------------------------------------------------------- images
BAD_IMAGES: dict[str, Callable[[Path], None]] = {
    "junk_bytes": lambda p: p.write_bytes(os.urandom(300)),
    "zero_bytes": lambda p: p.write_bytes(b""),
    "text_file": lambda p: p.write_text("this is not an image, just notes\n"),
    "html_page": lambda p: p.write_text("<html><body>404 Not Found</body></html>"),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "header_only": lambda p: p.write_bytes(p.read_bytes()[:40]),
}


@pytest.mark.parametrize("damage", sorted(BAD_IMAGES))
@pytest.mark.parametrize("where", ["train", "test"])
def test_bad_image_refused_before_anything_is_written(folder: Path, tmp_path: Path,
                                                      damage: str, where: str) -> None:
    victim = folder / ("train/dog/img2.jpg" if where == "train" else "test/t1.jpg")
    BAD_IMAGES[damage](victim)
    refused(tmp_path, _decode(folder, tmp_path / "runs"), str(victim), "could not be read")
    assert not (tmp_path / "runs").exists()


def test_bad_image_in_an_existing_run_root_leaves_it_unchanged(folder: Path,
                                                               tmp_path: Path) -> None:
    """A run root with a cache and folds: a new corrupt file adds nothing to it."""
    out = tmp_path / "runs"
    _decode(folder, out)()
    ds = load_dataset(folder)
    ensure_folds(out / "data", list(ds.train["id"]), list(ds.train["label"]), 2, 0)
    write_image(folder / "train" / "owl" / "img9.png", 16, 16)
    (folder / "train" / "owl" / "img9.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    refused(tmp_path, _decode(folder, out), "img9.png")


# --------------------------------------------------------------------------- CSVs
def test_train_csv_with_unknown_columns_is_not_taken_for_imagefolder(folder: Path,
                                                                     tmp_path: Path) -> None:
    pd.DataFrame({"image": ["a.jpg"], "class": ["cat"]}).to_csv(folder / "train.csv", index=False)
    refused(tmp_path, lambda: load_dataset(folder), "train.csv", "'image'", "'class'",
            "Id,Category", "path,label", "--layout imagefolder")
    assert load_dataset(folder, layout="imagefolder").layout == "imagefolder"  # the way out


def test_competition_csv_without_train_folder(comp: Path, tmp_path: Path) -> None:
    shutil.rmtree(comp / "train")
    refused(tmp_path, lambda: load_dataset(comp), "train.csv", "Id,Category", "train")


def test_competition_duplicate_id(comp: Path, tmp_path: Path) -> None:
    df = pd.read_csv(comp / "train.csv", dtype=str)
    pd.concat([df, df.iloc[[5]]]).to_csv(comp / "train.csv", index=False)
    refused(tmp_path, lambda: load_dataset(comp), "duplicate Id", df["Id"][5], "row 7")


def test_competition_unknown_label(comp: Path, tmp_path: Path) -> None:
    df = pd.read_csv(comp / "train.csv", dtype=str)
    df.loc[3, "Category"] = "eleven"
    df.to_csv(comp / "train.csv", index=False)
    refused(tmp_path, lambda: load_dataset(comp), "row 5", "'eleven'")


def test_competition_listed_file_missing(comp: Path, tmp_path: Path) -> None:
    df = pd.read_csv(comp / "train.csv", dtype=str)
    (comp / "train" / df["Category"][8] / df["Id"][8]).unlink()
    refused(tmp_path, lambda: load_dataset(comp), "missing", "row 10", df["Id"][8])


def test_competition_header_only(comp: Path, tmp_path: Path) -> None:
    (comp / "train.csv").write_text("Id,Category\n")
    refused(tmp_path, lambda: load_dataset(comp), "train.csv: no rows")


def test_competition_train_csv_is_binary(comp: Path, tmp_path: Path) -> None:
    (comp / "train.csv").write_bytes(b"Id,Category\n\xff\xfe\x00\x81garbage\x00\n")
    refused(tmp_path, lambda: load_dataset(comp, layout="competition"), "train.csv")


def test_sample_submission_without_id_column(comp: Path, tmp_path: Path) -> None:
    df = pd.read_csv(comp / "sample-submission.csv", dtype=str)
    df.rename(columns={"Id": "image"}).to_csv(comp / "sample-submission.csv", index=False)
    refused(tmp_path, lambda: load_dataset(comp), "sample-submission.csv", "missing column",
            "'Id'")


def test_sample_submission_lists_missing_test_file(comp: Path, tmp_path: Path) -> None:
    df = pd.read_csv(comp / "sample-submission.csv", dtype=str)
    (comp / "test_upload" / df["Id"][2]).unlink()
    refused(tmp_path, lambda: load_dataset(comp), "sample-submission.csv", "row 4", df["Id"][2])


def _csv_layout(tmp_path: Path) -> Path:
    base = tmp_path / "data"
    rows = []
    for c, name in enumerate(("rose", "tulip")):
        for i in range(4):
            write_image(base / "img" / f"{name}{i}.png", 16, 16, seed=10 * c + i)
            rows.append({"path": f"img/{name}{i}.png", "label": name})
    pd.DataFrame(rows).to_csv(base / "labels.csv", index=False)
    write_image(base / "test" / "q0.png", 16, 16, seed=99)
    return base / "labels.csv"


def test_csv_layout_listed_file_missing(tmp_path: Path) -> None:
    table = _csv_layout(tmp_path)
    (table.parent / "img" / "tulip2.png").unlink()
    refused(tmp_path, lambda: load_dataset(table), "labels.csv", "row 8", "tulip2.png")


def test_csv_layout_without_test_set(tmp_path: Path) -> None:
    table = _csv_layout(tmp_path)
    shutil.rmtree(table.parent / "test")
    refused(tmp_path, lambda: load_dataset(table), "labels.csv", "no test set", "--test")


def test_csv_layout_test_table_without_path_column(tmp_path: Path) -> None:
    table = _csv_layout(tmp_path)
    shutil.rmtree(table.parent / "test")
    pd.DataFrame({"file": ["img/rose0.png"]}).to_csv(table.parent / "test.csv", index=False)
    refused(tmp_path, lambda: load_dataset(table), "test.csv", "missing column", "'path'")


def test_csv_layout_duplicate_ids(tmp_path: Path) -> None:
    table = _csv_layout(tmp_path)
    df = pd.read_csv(table, dtype=str)
    df["id"] = ["same"] * 2 + [f"x{i}" for i in range(len(df) - 2)]
    df.to_csv(table, index=False)
    refused(tmp_path, lambda: load_dataset(table), "duplicate id", "'same'", "row 2", "row 3")


def test_csv_layout_lists_a_fifo(tmp_path: Path) -> None:
    table = _csv_layout(tmp_path)
    (table.parent / "img" / "rose1.png").unlink()
    os.mkfifo(table.parent / "img" / "rose1.png")
    refused(tmp_path, lambda: load_dataset(table), "row 3", "rose1.png", "FIFO")


# --------------------------------------------------------------------------- layouts
def test_fifo_in_a_class_folder(folder: Path, tmp_path: Path) -> None:
    os.mkfifo(folder / "train" / "cat" / "stream.jpg")
    refused(tmp_path, lambda: load_dataset(folder), "stream.jpg", "FIFO")


def test_fifo_without_image_suffix_is_not_skipped(folder: Path, tmp_path: Path) -> None:
    os.mkfifo(folder / "train" / "dog" / "pipe")
    refused(tmp_path, lambda: load_dataset(folder), "pipe", "FIFO")


def test_symlink_to_a_device(folder: Path, tmp_path: Path) -> None:
    (folder / "train" / "owl" / "zero.png").symlink_to("/dev/zero")
    refused(tmp_path, lambda: load_dataset(folder), "zero.png", "character device")


def test_broken_symlink(folder: Path, tmp_path: Path) -> None:
    (folder / "train" / "owl" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    refused(tmp_path, lambda: load_dataset(folder), "gone.png", "broken symlink")


def test_fifo_in_the_test_folder(folder: Path, tmp_path: Path) -> None:
    os.mkfifo(folder / "test" / "live.jpg")
    refused(tmp_path, lambda: load_dataset(folder), "live.jpg", "FIFO")


def test_file_name_not_utf8(folder: Path, tmp_path: Path) -> None:
    src = folder / "train" / "cat" / "img0.jpg"
    os.rename(os.fsencode(src), os.fsencode(src.parent) + b"/caf\xe9.jpg")  # Latin-1 'é'
    refused(tmp_path, lambda: load_dataset(folder), "caf\\xe9.jpg", "not valid UTF-8", "rename")


def test_class_folder_name_not_utf8(folder: Path, tmp_path: Path) -> None:
    os.rename(os.fsencode(folder / "train" / "owl"), os.fsencode(folder / "train") + b"/\xff\xfe")
    refused(tmp_path, lambda: load_dataset(folder), "\\xff\\xfe", "not valid UTF-8")


def test_empty_class_folder(folder: Path, tmp_path: Path) -> None:
    (folder / "train" / "bat").mkdir()
    refused(tmp_path, lambda: load_dataset(folder), "without images", "'bat'")


def test_train_folder_without_class_folders(tmp_path: Path) -> None:
    write_image(tmp_path / "data" / "train" / "loose.jpg", 16, 16)
    refused(tmp_path, lambda: load_dataset(tmp_path / "data"), "no class folders", "train")


def test_data_path_missing(tmp_path: Path) -> None:
    refused(tmp_path, lambda: load_dataset(tmp_path / "nope"), "--data", "nope")


def test_unknown_layout(folder: Path, tmp_path: Path) -> None:
    refused(tmp_path, lambda: load_dataset(folder, layout="tfrecord"), "--layout", "'tfrecord'")


def test_folder_with_nothing_recognisable(tmp_path: Path) -> None:
    write_image(tmp_path / "data" / "photo.jpg", 16, 16)
    refused(tmp_path, lambda: load_dataset(tmp_path / "data"), "layout not recognised")


# --------------------------------------------------------------------------- folds files
@pytest.fixture
def with_folds(folder: Path, tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    ds = load_dataset(folder)
    root = tmp_path / "runs" / "data"
    ids, labels = list(ds.train["id"]), list(ds.train["label"])
    ensure_folds(root, ids, labels, 2, 7)
    return root, ids, labels


@pytest.mark.parametrize("text", ["", "{", '"k"'])
def test_folds_json_damaged(with_folds: tuple[Path, list[str], list[str]], tmp_path: Path,
                            text: str) -> None:
    root, ids, labels = with_folds
    (root / FOLDS_META).write_text(text)
    refused(tmp_path, lambda: ensure_folds(root, ids, labels, None, None), FOLDS_META)


def test_folds_csv_rows_edited(with_folds: tuple[Path, list[str], list[str]],
                               tmp_path: Path) -> None:
    root, ids, labels = with_folds
    df = pd.read_csv(root / FOLDS_FILE, dtype=str)
    df.loc[0, "fold"] = "1" if df["fold"][0] == "0" else "0"
    df.to_csv(root / FOLDS_FILE, index=False)
    refused(tmp_path, lambda: ensure_folds(root, ids, labels, None, None), FOLDS_FILE,
            "fingerprint")


def test_folds_csv_fold_not_a_number(with_folds: tuple[Path, list[str], list[str]],
                                     tmp_path: Path) -> None:
    root, ids, labels = with_folds
    df = pd.read_csv(root / FOLDS_FILE, dtype=str)
    df.loc[1, "fold"] = "first"
    df.to_csv(root / FOLDS_FILE, index=False)
    refused(tmp_path, lambda: ensure_folds(root, ids, labels, None, None), FOLDS_FILE,
            "not a folds file")


def test_other_k_than_the_stored_folds(with_folds: tuple[Path, list[str], list[str]],
                                       tmp_path: Path) -> None:
    root, ids, labels = with_folds
    refused(tmp_path, lambda: ensure_folds(root, ids, labels, 3, None), "--folds 3",
            "stored: 2", error=ConfigError)


def test_dataset_changed_since_the_folds(with_folds: tuple[Path, list[str], list[str]],
                                         tmp_path: Path) -> None:
    root, ids, labels = with_folds
    refused(tmp_path, lambda: ensure_folds(root, ids[1:], labels[1:], None, None), FOLDS_FILE,
            "ids differ")


def test_folds_json_lost_after_a_run_used_the_folds(
        with_folds: tuple[Path, list[str], list[str]], tmp_path: Path) -> None:
    root, ids, labels = with_folds
    (root / FOLDS_META).unlink()
    (root / "timm-x").mkdir()
    (root / "timm-x" / "meta.json").write_text("{}")
    refused(tmp_path, lambda: ensure_folds(root, ids, labels, None, None), FOLDS_META,
            "'timm-x'")


# --------------------------------------------------------------------------- data folders
def test_class_smaller_than_k(folder: Path, tmp_path: Path) -> None:
    ds = load_dataset(folder)
    root = tmp_path / "runs" / "data"
    refused(tmp_path, lambda: ensure_folds(root, list(ds.train["id"]), list(ds.train["label"]),
                                           5, 0), "--folds 5", "'cat' has 4")


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_run_folds_refuses_bad_images_before_writing_meta(folder: Path, tmp_path: Path) -> None:
    """Through the script: every bad image named at once, exit 2, the run root never made."""
    for damage, victim in zip(("zero_bytes", "text_file", "truncated", "junk_bytes"),
                              ("train/cat/img1.jpg", "train/dog/img0.jpg", "train/owl/img3.jpg",
                               "test/t2.jpg")):
        BAD_IMAGES[damage](folder / victim)
    before = snapshot(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(REPO / "run_folds.py"), "--data", str(folder), "--out",
         str(tmp_path / "runs"), "--folds", "2", "--epochs", "1", "--img-size", "16",
         "--progress", "false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "3 image(s) could not be read" in proc.stderr  # train; the test set: 1
    for name in ("img1.jpg", "dog/img0.jpg", "img3.jpg", "t2.jpg"):
        assert name in proc.stderr, proc.stderr
    assert snapshot(tmp_path) == before and not (tmp_path / "runs").exists()
