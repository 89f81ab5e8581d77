"""Near-duplicate detection (oof.duplicates) and duplicate-aware folds, on real image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oof.duplicates import close_pairs, find_duplicates, group_ids, perceptual_hashes
from oof.errors import ConfigError, DataError
from oof.folds import ensure_folds, load_folds, make_folds


def smooth_photo(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A photo-like image: a random 6x5 colour field upscaled smoothly, plus a little grain."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
    big = np.asarray(small.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-6, 7, big.shape, dtype=np.int16)
    return Image.fromarray(np.clip(big + grain, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """40 distinct photos, plus planted copies: resized, recompressed JPEG, slightly brightened."""
    root = tmp_path_factory.mktemp("dups")
    out: dict[str, Path] = {}
    for i in range(40):
        out[f"p{i:02d}.png"] = root / f"p{i:02d}.png"
        smooth_photo(i).save(out[f"p{i:02d}.png"])
    smooth_photo(3).resize((97, 73), Image.Resampling.LANCZOS).save(root / "copy03_small.png")
    smooth_photo(3).save(root / "copy03.jpg", quality=70)
    bright = np.clip(np.asarray(smooth_photo(7), dtype=np.int16) + 12, 0, 255).astype(np.uint8)
    Image.fromarray(bright).save(root / "copy07_bright.png")
    for name in ("copy03_small.png", "copy03.jpg", "copy07_bright.png"):
        out[name] = root / name
    return out


def test_copies_are_close_and_distinct_photos_are_far(photos: dict[str, Path]) -> None:
    names = sorted(photos)
    hashes = perceptual_hashes([photos[n] for n in names])
    by_name = dict(zip(names, hashes))
    dist = lambda a, b: int(np.bitwise_count(by_name[a] ^ by_name[b]))  # noqa: E731
    assert dist("p03.png", "copy03_small.png") <= 4
    assert dist("p03.png", "copy03.jpg") <= 4
    assert dist("p07.png", "copy07_bright.png") <= 4
    originals = [n for n in names if n.startswith("p")]
    far = [dist(a, b) for a in originals for b in originals if a < b]
    assert min(far) > 8, "distinct photos must not look like duplicates"


def test_groups_are_transitive_and_pairs_counted_once() -> None:
    h = np.array([0b0, 0b1, 0b11, 0xFFFF_FFFF_0000_0000, 0b1111 << 40], dtype=np.uint64)
    i, j, d = close_pairs(h, max_distance=1)
    assert sorted(zip(i.tolist(), j.tolist(), d.tolist())) == [(0, 1, 1), (1, 2, 1)]
    groups = group_ids(h, max_distance=1)
    assert groups[0] == groups[1] == groups[2]  # 0~1 and 1~2: one group although 0 and 2 differ
    assert len({groups[0], groups[3], groups[4]}) == 3
    with pytest.raises(ValueError, match="max_distance"):
        close_pairs(h, max_distance=64)


def test_report_lists_groups_mixed_labels_and_train_test_pairs(photos: dict[str, Path]) -> None:
    train = [f"p{i:02d}.png" for i in range(40)] + ["copy03_small.png", "copy07_bright.png"]
    labels = [str(i % 4) for i in range(40)] + ["3", "1"]  # p03 is "3"; p07 is "3", copy says "1"
    test = ["copy03.jpg"]
    report = find_duplicates(train, labels, perceptual_hashes([photos[n] for n in train]), test,
                             perceptual_hashes([photos[n] for n in test]))
    assert sorted(map(sorted, report.groups)) == [["copy03_small.png", "p03.png"],
                                                  ["copy07_bright.png", "p07.png"]]
    assert report.mixed_label_groups == [["p07.png", "copy07_bright.png"]]
    assert {(a, b) for a, b, _ in report.train_test_pairs} == {
        ("p03.png", "copy03.jpg"), ("copy03_small.png", "copy03.jpg")}
    assert report.to_dict()["max_distance"] == 4


def test_planted_duplicate_pair_lands_in_one_fold(photos: dict[str, Path], tmp_path: Path) -> None:
    train = [f"p{i:02d}.png" for i in range(40)] + ["copy03_small.png", "copy07_bright.png"]
    labels = [str(i % 2) for i in range(40)] + ["1", "1"]
    hashes = perceptual_hashes([photos[n] for n in train], cache_dir=tmp_path / "cache")
    groups = group_ids(hashes)
    # Plain stratified folds split at least one planted pair for some seeds; grouped never do.
    split_plain = 0
    for seed in range(10):
        plain = make_folds(train, labels, 5, seed)
        fold = dict(zip(plain.ids, plain.fold))
        split_plain += fold["p03.png"] != fold["copy03_small.png"]
        grouped = make_folds(train, labels, 5, seed, groups)
        gfold = dict(zip(grouped.ids, grouped.fold))
        assert gfold["p03.png"] == gfold["copy03_small.png"]
        assert gfold["p07.png"] == gfold["copy07_bright.png"]
        assert np.bincount(grouped.fold, minlength=5).min() >= 7  # still balanced
    assert split_plain > 0
    # the hashes were cached under the file list's key
    assert len(list((tmp_path / "cache").glob("phash_42_*.npy"))) == 1


def test_ensure_folds_records_and_enforces_grouping(photos: dict[str, Path],
                                                    tmp_path: Path) -> None:
    train = [f"p{i:02d}.png" for i in range(40)]
    labels = [str(i % 2) for i in range(40)]
    calls = []

    def make_groups() -> np.ndarray:
        calls.append(1)
        return group_ids(perceptual_hashes([photos[n] for n in train]))

    folds = ensure_folds(tmp_path, train, labels, 4, 1, "phash", make_groups)
    assert folds.group == "phash" and load_folds(tmp_path).group == "phash"
    assert ensure_folds(tmp_path, train, labels, None, None, "phash", make_groups).fingerprint \
        == folds.fingerprint
    assert calls == [1], "groups are computed only when folds are made"
    with pytest.raises(ConfigError, match="--folds-group none.*stored: phash"):
        ensure_folds(tmp_path, train, labels, None, None, "none")
    with pytest.raises(ConfigError, match="no way to compute"):
        ensure_folds(tmp_path / "other", train, labels, 4, 1, "phash")


def test_unreadable_image_is_named(photos: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.jpg"):
        perceptual_hashes([photos["p01.png"], bad])


@pytest.mark.slow
def test_run_folds_with_phash_groups_keeps_copies_together(photos: dict[str, Path],
                                                           tmp_path: Path) -> None:
    """``run_folds.py --folds-group phash`` end to end on an ImageFolder of real files."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    import pandas as pd

    data = tmp_path / "photos"
    for i in range(40):
        (data / "train" / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        shutil.copy(photos[f"p{i:02d}.png"], data / "train" / f"c{i % 4}" / f"p{i:02d}.png")
    shutil.copy(photos["copy03_small.png"], data / "train" / "c3" / "copy03_small.png")
    shutil.copy(photos["copy07_bright.png"], data / "train" / "c3" / "copy07_bright.png")
    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, str(root / "run_folds.py"), "--data", str(data),
            "--layout", "imagefolder", "--out", str(tmp_path / "runs"), "--folds", "4",
            "--folds-group", "phash", "--epochs", "1", "--img-size", "16", "--progress", "false"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_root = tmp_path / "runs" / "photos"
    folds = pd.read_csv(run_root / "folds.csv", dtype=str).set_index("id")["fold"]
    pair = lambda a, b: folds[a] == folds[b]  # noqa: E731
    assert pair("c3/p03.png", "c3/copy03_small.png") and pair("c3/p07.png", "c3/copy07_bright.png")
    assert json.loads((run_root / "folds.json").read_text())["group"] == "phash"
    meta = json.loads(next(run_root.glob("timm-*/meta.json")).read_text())
    assert meta["fold_group"] == "phash" and meta["status"] == "complete"
    assert "near-duplicate groups of 2+" in proc.stderr
    other = subprocess.run([*args[:-8], "--folds-group", "none", *args[-6:]],
                           capture_output=True, text=True, timeout=300, env=env)
    assert other.returncode == 2 and "grouping=phash" in other.stderr, other.stderr[-2000:]
