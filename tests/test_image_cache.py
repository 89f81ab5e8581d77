"""The streaming image cache and the row views that fold jobs read it through.

Real image files on disk, real worker processes; the pixels of the streaming build must be the
ones the in-memory decoder gives, a killed build must leave nothing that looks complete, and a
view must answer every lookup the backends make exactly as the array it replaces.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oof.errors import DataError
from oof.images import (
    RowView,
    build_cache,
    cache_path,
    cached_images,
    decode_images,
    read_rgb,
)
from tests.imaging import write_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """40 small JPEGs and PNGs of different shapes (landscape, portrait, square)."""
    root = tmp_path_factory.mktemp("photos")
    shapes = [(30, 40), (40, 30), (24, 24), (17, 53)]
    return [str(write_image(root / f"p{i}.{'jpg' if i % 3 else 'png'}", *shapes[i % 4], seed=i))
            for i in range(40)]


def test_streaming_build_equals_in_memory_decode(photos: list[str], tmp_path: Path) -> None:
    """Chunks decoded by worker processes land in the right rows, pixel for pixel."""
    target = build_cache(photos, 16, tmp_path / "c.npy", workers=2, chunk=6, progress=False)
    on_disk = np.load(target, mmap_mode="r")
    np.testing.assert_array_equal(on_disk, decode_images(photos, 16))
    assert on_disk.shape == (40, 16, 16, 3)
    assert on_disk.std() > 10  # real pictures, not a zero-filled file
    assert [p.name for p in tmp_path.iterdir()] == ["c.npy"]  # no temporary file left


def test_cache_key_and_name_record_size_and_policy(photos: list[str], tmp_path: Path) -> None:
    squash = cached_images(photos, 16, tmp_path, progress=False)
    crop = cached_images(photos, 16, tmp_path, "crop", progress=False)
    again = cached_images(photos, 16, tmp_path, progress=False)
    assert not np.array_equal(squash, crop)
    np.testing.assert_array_equal(squash, again)
    names = sorted(p.name for p in tmp_path.glob("*.npy"))
    assert len(names) == 2 and any("_crop_" in n for n in names)
    # squash keeps the name (and key) of the caches made before policies existed
    assert "_squash" not in cache_path(photos, 16, tmp_path).name
    with pytest.raises(ValueError, match="squash"):
        cached_images(photos, 16, tmp_path, "stretch")  # type: ignore[arg-type]


def _key_before_tiff_scaling(paths: list[str], size: int) -> str:
    """The squash cache key as it was before 32-bit and float TIFFs were scaled by their full
    scale: the compatibility contract for caches already on users' disks."""
    digest = hashlib.sha256(f"v1|{size}".encode())
    for p in paths:
        st = os.stat(p)
        digest.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def test_caches_of_tiffs_are_rebuilt_once_and_others_keep_their_key(photos: list[str],
                                                                     tmp_path: Path) -> None:
    """A float TIFF used to decode near black: a cache built then must not be read again, while
    a cache of JPEGs and PNGs keeps its name (no rebuild on upgrade)."""
    assert cache_path(photos, 16, tmp_path).name.endswith(
        f"_{_key_before_tiff_scaling(photos, 16)}.npy")
    tiff = tmp_path / "float.tif"
    Image.fromarray(np.full((20, 20), 0.8, dtype=np.float32)).save(tiff, format="TIFF")
    paths = [*photos[:3], str(tiff)]
    stale = tmp_path / f"images_16px_4_{_key_before_tiff_scaling(paths, 16)}.npy"
    np.save(stale, np.zeros((4, 16, 16, 3), dtype=np.uint8))  # what the old decoder wrote
    images = cached_images(paths, 16, tmp_path, progress=False)
    assert cache_path(paths, 16, tmp_path) != stale
    assert int(images[3].min()) == int(images[3].max()) == 204  # 0.8 of white, not black
    np.testing.assert_array_equal(images, decode_images(paths, 16))


def test_resize_policies(tmp_path: Path) -> None:
    """A wide image in three bands: crop keeps the middle band, pad keeps all three with black
    bars above and below, squash keeps all three and fills the square."""
    arr = np.zeros((40, 120, 3), dtype=np.uint8)
    arr[:, :40, 0] = arr[:, 40:80, 1] = arr[:, 80:, 2] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(arr).save(path)
    crop = read_rgb(path, 30, "crop")
    pad = read_rgb(path, 30, "pad")
    squash = read_rgb(path, 30)
    assert crop.shape == pad.shape == squash.shape == (30, 30, 3)
    assert crop[:, :, 1].min() > 200 and crop[:, :, [0, 2]].max() < 60  # green only
    assert pad[:8].max() == 0 and pad[-8:].max() == 0  # 30 x 10 picture, centred
    assert pad[15, 2, 0] > 200 and pad[15, 15, 1] > 200 and pad[15, 27, 2] > 200
    assert squash[0, 2, 0] > 200 and squash[29, 27, 2] > 200  # no bars


