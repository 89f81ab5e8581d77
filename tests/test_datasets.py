"""Datasets on disk: the three layouts, auto-detection, validation errors and image decoding."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from oof.datasets import detect_layout, load_dataset, natural_key
from oof.errors import DataError
from oof.folds import make_folds
from oof.images import cached_images, decode_images, read_rgb
from tests.imaging import make_imagefolder, write_image

CopyFn = Callable[..., Path]


# --------------------------------------------------------------------------- natural sort


def test_natural_key_orders_numbers_by_value() -> None:
    names = ["class10", "class2", "class1", "Class3", "class20"]
    assert sorted(names, key=natural_key) == ["class1", "class2", "Class3", "class10", "class20"]


@given(st.text(max_size=6), st.integers(0, 10**6), st.integers(0, 10**6), st.text(max_size=4))
def test_natural_key_numeric_runs_compare_as_numbers(prefix: str, a: int, b: int,
                                                     suffix: str) -> None:
    # a prefix ending in a digit would glue onto the number, so cut the number off with "_"
    left, right = f"{prefix}_{a}{suffix}", f"{prefix}_{b}{suffix}"
    if a != b:
        assert (natural_key(left) < natural_key(right)) == (a < b)


@given(st.lists(st.text(max_size=8), unique=True, max_size=12), st.randoms())
def test_natural_key_is_a_total_order(names: list[str], rnd: random.Random) -> None:
    """Any text sorts without error, and the order never depends on the listing order
    (folders 'Cat' and 'cat', or 'a01' and 'a1', must not swap between two machines)."""
    shuffled = list(names)
    rnd.shuffle(shuffled)
    assert sorted(names, key=natural_key) == sorted(shuffled, key=natural_key)


# --------------------------------------------------------------------------- layouts


def test_competition_layout(demo_subset: Path) -> None:
    ds = load_dataset(demo_subset)
    assert ds.layout == "competition"
    assert ds.classes == [str(i) for i in range(10)]
    assert len(ds.train) == 300 and len(ds.test) == 40
    assert list(ds.train.columns) == ["id", "path", "label"]
    assert ds.train["id"].is_unique
    assert all(Path(p).is_file() for p in ds.train["path"])
    assert all(Path(p).is_file() for p in ds.test["path"])
    sample = pd.read_csv(demo_subset / "sample-submission.csv", dtype=str)
    assert list(ds.test["id"]) == list(sample["Id"])  # submission order is kept
    assert ds.sample_submission == demo_subset / "sample-submission.csv"
    assert ds.train["label"].value_counts().to_dict() == {str(i): 30 for i in range(10)}


def test_imagefolder_string_classes_and_jpeg(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "cars", {"truck": 4, "sedan": 5, "suv": 3}, test=4)
    ds = load_dataset(root)
    assert ds.layout == "imagefolder"
    assert ds.classes == ["sedan", "suv", "truck"]
    assert len(ds.train) == 12 and len(ds.test) == 4
    assert set(ds.train["label"]) == {"sedan", "suv", "truck"}
    assert "sedan/img0.jpg" in set(ds.train["id"])
    assert list(ds.test["id"]) == ["t0.jpg", "t1.jpg", "t2.jpg", "t3.jpg"]
    assert ds.labels_as_int().count(0) == 5  # sedan is class 0
    images = decode_images(list(ds.train["path"]), 8)
    assert images.shape == (12, 8, 8, 3) and images.dtype == np.uint8


def test_netpbm_files_are_images(tmp_path: Path) -> None:
    # Pillow writes P4/P5/P6 Netpbm files for modes 1, L and RGB, under any of the four names
    root = tmp_path / "scans"
    for n, (suffix, mode) in enumerate([(".pbm", "1"), (".pgm", "L"), (".ppm", "RGB"),
                                        (".pnm", "RGB")]):
        for label in ("a", "b"):
            (root / "train" / label).mkdir(parents=True, exist_ok=True)
            _image(mode).save(root / "train" / label / f"img{n}{suffix}", format="PPM")
    ds = load_dataset(root)
    assert len(ds.train) == 8 and {Path(i).suffix for i in ds.train["id"]} == {
        ".pbm", ".pgm", ".ppm", ".pnm"}
    assert decode_images(list(ds.train["path"]), 8).shape == (8, 8, 8, 3)


def test_imagefolder_natural_sort_of_classes_and_files(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", {"class10": 1, "class2": 1, "class1": 1},
                            suffix=".png")
    for i in (10, 2):
        write_image(root / "train" / "class1" / f"img{i}.png")
    ds = load_dataset(root)
    assert ds.classes == ["class1", "class2", "class10"]
    assert list(ds.train["id"][:3]) == ["class1/img0.png", "class1/img2.png", "class1/img10.png"]


def test_imagefolder_test_folder_is_optional(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", {"a": 2, "b": 2})
    ds = load_dataset(root, layout="imagefolder")
    assert len(ds.train) == 4 and len(ds.test) == 0


def _csv_dataset(root: Path, labels: dict[str, int]) -> Path:
    """``root/images/<label>_<i>.png`` and ``root/labels.csv`` (path,label), relative paths."""
    rows = []
    for c, (label, n) in enumerate(labels.items()):
        for i in range(n):
            rel = f"images/{label}_{i}.png"
            write_image(root / rel, seed=10 * c + i)
            rows.append((rel, label))
    table = root / "labels.csv"
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(table, index=False)
    return table


def test_csv_layout_with_test_folder(tmp_path: Path) -> None:
    table = _csv_dataset(tmp_path / "flowers", {"rose": 3, "tulip": 4})
    for i in range(3):
        write_image(tmp_path / "flowers" / "test" / f"q{i}.webp", seed=i)
    ds = load_dataset(table)
    assert ds.layout == "csv" and ds.name == "flowers"
    assert ds.classes == ["rose", "tulip"]
    assert list(ds.train["id"][:2]) == ["images/rose_0.png", "images/rose_1.png"]
    assert list(ds.test["id"]) == ["q0.webp", "q1.webp", "q2.webp"]
    assert all(Path(p).is_file() for p in [*ds.train["path"], *ds.test["path"]])


def test_csv_layout_with_test_table(tmp_path: Path) -> None:
    root = tmp_path / "flowers"
    table = _csv_dataset(root, {"rose": 3, "tulip": 3})
    table.rename(root / "train.csv")  # a folder whose train.csv is path,label is the csv layout
    for i in range(2):
        write_image(root / "unlabelled" / f"u{i}.bmp", seed=i)
    pd.DataFrame({"id": ["first", "second"], "path": ["unlabelled/u0.bmp", "unlabelled/u1.bmp"]}
                 ).to_csv(root / "test.csv", index=False)
    ds = load_dataset(root)
    assert ds.layout == "csv"
    assert list(ds.test["id"]) == ["first", "second"]
    assert ds.test["path"].map(lambda p: Path(p).is_file()).all()


def test_csv_layout_with_explicit_test_argument(tmp_path: Path) -> None:
    table = _csv_dataset(tmp_path / "d", {"x": 2, "y": 2})
    elsewhere = tmp_path / "elsewhere"
    write_image(elsewhere / "a.png")
    ds = load_dataset(table, test=str(elsewhere))
    assert list(ds.test["id"]) == ["a.png"]


def test_auto_detection(demo_subset: Path, tmp_path: Path) -> None:
    assert detect_layout(demo_subset) == "competition"
    assert detect_layout(make_imagefolder(tmp_path / "if", {"a": 1})) == "imagefolder"
    table = _csv_dataset(tmp_path / "csv", {"a": 1})
    assert detect_layout(table) == "csv"
    shutil.copy(table, tmp_path / "csv" / "train.csv")
    assert detect_layout(tmp_path / "csv") == "csv"
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="layout not recognised"):
        detect_layout(tmp_path / "nothing")
    with pytest.raises(DataError, match="no such folder"):
        load_dataset(tmp_path / "missing")
    with pytest.raises(DataError, match="--layout"):
        load_dataset(demo_subset, layout="parquet")


# --------------------------------------------------------------------------- validation


def _append_rows(csv_path: Path, rows: list[dict[str, str]]) -> None:
    df = pd.read_csv(csv_path, dtype=str)
    pd.concat([df, pd.DataFrame(rows)], ignore_index=True).to_csv(csv_path, index=False)


def test_file_listed_but_missing(demo_subset: Path, copy_dataset: CopyFn) -> None:
    data = copy_dataset(demo_subset)
    train = pd.read_csv(data / "train.csv", dtype=str)
    victim = train.iloc[7]
    (data / "train" / victim["Category"] / victim["Id"]).unlink()
    with pytest.raises(DataError, match="missing") as err:
        load_dataset(data)
    assert victim["Id"] in str(err.value) and "row 9" in str(err.value)
    assert "train.csv" in str(err.value)


def test_test_file_listed_but_missing(demo_subset: Path, copy_dataset: CopyFn) -> None:
    data = copy_dataset(demo_subset)
    first = pd.read_csv(data / "sample-submission.csv", dtype=str)["Id"][0]
    (data / "test_upload" / first).unlink()
    with pytest.raises(DataError, match="sample-submission.csv") as err:
        load_dataset(data)
    assert first in str(err.value)


def test_csv_file_listed_but_missing(tmp_path: Path) -> None:
    table = _csv_dataset(tmp_path / "d", {"a": 2, "b": 2})
    (tmp_path / "d" / "images" / "b_1.png").unlink()
    write_image(tmp_path / "d" / "test" / "t.png")
    with pytest.raises(DataError, match="row 5: .*b_1.png"):
        load_dataset(table)


def test_unreadable_and_truncated_images_listed_at_once(demo_subset: Path,
                                                        copy_dataset: CopyFn) -> None:
    data = copy_dataset(demo_subset)
    ds = load_dataset(data)
    paths = [Path(p) for p in ds.train["path"]]
    paths[3].write_text("this is not a PNG")
    png = paths[10].read_bytes()
    paths[10].write_bytes(png[: len(png) // 2])
    jpeg = write_image(data / "extra.jpg", 64, 64)
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    bad = [paths[3], paths[10], jpeg]
    with pytest.raises(DataError) as err:
        cached_images([*map(str, paths), str(jpeg)], 16, data / "cache")
    message = str(err.value)
    assert message.startswith("3 image(s) could not be read")
    for p in bad:
        assert str(p) in message
    assert str(paths[4]) not in message
    assert not list((data / "cache").glob("*.npy"))  # nothing cached from a failed decode


def test_decoded_cache_is_reused_and_keyed_by_size(demo_subset: Path, tmp_path: Path) -> None:
    paths = list(load_dataset(demo_subset).train["path"][:5])
    a = cached_images(paths, 8, tmp_path)
    b = cached_images(paths, 8, tmp_path)
    c = cached_images(paths, 12, tmp_path)
    assert a.shape == (5, 8, 8, 3) and c.shape == (5, 12, 12, 3)
    np.testing.assert_array_equal(a, b)
    assert len(list(tmp_path.glob("*.npy"))) == 2
    assert cached_images([], 8, tmp_path).shape == (0, 8, 8, 3)


def test_duplicate_ids(demo_subset: Path, copy_dataset: CopyFn) -> None:
    data = copy_dataset(demo_subset)
    first = pd.read_csv(data / "train.csv", dtype=str).iloc[0]
    _append_rows(data / "train.csv", [first.to_dict()])
    with pytest.raises(DataError, match="duplicate Id") as err:
        load_dataset(data)
    assert f"row 2: Id={first['Id']!r}" in str(err.value)
    assert f"row 302: Id={first['Id']!r}" in str(err.value)


def test_csv_duplicate_ids(tmp_path: Path) -> None:
    table = _csv_dataset(tmp_path / "d", {"a": 2, "b": 2})
    df = pd.read_csv(table)
    df["id"] = ["x", "y", "x", "z"]
    df.to_csv(table, index=False)
    with pytest.raises(DataError, match="duplicate id") as err:
        load_dataset(table)
    assert "row 2: id='x'" in str(err.value) and "row 4: id='x'" in str(err.value)


def test_label_not_in_class_set(demo_subset: Path, copy_dataset: CopyFn) -> None:
    data = copy_dataset(demo_subset)
    _append_rows(data / "train.csv", [{"Id": "digit_9999.png", "Category": "cat"}])
    with pytest.raises(DataError, match="labels not in the class set") as err:
        load_dataset(data)
    assert "row 302: label 'cat'" in str(err.value)


def test_class_with_fewer_images_than_folds(tmp_path: Path) -> None:
    ds = load_dataset(make_imagefolder(tmp_path / "d", {"sedan": 5, "suv": 2, "truck": 5}))
    with pytest.raises(DataError, match="at least 3 images; 'suv' has 2"):
        make_folds(list(ds.train["id"]), list(ds.train["label"]), 3, 0)
    assert make_folds(list(ds.train["id"]), list(ds.train["label"]), 2, 0).k == 2


def test_empty_test_set_competition(demo_subset: Path, copy_dataset: CopyFn) -> None:
    data = copy_dataset(demo_subset)
    (data / "sample-submission.csv").write_text("Id,Category\n")
    with pytest.raises(DataError, match="sample-submission.csv: no rows"):
        load_dataset(data)
    (data / "sample-submission.csv").unlink()
    shutil.rmtree(data / "test_upload")
    (data / "test_upload").mkdir()
    with pytest.raises(DataError, match="test_upload: the test folder holds no images"):
        load_dataset(data)


def test_empty_test_set_imagefolder_and_csv(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "if", {"a": 2})
    (root / "test").mkdir()
    (root / "test" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(root)
    table = _csv_dataset(tmp_path / "csv", {"a": 2})
    (tmp_path / "csv" / "test.csv").write_text("path\n")
    with pytest.raises(DataError, match="test.csv: no rows"):
        load_dataset(table)


def test_csv_without_needed_columns(tmp_path: Path) -> None:
    table = _csv_dataset(tmp_path / "d", {"a": 2})
    pd.read_csv(table).rename(columns={"path": "file", "label": "cls"}).to_csv(table, index=False)
    with pytest.raises(DataError) as err:
        load_dataset(table)
    message = str(err.value)
    assert str(table) in message and "'path'" in message and "'label'" in message
    assert "'file'" in message  # what it has, too
    # the test table needs a path column
    table = _csv_dataset(tmp_path / "e", {"a": 2})
    (tmp_path / "e" / "test.csv").write_text("filename\nx.png\n")
    with pytest.raises(DataError, match=r"test.csv: missing column\(s\) \['path'\]"):
        load_dataset(table)


def test_competition_train_csv_without_columns(demo_subset: Path, copy_dataset: CopyFn) -> None:
    data = copy_dataset(demo_subset)
    pd.read_csv(data / "train.csv").rename(columns={"Category": "Label"}).to_csv(
        data / "train.csv", index=False)
    with pytest.raises(DataError, match=r"missing column\(s\) \['Category'\]"):
        load_dataset(data, layout="competition")


# --------------------------------------------------------------------------- image conversions

RED_ISH = (200, 100, 50)


def _image(mode: str) -> Image.Image:
    size = (30, 20)
    if mode == "P":
        return Image.new("RGB", size, RED_ISH).convert("P", palette=Image.Palette.ADAPTIVE)
    if mode == "P-transparent":
        img = Image.new("P", size, 0)
        img.putpalette([*RED_ISH, 0, 0, 0])
        img.info["transparency"] = 0
        return img
    if mode == "I;16":
        return Image.fromarray(np.full((size[1], size[0]), 32768, dtype=np.uint16))
    fills: dict[str, object] = {
        "RGB": RED_ISH, "L": 200, "RGBA": (*RED_ISH, 255), "RGBA-clear": (*RED_ISH, 0),
        "LA": (200, 255), "CMYK": (0, 255, 255, 0), "1": 1,
    }
    return Image.new(mode.split("-")[0], size, fills[mode])  # type: ignore[arg-type]


EXPECTED = {
    "RGB": RED_ISH, "L": (200, 200, 200), "RGBA": RED_ISH, "RGBA-clear": (255, 255, 255),
    "LA": (200, 200, 200), "CMYK": (255, 0, 0), "P": RED_ISH, "P-transparent": (255, 255, 255),
    "I;16": (128, 128, 128), "1": (255, 255, 255),
}

CONVERSIONS = [
    ("JPEG", ".jpg", "RGB"), ("JPEG", ".jpeg", "L"), ("JPEG", ".jpg", "CMYK"),
    ("PNG", ".png", "RGB"), ("PNG", ".png", "L"), ("PNG", ".png", "RGBA"),
    ("PNG", ".png", "RGBA-clear"), ("PNG", ".png", "LA"), ("PNG", ".png", "P"),
    ("PNG", ".png", "P-transparent"), ("PNG", ".png", "I;16"), ("PNG", ".png", "1"),
    ("WEBP", ".webp", "RGB"), ("WEBP", ".webp", "RGBA-clear"),
    ("BMP", ".bmp", "RGB"), ("BMP", ".bmp", "L"), ("BMP", ".bmp", "P"),
    ("TIFF", ".tif", "RGB"), ("TIFF", ".tiff", "CMYK"), ("TIFF", ".tif", "I;16"),
    ("TIFF", ".tif", "RGBA"), ("GIF", ".gif", "P"),
    ("PPM", ".ppm", "RGB"), ("PPM", ".pgm", "L"), ("PPM", ".pbm", "1"), ("PPM", ".pnm", "RGB"),
]


@pytest.mark.parametrize(("fmt", "suffix", "mode"), CONVERSIONS,
                         ids=[f"{f}-{m}" for f, _, m in CONVERSIONS])
def test_any_pillow_image_becomes_rgb_uint8(tmp_path: Path, fmt: str, suffix: str,
                                            mode: str) -> None:
    path = tmp_path / f"img{suffix}"
    img = _image(mode)
    img.save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    with Image.open(path) as check:  # the file really is in the mode under test
        assert check.mode == {"RGBA-clear": "RGBA", "P-transparent": "P"}.get(mode, mode)
    arr = read_rgb(path, 12)
    assert arr.shape == (12, 12, 3) and arr.dtype == np.uint8
    tol = 8 if fmt == "JPEG" else 1
    np.testing.assert_allclose(arr.reshape(-1, 3).mean(axis=0), EXPECTED[mode], atol=tol)
    full = read_rgb(path)  # no size: original shape, still RGB
    assert full.shape == (20, 30, 3) and full.dtype == np.uint8


def test_sixteen_bit_keeps_its_range(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 16 * 16).astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    arr = read_rgb(tmp_path / "ramp.png")
    assert arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255
    assert np.all(np.diff(arr[..., 0].ravel().astype(int)) >= 0)  # monotone, not wrapped


@pytest.mark.parametrize(("dtype", "white", "expected"), [
    (np.float32, 1.0, 255),          # float in [0, 1]: read as near black before
    (np.float32, 255.0, 255),        # float on the 8-bit scale
    (np.float32, 65535.0, 255),      # float on the 16-bit scale
    (np.int32, 255, 255),            # 8-bit values stored as 32 bits
    (np.int32, 2 ** 31 - 1, 255),    # the full signed 32-bit range: clipped to white before
])
def test_thirty_two_bit_and_float_tiffs_are_scaled_by_their_full_scale(
        tmp_path: Path, dtype: type, white: float, expected: int) -> None:
    """A 32-bit or float TIFF declares no range: a half-grey-to-white ramp on its scale comes out
    as the same ramp in 8 bits, with NaN as black."""
    ramp = (np.linspace(0.5, 1.0, 16 * 16) * white).astype(dtype).reshape(16, 16)
    if np.issubdtype(dtype, np.floating):
        ramp[0, 0] = np.nan
    path = tmp_path / "ramp.tif"
    Image.fromarray(ramp).save(path, format="TIFF")
    with Image.open(path) as check:
        assert check.mode == ("F" if np.issubdtype(dtype, np.floating) else "I")
    arr = read_rgb(path)[..., 0].ravel().astype(int)
    assert arr[-1] == expected and abs(arr[1] - 127) <= 1
    assert arr[0] == (0 if np.issubdtype(dtype, np.floating) else 127)
    assert np.all(np.diff(arr[1:]) >= 0)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """Orientation 6 = 'rotate 90 degrees clockwise to display': the stored left half (red)
    must end up on top and the stored right half (blue) at the bottom."""
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # 20 high, 40 wide
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    img = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)

    full = read_rgb(path)
    assert full.shape == (40, 20, 3)  # portrait after rotation
    assert full[2, 10, 0] > 200 and full[2, 10, 2] < 60  # top: red
    assert full[-3, 10, 2] > 200 and full[-3, 10, 0] < 60  # bottom: blue
    small = read_rgb(path, 16)
    assert small.shape == (16, 16, 3)
    assert small[1, 8, 0] > 200 and small[-2, 8, 2] > 200
    assert small[2, 1, 0] > 200 and small[2, -2, 0] > 200  # the whole top row is red
    assert small[-2, 1, 2] > 200 and small[-2, -2, 2] > 200  # the whole bottom row is blue


def test_train_csv_with_byte_order_mark_is_still_competition(demo_subset: Path,
                                                            copy_dataset: CopyFn) -> None:
    """Excel saves CSV as UTF-8 with a BOM: the header is still Id,Category."""
    data = copy_dataset(demo_subset)
    text = (data / "train.csv").read_text(encoding="utf-8")
    (data / "train.csv").write_text("\ufeff" + text, encoding="utf-8")
    assert detect_layout(data) == "competition"
    ds = load_dataset(data)
    assert ds.layout == "competition" and len(ds.train) == 300


def test_bundled_demo_is_real_files_in_competition_layout(demo_dir: Path, tmp_path: Path) -> None:
    from oof.demo import score_submission

    ds = load_dataset("demo")  # the default --data: written once under $FOLDSTACK_CACHE
    assert ds.root == demo_dir.resolve() and ds.layout == "competition"
    assert len(ds.train) == 1497 and len(ds.test) == 300
    assert ds.classes == [str(i) for i in range(10)]
    shares = ds.train["label"].value_counts(normalize=True)
    assert shares.max() - shares.min() < 0.02  # stratified split of balanced digits
    with Image.open(ds.train["path"][0]) as img:
        assert img.format == "PNG" and img.size == (8, 8)
    truth = pd.read_csv(demo_dir / "test_labels.csv", dtype=str)
    sample = pd.read_csv(demo_dir / "sample-submission.csv", dtype=str)
    assert list(truth["Id"]) == list(ds.test["id"]) and "Category" in sample
    assert not (sample["Category"] == truth["Category"]).all()  # labels not leaked there
    truth.to_csv(tmp_path / "perfect.csv", index=False)
    assert score_submission(tmp_path / "perfect.csv") == 1.0
