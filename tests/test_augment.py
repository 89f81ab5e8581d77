"""Augmentation presets and custom pipelines: shared by both frameworks, seeded draws."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from oof.errors import ConfigError
from recipe.augment import PRESETS, build_augment, build_seeded_augment, check_augment


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


def test_augmenting_imports_no_deep_learning_framework() -> None:
    """albumentations must not drag torch into a Keras process. A fresh interpreter: a pytest
    worker may already hold torch from an earlier module (the order is not fixed)."""
    code = """
import sys
import numpy as np
from recipe.augment import PRESETS, build_seeded_augment
image = np.zeros((48, 48, 3), np.uint8)
for preset in PRESETS:
    aug = build_seeded_augment(preset, 48, seed=0)
    if aug is not None:
        aug(image, 0, 0)
loaded = sorted({"torch", "tensorflow", "keras", "timm"} & set(sys.modules))
print("loaded:", loaded)
"""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("loaded: []"), done.stdout


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


def test_tta_views_flip_zoom_and_draw_per_row(image: np.ndarray) -> None:
    from recipe.tta import tta_views

    batch = np.stack([image, image[::-1]])
    rows = np.array([10, 11])
    views = tta_views("flips", [1.5], 2, "strong", 48, seed=3)
    assert [v.name for v in views] == ["identity", "hflip", "vflip", "hvflip", "zoom1.5",
                                       "augment0", "augment1"]
    out = {v.name: v(batch, rows) for v in views}
    assert np.array_equal(out["identity"], batch)
    assert np.array_equal(out["hflip"][0], image[:, ::-1])
    assert np.array_equal(out["hvflip"][0], image[::-1, ::-1])
    assert out["zoom1.5"].shape == batch.shape and not np.array_equal(out["zoom1.5"], batch)
    # a random view of a row does not depend on the batch it is in
    alone = views[5](batch[1:], rows[1:])
    assert np.array_equal(alone[0], out["augment0"][1])
    assert not np.array_equal(out["augment0"], out["augment1"])


@pytest.mark.parametrize(("args", "message"), [
    (("mirror", [], 0, "light"), "--tta 'mirror': choose one of"),
    (("none", [0.9], 0, "light"), "--tta-scales 0.9: a zoom factor in (1, 2]"),
    (("none", [], 3, "none"), "--tta-augment 3: needs an --augment pipeline"),
])
def test_bad_tta_settings_are_named(args: tuple, message: str) -> None:
    from recipe.tta import tta_views

    with pytest.raises(ConfigError) as err:
        tta_views(*args, size=32, seed=0)
    assert message in str(err.value)


def test_mixup_and_cutmix_mix_images_and_targets_alike() -> None:
    from recipe.augment import batch_rng, mix_batch

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    y = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1, 2, 3]]
    mixed, soft = mix_batch(x, y, 0.4, 0.0, 1.0, batch_rng(1, 2, 3))
    again, soft2 = mix_batch(x, y, 0.4, 0.0, 1.0, batch_rng(1, 2, 3))
    assert np.array_equal(mixed, again) and np.array_equal(soft, soft2)  # seeded per batch
    lam = soft[0, 0]  # image 0 (class 0) mixed with image 7 (class 3)
    assert 0 < lam < 1 and soft[0, 3] == pytest.approx(1 - lam)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)
    blend = x[0].astype(np.float32) * lam + x[7].astype(np.float32) * (1 - lam)
    assert np.abs(mixed[0].astype(np.float32) - blend).max() <= 0.5 + 1e-3
    cut, soft_cut = mix_batch(x, y, 0.0, 1.0, 1.0, batch_rng(1, 2, 4))
    pasted = (cut[0] != x[0]).any(axis=-1).mean()
    assert soft_cut[0, 3] == pytest.approx(pasted, abs=0.02)  # label weight = pasted area
    same, hard = mix_batch(x, y, 0.4, 1.0, 0.0, batch_rng(1, 2, 5))  # prob 0: untouched
    assert same is x and np.array_equal(hard, y)


def test_transforms_of_one_pipeline_draw_independently(image: np.ndarray) -> None:
    """Two flips at p=0.5 cancel only when both fire: a quarter of the time if they draw
    independently. Seeding every transform alike (``Compose.set_random_seed``) makes them fire
    together, so the pair never changed an image."""
    import albumentations as A

    from recipe.augment import SeededAugment

    aug = SeededAugment(A.Compose([A.HorizontalFlip(p=0.5), A.HorizontalFlip(p=0.5)]), seed=0)
    flipped = np.mean([not np.array_equal(aug(image, 0, i), image) for i in range(200)])
    assert 0.35 < flipped < 0.65


def test_a_training_batch_is_a_function_of_its_rows_not_their_order(image: np.ndarray) -> None:
    """Training seeds once per batch (``SeededAugment.batch``): the same rows in any order get
    the same pixels each, another epoch or another batch gets other pixels."""
    aug = build_seeded_augment("light", 48, seed=3)
    rng = np.random.default_rng(0)
    images = np.stack([np.roll(image, k, axis=1) for k in range(6)])
    rows = np.array([40, 7, 19, 3, 88, 51])
    first = aug.batch(images, 2, rows)
    perm = rng.permutation(6)
    shuffled = build_seeded_augment("light", 48, seed=3).batch(images[perm], 2, rows[perm])
    assert np.array_equal(shuffled, first[perm])
    assert first.shape == images.shape and first.dtype == np.uint8
    assert sum(not np.array_equal(a, b) for a, b in zip(first, images)) >= 3
    same = aug.batch(np.stack([image] * 6), 2, rows)  # one image six times: six draws
    assert len({a.tobytes() for a in same}) >= 4
    assert not np.array_equal(aug.batch(images, 3, rows), first)
    assert aug.batch(images[:0], 2, rows[:0]).shape == (0, 48, 48, 3)


def _affine_parts(m: np.ndarray, mirrored: np.ndarray, height: int, width: int
                  ) -> dict[str, np.ndarray]:
    """Per-axis scale, rotation (degrees) and centre shift (pixels) of 2x3 affine matrices."""
    linear = m[:, :2, :2].copy()
    linear[:, :, 0] *= np.where(mirrored, -1, 1)[:, None]  # undo the mirror (first column)
    centre = np.array([(width - 1) / 2, (height - 1) / 2, 1.0])
    return {"scale": np.linalg.norm(linear, axis=1),
            "angle": np.degrees(np.arctan2(np.abs(linear[:, 1, 0]), linear[:, 0, 0])),
            "shift": np.round(m[:, :2] @ centre - centre[:2], 6)}


@pytest.mark.parametrize(("preset", "mirror_rate"), [("light", 0.0), ("flip", 0.5)])
def test_light_and_flip_draw_what_albumentations_affine_drew(preset: str,
                                                             mirror_rate: float) -> None:
    """The presets were ``A.Affine(scale=(0.9, 1.1), translate_percent=(-0.08, 0.08),
    rotate=(-10, 10), p=0.8)`` (+ ``HorizontalFlip`` for flip); ``AffineJitter`` must draw the
    same distribution (per-axis scale, whole-pixel shifts, rotation about the centre), or the
    results measured with them no longer hold."""
    import albumentations as A

    height, width = 40, 50
    m, fired, mirrored = build_augment(preset, 40).matrices(6000, height, width,
                                                            np.random.default_rng(0))
    assert fired.mean() == pytest.approx(0.8, abs=0.02)
    assert mirrored.mean() == pytest.approx(mirror_rate, abs=0.02)
    assert np.all(np.sign(np.linalg.det(m[:, :, :2])) == np.where(mirrored, -1, 1))
    ours = _affine_parts(m[fired], mirrored[fired], height, width)
    still = _affine_parts(m[~fired], mirrored[~fired], height, width)
    assert np.allclose(still["scale"], 1) and np.allclose(still["angle"], 0)
    assert np.allclose(still["shift"], 0)

    reference = A.Affine(scale=(0.9, 1.1), translate_percent=(-0.08, 0.08), rotate=(-10, 10),
                         p=1.0)
    reference.set_random_seed(0)
    theirs = _affine_parts(np.stack([
        reference.get_params_dependent_on_data({"shape": (height, width, 3)}, {})["matrix"][:2]
        for _ in range(6000)]), np.zeros(6000, bool), height, width)
    for key, tol in (("scale", 0.005), ("angle", 0.2), ("shift", 0.08)):
        assert np.abs(ours[key]).mean(axis=0) == pytest.approx(
            np.abs(theirs[key]).mean(axis=0), abs=tol), key
        assert np.abs(ours[key]).max(axis=0) == pytest.approx(
            np.abs(theirs[key]).max(axis=0), abs=tol * 3), key
        assert np.abs(ours[key]).std(axis=0) == pytest.approx(
            np.abs(theirs[key]).std(axis=0), abs=tol), key
    assert np.array_equal(ours["shift"], np.round(ours["shift"]))  # whole pixels, like theirs
    assert sorted(np.unique(ours["shift"][:, 0])) == sorted(np.unique(theirs["shift"][:, 0]))
    assert sorted(np.unique(ours["shift"][:, 1])) == sorted(np.unique(theirs["shift"][:, 1]))


def test_affine_jitter_moves_pixels_where_its_matrix_says(image: np.ndarray) -> None:
    from recipe.augment import AffineJitter

    mirror = AffineJitter(p=0.0, hflip=1.0).apply(image[None], np.random.default_rng(0))
    assert np.array_equal(mirror[0], image[:, ::-1])
    warped_mirror = AffineJitter(scale=(1, 1), translate=0, rotate=0, p=1.0, hflip=1.0)
    assert np.array_equal(warped_mirror.apply(image[None], np.random.default_rng(0))[0],
                          image[:, ::-1])
    untouched = AffineJitter(p=0.0).apply(image[None], np.random.default_rng(0))
    assert np.array_equal(untouched[0], image)
    dots = np.zeros((16, 48, 48, 3), np.uint8)
    dots[:, 20, 14] = 255  # one bright pixel at x=14, y=20
    jitter = AffineJitter(scale=(0.9, 1.1), translate=0.15, rotate=20, p=1.0, hflip=0.5)
    out = jitter.apply(dots, np.random.default_rng(3))
    m, _, _ = jitter.matrices(16, 48, 48, np.random.default_rng(3))
    for img, mat in zip(out, m):
        x, y = mat @ (14, 20, 1)
        peak_y, peak_x = np.unravel_index(img[..., 0].argmax(), img.shape[:2])
        assert abs(peak_x - x) <= 1 and abs(peak_y - y) <= 1


def test_augmentation_runs_opencv_on_the_calling_thread() -> None:
    """OpenCV's thread pool took turns with the training step's compute threads (0.92x against
    0.98x a bare loop, README: Training overhead): augmenting leaves OpenCV single-threaded, and
    the pixels do not depend on OpenCV's threads. A fresh process: the setting is process-wide."""
    code = """
import cv2, numpy as np
from recipe.augment import build_seeded_augment, opencv
images = np.random.default_rng(0).integers(0, 256, (32, 40, 40, 3), dtype=np.uint8)
for preset in ("light", "strong"):
    cv2.setNumThreads(4)
    aug = build_seeded_augment(preset, 40, 0)
    assert cv2.getNumThreads() == 1, (preset, cv2.getNumThreads())
    single = aug.batch(images, 0, np.arange(32))
    cv2.setNumThreads(4)  # the pool back: the same pixels
    assert np.array_equal(aug.batch(images, 0, np.arange(32)), single), preset
    opencv.cache_clear()
print("ok")
"""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("preset", ["light", "flip", "medium"])
def test_a_preset_written_to_a_file_loads_as_the_same_pipeline(tmp_path: Path, image: np.ndarray,
                                                               preset: str) -> None:
    """``--write-augment``: the starting point of a custom pipeline. light and flip become the
    ``A.Affine`` (+ ``HorizontalFlip``) they draw like; the file trains as ``--augment FILE``."""
    import albumentations as A
    import cv2

    from recipe.augment import save_augment

    path = save_augment(preset, 48, tmp_path / f"{preset}.yaml")
    loaded = build_augment(str(path), 48)
    assert isinstance(loaded, A.Compose)
    if preset == "medium":
        assert loaded.to_dict() == build_augment(preset, 48).to_dict()
    else:
        was = A.Affine(scale=(0.9, 1.1), translate_percent=(-0.08, 0.08), rotate=(-10, 10),
                       border_mode=cv2.BORDER_REFLECT_101, p=0.8)  # what the presets were
        assert loaded.transforms[0].to_dict() == was.to_dict()
        flips = [t.p for t in loaded.transforms if isinstance(t, A.HorizontalFlip)]
        assert flips == ([0.5] if preset == "flip" else [])
    seeded = build_seeded_augment(str(path), 48, 0)
    batch = np.stack([image] * 8)
    out = seeded.batch(batch, 0, np.arange(8))
    assert out.shape == batch.shape and not np.array_equal(out, batch)
    assert np.array_equal(out, build_seeded_augment(str(path), 48, 0).batch(batch, 0, np.arange(8)))


def test_writing_a_pipeline_refuses_bad_names_and_keeps_the_old_file(tmp_path: Path) -> None:
    from recipe.augment import save_augment

    kept = tmp_path / "mine.yaml"
    kept.write_text("my edits\n")
    for preset, path, message in (("light", tmp_path / "p.txt", "p.txt"),
                                  ("none", kept, "no pipeline"),
                                  ("wobbly", kept, "wobbly")):
        with pytest.raises(ConfigError, match=message):
            save_augment(preset, 32, path)
    assert kept.read_text() == "my edits\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.yaml"]  # no temporary left


def test_run_folds_writes_the_augment_pipeline_instead_of_training(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from run_folds import main

    path = tmp_path / "strong.json"
    assert main(["--augment", "strong", "--img-size", "40", "--write-augment", str(path),
                 "--out", str(tmp_path / "runs")]) == 0
    assert str(path) in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()  # nothing trained, no run folder
    assert build_augment(str(path), 40).to_dict() == build_augment("strong", 40).to_dict()