def test_bad_files_are_listed_together_and_nothing_is_kept(photos: list[str],
                                                           tmp_path: Path) -> None:
    bad = [tmp_path / "a.jpg", tmp_path / "b.png"]
    bad[0].write_text("not a picture")
    bad[1].write_bytes(Path(photos[0]).read_bytes()[:0])
    cache = tmp_path / "cache"
    paths = [*photos[:10], str(bad[0]), *photos[10:30], str(bad[1])]
    with pytest.raises(DataError) as err:
        cached_images(paths, 16, cache, workers=2, progress=False)
    assert str(err.value).startswith("2 image(s) could not be read")
    assert all(str(b) in str(err.value) for b in bad)
    # neither the cache nor its temporary file; only the empty build lock
    lock = f".{cache_path(paths, 16, cache).name}.lock"
    assert [p.name for p in cache.iterdir()] == [lock]


def test_a_killed_build_is_never_read_as_complete(tmp_path: Path) -> None:
    """SIGKILL the builder mid-way: no cache file, only a temporary one; the next call builds
    the whole cache."""
    paths = [str(write_image(tmp_path / "src" / f"{i}.png", 600, 800, seed=i)) for i in range(60)]
    cache = tmp_path / "cache"
    code = ("import sys; from oof.images import cached_images; "
            f"cached_images(sys.argv[1:], 64, {str(cache)!r}, workers=1, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, *paths], cwd=REPO)
    deadline = time.time() + 60
    while time.time() < deadline and not list(cache.glob(".*.tmp")):
        time.sleep(0.01)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(cache.glob(".*.tmp")), "the build finished before it could be killed"
    assert not list(cache.glob("*.npy"))
    full = cached_images(paths, 64, cache, workers=2, progress=False)
    np.testing.assert_array_equal(full, decode_images(paths, 64))
    # the killed build's temporary file (full size: 60 x 64 x 64 x 3) is gone, not left to pile up
    assert not list(cache.glob(".*.tmp"))


def test_processes_wanting_one_cache_build_it_once(photos: list[str], tmp_path: Path) -> None:
    """While another process holds the build lock, a caller waits and then reads that process's
    file instead of decoding again (the sevens prove whose pixels it got)."""
    target = cache_path(photos, 8, tmp_path)
    code = ("import sys, time, numpy as np; from filelock import FileLock\n"
            "with FileLock(sys.argv[2]):\n"
            "    print('locked', flush=True); time.sleep(1.0)\n"
            "    np.save(sys.argv[1], np.full((40, 8, 8, 3), 7, np.uint8))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target),
                             str(target.with_name(f".{target.name}.lock"))],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        got = cached_images(photos, 8, tmp_path, workers=1, progress=False)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == 0 and (np.asarray(got) == 7).all()


@pytest.fixture
def memmapped(tmp_path: Path) -> np.ndarray:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(50, 6, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", arr)
    return np.load(tmp_path / "a.npy", mmap_mode="r")


@pytest.mark.parametrize("in_memory", [False, True])
def test_row_view_answers_like_the_array_it_replaces(memmapped: np.ndarray,
                                                     in_memory: bool) -> None:
    base = np.asarray(memmapped).copy() if in_memory else memmapped
    rows = np.array([7, 3, 4, 5, 40, 41, 0, 49, 3])
    view, ref = RowView(base, rows), np.asarray(memmapped)[rows]
    assert len(view) == 9 and view.shape == ref.shape and view.dtype == np.uint8
    for key in (0, 4, -1, slice(None), slice(2, 7), slice(None, None, -2),
                np.array([8, 1, 1, 5]), [2, 3, 4], np.arange(9) % 2 == 0):
        np.testing.assert_array_equal(view[key], ref[key])
    np.testing.assert_array_equal(view[1:5, 2:4], ref[1:5, 2:4])
    np.testing.assert_array_equal(view[3, 1], ref[3, 1])
    np.testing.assert_array_equal(np.asarray(view), ref)
    out = view[2:6]
    out[:] = 0  # what a backend may do with a batch: it is its own, the cache is untouched
    np.testing.assert_array_equal(view[2:6], ref[2:6])
    with pytest.raises(IndexError):
        view[9]
    with pytest.raises(IndexError):
        RowView(base, [50])


def test_row_view_pickles_as_a_file_name(memmapped: np.ndarray) -> None:
    """A DataLoader worker or a Ray task gets the cache's name and rows, not the pixels."""
    view = RowView(memmapped, np.arange(50)[::-1])
    blob = pickle.dumps(view)
    assert len(blob) < memmapped.nbytes / 2
    np.testing.assert_array_equal(pickle.loads(blob)[:], np.asarray(memmapped)[::-1])
