"""The Fashion-MNIST demo dataset, built from the real Debian package (when it cannot be
fetched: skipped locally, failed under CI): a valid competition layout, deterministic,
stratified, held out."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from oof.datasets import load_dataset
from oof.demo import FASHION_CLASSES, ensure_fashion_demo, fashion_arrays, score_submission
from oof.errors import FetchError
from tests.fixtures_transfer import fashion_idx  # noqa: F401

TRAIN, TEST = 12, 5  # images per class


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(fashion_idx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    return ensure_fashion_demo(tmp_path_factory.mktemp("a") / "demo-fashion", TRAIN, TEST,
                               sources=fashion_idx)


def test_builds_a_valid_competition_layout_of_the_real_images(built: Path,
                                                               fashion_idx: Path) -> None:  # noqa: F811
    ds = load_dataset(built)
    assert (ds.layout, ds.name) == ("competition", "demo-fashion")
    assert sorted(ds.classes) == sorted(FASHION_CLASSES)
    assert ds.train["label"].value_counts().to_dict() == {c: TRAIN for c in FASHION_CLASSES}
    assert len(ds.test) == 10 * TEST
    assert not built.with_name(built.name + ".partial").exists()
    # Every PNG is the package's own image with its own label: train rows from the train split,
    # held-out rows from the separate t10k split.
    for split, table, folder in (("train", pd.read_csv(built / "train.csv"), None),
                                 ("t10k", pd.read_csv(built / "test_labels.csv"), "test_upload")):
        images, labels = fashion_arrays(split, fashion_idx)
        for image_id, cat in zip(table["Id"], table["Category"]):
            i = int(image_id.split("_")[1].split(".")[0])
            path = built / (folder or f"train/{cat}") / image_id
            assert np.array_equal(np.asarray(Image.open(path)), images[i]), path
            assert FASHION_CLASSES[labels[i]] == cat
    truth = pd.read_csv(built / "test_labels.csv")
    sample = pd.read_csv(built / "sample-submission.csv")
    assert list(sample["Id"]) == list(truth["Id"]) == list(ds.test["id"])
    assert truth["Category"].value_counts().to_dict() == {c: TEST for c in FASHION_CLASSES}
    assert set(sample["Category"]) == {FASHION_CLASSES[0]}  # no label leaks into the sample
    assert score_submission(built / "test_labels.csv", built) == 1.0


def test_build_is_deterministic_and_done_once(built: Path, fashion_idx: Path,  # noqa: F811
                                              tmp_path: Path) -> None:
    again = ensure_fashion_demo(tmp_path / "demo-fashion", TRAIN, TEST, sources=fashion_idx)
    assert _digest(again) == _digest(built)
    other = ensure_fashion_demo(tmp_path / "seed1", TRAIN, TEST, seed=1, sources=fashion_idx)
    ids = [set(pd.read_csv(d / "train.csv")["Id"]) for d in (built, other)]
    assert ids[0] != ids[1]
    (again / "train.csv").write_text("kept")  # complete: never rebuilt
    assert ensure_fashion_demo(again, TRAIN, TEST, sources=fashion_idx) == again
    assert (again / "train.csv").read_text() == "kept"


def test_a_failed_fetch_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get
    with pytest.raises(FetchError, match="dataset-fashion-mnist.*apt-get update"):
        ensure_fashion_demo(tmp_path / "demo-fashion", sources=tmp_path / "idx")
    assert not (tmp_path / "demo-fashion").exists() and not (tmp_path / "idx").exists()


def test_data_name_demo_fashion_builds_the_demo_in_the_cache(
        fashion_idx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """``--data demo-fashion`` resolves like ``--data demo``: built once into $FOLDSTACK_CACHE."""
    monkeypatch.setenv("FOLDSTACK_CACHE", str(tmp_path))
    (tmp_path / "debian-fashion-mnist").symlink_to(fashion_idx)  # no second download
    ds = load_dataset("demo-fashion")
    assert ds.root == tmp_path / "demo-fashion" and ds.name == "demo-fashion"
    assert (len(ds.train), len(ds.test)) == (4500, 2000)
    assert ds.train["label"].value_counts().nunique() == 1  # stratified: 450 per class
