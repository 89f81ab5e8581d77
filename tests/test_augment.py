"""Augmentation presets and custom pipelines: shared by both frameworks, seeded per sample."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from backbones.augment import PRESETS, build_augment, build_seeded_augment, check_augment
from oof.errors import ConfigError


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A smooth colour image (a flat one would hide what crops and flips do)."""
    yy, xx = np.mgrid[0:48, 0:48]
    return np.stack([xx * 5, yy * 5, (xx + yy) * 2], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "none"])
def test_presets_keep_shape_and_dtype_and_change_pixels(preset: str, image: np.ndarray) -> None:
    aug = build_seeded_augment(preset, 48, seed=0)
    outs = [aug(image, 0, i) for i in range(8)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
    assert sum(not np.array_equal(o, image) for o in outs) >= 4
    assert "torch" not in sys.modules  # albumentations must not drag torch into a Keras process


def test_same_key_same_pixels_other_key_other_pixels(image: np.ndarray) -> None:
    a, b = build_seeded_augment("strong", 48, 7), build_seeded_augment("strong", 48, 7)
    assert np.array_equal(a(image, 3, 11), b(image, 3, 11))  # order and process do not matter
    b(image, 0, 0)
    assert np.array_equal(a(image, 3, 11), b(image, 3, 11))
    assert not np.array_equal(a(image, 3, 11), a(image, 4, 11))
    assert build_seeded_augment("none", 48, 7) is None


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_custom_pipeline_file_round_trips(tmp_path: Path, image: np.ndarray, suffix: str) -> None:
    import albumentations as A

    pipeline = A.Compose([A.HorizontalFlip(p=1.0), A.RandomBrightnessContrast(p=1.0)])
    path = tmp_path / f"pipe{suffix}"
    A.save(pipeline, str(path), data_format=suffix.lstrip(".").replace("yml", "yaml"))
    loaded = build_augment(str(path), 48)
    assert [type(t).__name__ for t in loaded.transforms] == ["HorizontalFlip",
                                                             "RandomBrightnessContrast"]
    pipeline.set_random_seed(5)
    loaded.set_random_seed(5)
    assert np.array_equal(pipeline(image=image)["image"], loaded(image=image)["image"])
    seeded = build_seeded_augment(str(path), 48, seed=1)
    assert np.array_equal(seeded(image, 0, 0), seeded(image, 0, 0))


def test_bad_presets_and_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--augment 'heavy': choose one of"):
        check_augment("heavy", 32)
    with pytest.raises(ConfigError, match="no such pipeline file"):
        check_augment(str(tmp_path / "missing.yaml"), 32)
    bad = tmp_path / "bad.json"
    bad.write_text('{"transform": {"__class_fullname__": "NoSuchTransform"}}')
    with pytest.raises(ConfigError, match=f"--augment {bad}: not an albumentations pipeline"):
        check_augment(str(bad), 32)
