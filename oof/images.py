"""Decoding images into RGB uint8 arrays, and the on-disk cache of decoded images.

Every backbone, timm or Keras, sees pixels decoded by this one module, so a CMYK JPEG, a 16-bit
PNG or a rotated phone photo means the same thing to every model in the stack. Decoding happens
once per (image list, size, resize policy) into a ``.npy`` cache that training memory-maps: the
fold loop never decodes a file, and an unreadable file is reported before training starts, with
all culprits listed together.

The cache is built by streaming: worker processes decode chunks of images straight into their
rows of the ``.npy`` file (one ``pwrite`` per image), so neither the builder nor a worker
ever holds the whole set in memory (12 GB at 512 px for a car-sized set). The file is written
under a temporary name and moved into place when every row is in, so a partial cache is never
read as complete. Fold jobs then see their rows through a ``RowView`` into the memory map rather
than a per-fold copy.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

from oof.atomic import atomic_path
from oof.errors import DataError

log = logging.getLogger(__name__)

# what Pillow decodes that cameras, scanners and datasets write (the Netpbm family: .pbm 1-bit,
# .pgm grey, .ppm colour, .pnm any of the three)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm",
                    ".pgm", ".pbm", ".pnm")
MAX_LISTED = 20
#: how an image becomes a square: squash the whole frame (the default, as before), keep the aspect
#: ratio and crop the centre (fills the square, loses the ends of the long side), or keep the
#: aspect ratio and pad with black (keeps everything, wastes pixels)
RESIZE_POLICIES = ("squash", "crop", "pad")
Resize = Literal["squash", "crop", "pad"]
CHUNK = 64  # images per decode task: small enough to spread over workers, big enough to amortise


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: 16-bit, 32-bit and float scaled, alpha composited on white.

    16-bit pictures are scaled by 65535 whatever their content, so a dark one stays dark: the
    I;16 modes, and mode I from a 16-bit PGM/PPM (Pillow scales its maxval to 65535). Any other
    I or F image (a 32-bit integer or float TIFF) carries no declared range, so it is scaled by
    the smallest common full scale that holds its largest value (``_full_scale``): a float
    image in [0, 1] is then not read as near black.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        sixteen = img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PPM")
        top = 65535.0 if sixteen else _full_scale(arr, floating=img.mode == "F")
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def _full_scale(arr: np.ndarray, floating: bool) -> float:
    """The white level of an image without a declared range: 1 (float images only), 255, 65535
    or 2^31 - 1 (Pillow's mode I is signed 32-bit), the smallest that holds the largest finite
    value. Negative values are clipped to black by the caller."""
    top = float(arr[np.isfinite(arr)].max(initial=0.0))
    scales = ((1.0,) if floating else ()) + (255.0, 65535.0, 2.0 ** 31 - 1)
    return next((s for s in scales if top <= s), top)


def decode_rgb(path: str | os.PathLike[str], size: int | None = None,
               resize: Resize = "squash") -> Image.Image:
    """Decode one image to an RGB Pillow image, EXIF orientation applied, made ``size`` square.

    ``squash`` (the default) keeps the whole object in view; augmentation crops later. ``crop``
    and ``pad`` keep the aspect ratio (see ``RESIZE_POLICIES``). The cache build writes its
    ``tobytes()`` straight into the file: one copy of the pixels, no array in between.
    """
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize={resize!r}; choose one of {list(RESIZE_POLICIES)}")
    with Image.open(path) as img:
        if size is not None and img.format == "JPEG":
            # DCT-domain downscale, much faster for big photos; it keeps both sides >= size,
            # which every policy needs (crop: the short side; pad: the long side)
            img.draft("RGB", (size, size))
        img.load()  # forces a full decode, so truncated files fail here, not in epoch 3
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of an upright photo
        img = to_rgb(img)
        if size is None or img.size == (size, size):
            return img
        if resize == "squash":
            return img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        w, h = img.size
        scale = size / (min(w, h) if resize == "crop" else max(w, h))
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
        if resize == "crop":
            left, top = (nw - size) // 2, (nh - size) // 2
            return img.crop((left, top, left + size, top + size))
        out = Image.new("RGB", (size, size))  # black
        out.paste(img, ((size - nw) // 2, (size - nh) // 2))
        return out


def read_rgb(path: str | os.PathLike[str], size: int | None = None,
             resize: Resize = "squash") -> np.ndarray:
    """``decode_rgb`` as an (H, W, 3) uint8 array."""
    return np.asarray(decode_rgb(path, size, resize), dtype=np.uint8)


def _cache_key(paths: Sequence[str], size: int, resize: Resize = "squash") -> str:
    # squash keeps the key of the caches written before policies existed, so they stay valid;
    # v2: 32-bit and float TIFFs decode by their full scale (``to_rgb``), so a cache that holds
    # a TIFF is rebuilt once, and every other cache keeps its key
    version = "v2" if any(str(p).lower().endswith((".tif", ".tiff")) for p in paths) else "v1"
    digest = hashlib.sha256(f"{version}|{size}".encode() if resize == "squash"
                            else f"{version}|{size}|{resize}".encode())
    for p in paths:
        st = os.stat(p)
        digest.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _error_message(errors: list[str]) -> str:
    errors = sorted(errors)
    shown = "\n  ".join(errors[:MAX_LISTED])
    more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
    return f"{len(errors)} image(s) could not be read:\n  {shown}{more}"


def decode_images(paths: Sequence[str], size: int, threads: int | None = None,
                  resize: Resize = "squash") -> np.ndarray:
    """Decode ``paths`` into (N, size, size, 3) uint8 in memory; one DataError lists every bad
    file. For small sets (a request, a test); a dataset goes through ``cached_images``."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    errors: list[str] = []

    def work(i: int) -> None:
        try:
            out[i] = read_rgb(paths[i], size, resize)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's fault
            errors.append(f"{paths[i]}: {type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(max_workers=threads or min(8, (os.cpu_count() or 1) + 1)) as pool:
        list(pool.map(work, range(len(paths))))
    if errors:
        raise DataError(_error_message(errors))
    return out


def _decode_chunk(file: str, offset: int, shape: tuple[int, ...], start: int,
                  paths: Sequence[str], resize: Resize) -> list[str]:
    """Decode ``paths`` into rows ``start:start+len(paths)`` of the ``.npy`` at ``file``.

    Runs in a worker process: each image's bytes go to their row with one ``pwrite``, so its
    memory is one image whatever the size of the set. (A chunk-sized array filled row by row
    and written at once cost a third of the decode rate at 512 px: 50 MB of fresh pages per
    chunk, and two more copies.) Returns the bad files' messages instead of raising, so every
    culprit is listed together.
    """
    size = shape[1]
    row_bytes = int(np.prod(shape[1:]))
    errors = []
    fd = os.open(file, os.O_WRONLY)
    try:
        for i, p in enumerate(paths):
            try:
                data = memoryview(decode_rgb(p, size, resize).tobytes())
            except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's fault
                errors.append(f"{p}: {type(exc).__name__}: {exc}")
                continue
            assert len(data) == row_bytes, (p, len(data))
            at = offset + (start + i) * row_bytes
            while len(data):
                written = os.pwrite(fd, data, at)
                data, at = data[written:], at + written
        _drop_behind(fd, offset + start * row_bytes, len(paths) * row_bytes)  # starts writeback
    finally:
        os.close(fd)
    return errors


def _drop_behind(fd: int, start: int, length: int) -> None:
    """Streaming-write practice (``dd oflag=nocache``): ask the kernel to write these bytes out
    and drop them from the page cache once clean. A car-sized cache (12 GB at 512 px) would
    otherwise fill the page cache with dirty pages, evicting the JPEGs being decoded and
    costing the decode workers a fresh page per 4 KB written."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)


def default_workers() -> int:
    """Decode processes: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def build_cache(paths: Sequence[str], size: int, target: Path, resize: Resize = "squash",
                workers: int | None = None, chunk: int | None = None,
                progress: bool = True) -> Path:
    """Decode ``paths`` into the ``.npy`` file ``target``, streaming, in ``workers`` processes.

    The file is made at full size under a temporary name (sparse until written), each chunk of
    ``chunk`` images (default ``CHUNK``, read at call time so tests can shrink it) is decoded by
    a worker straight into its rows, and the file takes its
    final name only when all rows are in: a killed build leaves no ``target``. Bad files are
    collected over the whole set and reported in one DataError (and nothing is kept).
    """
    from numpy.lib.format import open_memmap
    from tqdm.auto import tqdm

    workers = workers or default_workers()
    chunk = chunk or CHUNK
    shape = (len(paths), size, size, 3)
    row_bytes = size * size * 3
    starts = list(range(0, len(paths), chunk))
    errors: list[str] = []
    with atomic_path(target) as tmp:
        header = open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        offset = header.offset
        del header  # nothing mapped in this process while the workers write
        bar = tqdm(total=len(paths), desc=f"decoding {size}px", unit="img", disable=not progress,
                   leave=False)
        with bar:
            if workers <= 1 or len(starts) <= 1:  # small set: no process start-up cost
                for s in starts:
                    errors += _decode_chunk(str(tmp), offset, shape, s, paths[s:s + chunk], resize)
                    bar.update(len(paths[s:s + chunk]))
            else:
                # spawn: the caller may hold torch/TF threads, which a fork would copy mid-state
                ctx = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(max_workers=min(workers, len(starts)),
                                         mp_context=ctx) as pool:
                    futures = {pool.submit(_decode_chunk, str(tmp), offset, shape, s,
                                           list(paths[s:s + chunk]), resize): s for s in starts}
                    done: list[int] = []  # chunks written; the oldest are clean by now
                    fd = os.open(tmp, os.O_RDONLY)
                    try:
                        for fut in as_completed(futures):
                            errors += fut.result()
                            bar.update(min(chunk, len(paths) - futures[fut]))
                            done.append(futures[fut])
                            if len(done) > 2 * workers:
                                s = done.pop(0)
                                n = min(chunk, len(paths) - s)
                                _drop_behind(fd, offset + s * row_bytes, n * row_bytes)
                    finally:
                        os.close(fd)
        if errors:
            raise DataError(_error_message(errors))
    return target


def cache_path(paths: Sequence[str], size: int, cache_dir: Path, resize: Resize = "squash") -> Path:
    """Where the cache of (``paths``, ``size``, ``resize``) lives; the name records all three."""
    policy = "" if resize == "squash" else f"_{resize}"
    key = _cache_key(paths, size, resize)
    return Path(cache_dir) / f"images_{size}px{policy}_{len(paths)}_{key}.npy"


def build_once(target: Path, build: Callable[[], Any], what: str) -> None:
    """Run ``build`` (which writes ``target`` through ``atomic_path``) unless ``target`` exists.

    Processes that want the same missing file (fold jobs on one machine: a Ray node, two
    shells) build it once: a file lock beside it, which the OS drops when its holder is killed;
    the others wait and read the builder's file. Holding the lock, the builder first removes the
    temporary files a killed build left (no build of this file is running).
    """
    if target.exists():
        return
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.with_name(f".{target.name}.lock")):
        if target.exists():  # built by another process while this one waited
            return
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            log.info("removing %s, left by a killed build (%.0f MB)", stale,
                     stale.stat().st_size / 1e6)
            stale.unlink(missing_ok=True)
        log.info("%s into %s", what, target)
        build()


def cached_images(paths: Sequence[str], size: int, cache_dir: Path, resize: Resize = "squash",
                  workers: int | None = None, progress: bool = True) -> np.ndarray:
    """Return decoded images from ``cache_dir`` (memory-mapped), building the cache on first use.

    The key hashes the paths, their sizes and mtimes, the image size and the resize policy, so an
    edited file, a new size or another policy makes a new cache entry instead of silently reusing
    stale pixels. Processes that want the same missing file build it once (a file lock beside
    it); the builder first removes the temporary file a killed build left.
    """
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize={resize!r}; choose one of {list(RESIZE_POLICIES)}")
    paths = [str(p) for p in paths]
    if not paths:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    target = cache_path(paths, size, cache_dir, resize)
    build_once(target, lambda: build_cache(paths, size, target, resize, workers,
                                           progress=progress),
               f"decoding {len(paths)} images at {size}px ({resize})")
    return np.load(target, mmap_mode="r")


class RowView:
    """Rows ``rows`` of an image array (a memory-mapped cache), read on demand: no copy.

    A fold job's training, held-out and test images are views into the one cache file, so a
    fold holds a batch of pixels, not its share of the set. It answers what the backends ask
    of an array (``len``, ``shape``, ``dtype``, int / slice / index-array lookups) and returns
    plain uint8 arrays, so their code runs unchanged; ``np.asarray(view)`` gathers every row.

    Rows of a cache file are read with ``pread`` rather than through the memory map: the pages
    then live in the OS page cache (shared, dropped under pressure) instead of piling up in the
    process's resident set as an epoch touches every row. Pickles as the cache's file name (a
    DataLoader worker, a Ray task), never as its pixels.
    """

    def __init__(self, base: np.ndarray, rows: Any) -> None:
        self.base = base
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = len(base)
        if len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= n):
            raise IndexError(f"row index out of range for {n} images")
        self._file = getattr(base, "filename", None) if isinstance(base, np.memmap) else None
        self._offset = int(getattr(base, "offset", 0))
        self._row_bytes = int(np.prod(base.shape[1:], dtype=np.int64)) * base.dtype.itemsize
        self._fd: int | None = None

    def pieces(self) -> list[tuple[str, np.ndarray]] | None:
        """[(cache file, rows)]: where these rows are read from; None for an in-memory array
        (what a per-image result cache, the probe's features, is keyed by)."""
        return [(str(self._file), self.rows)] if self._file else None

    def _read(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (ascending) of the cache file, by ``pread``; runs of rows in one call."""
        out = np.empty((len(idx), *self.base.shape[1:]), dtype=self.base.dtype)
        if self._fd is None:
            self._fd = os.open(self._file, os.O_RDONLY)
        flat = memoryview(out.reshape(len(idx), -1)).cast("B")
        rb = self._row_bytes
        i = 0
        while i < len(idx):
            j = i + 1
            while j < len(idx) and idx[j] == idx[j - 1] + 1:
                j += 1
            want, at, got = (j - i) * rb, self._offset + int(idx[i]) * rb, 0
            while got < want:
                n = os.preadv(self._fd, [flat[i * rb + got:j * rb]], at + got)
                if n <= 0:
                    raise OSError(f"{self._file}: short read at row {idx[i]} (file truncated?)")
                got += n
            i = j
        return out

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return self.base.ndim

    def __len__(self) -> int:
        return len(self.rows)

    def _take(self, idx: np.ndarray) -> np.ndarray:
        return self._read(idx) if self._file is not None else np.asarray(self.base[idx])

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` of the base, read in file order (forward on disk), returned in order."""
        if len(idx) > 1 and np.any(idx[1:] < idx[:-1]):
            order = np.argsort(idx, kind="stable")
            out = np.empty((len(idx), *self.base.shape[1:]), dtype=self.base.dtype)
            out[order] = self._take(idx[order])
            return out
        return self._take(idx)

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            return self._take(np.atleast_1d(self.rows[key]))[0][rest]
        return self._gather(self.rows[key])[(slice(None), *rest)]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._gather(self.rows)
        return out if dtype is None else out.astype(dtype, copy=False)

    def __reduce__(self) -> tuple:
        filename = getattr(self.base, "filename", None)
        if filename is None:  # an in-memory array: nothing to reopen, pickle the pixels
            return (RowView, (np.asarray(self.base), self.rows))
        return (_reopen, (str(filename), self.rows))

    def __repr__(self) -> str:
        return f"RowView({len(self.rows)} of {len(self.base)} rows, shape={self.shape})"


class JoinedRows:
    """Row views one after the other, as one array-like: a fold's training rows followed by
    extra rows (pseudo-labelled test images) without copying either into one array."""

    def __init__(self, parts: list[Any]) -> None:
        shapes = {tuple(p.shape[1:]) for p in parts if len(p)}
        if len(shapes) > 1:
            raise ValueError(f"cannot join rows of shapes {sorted(shapes)}")
        self.parts = [p for p in parts if len(p)] or parts[:1]
        self.starts = np.cumsum([0, *(len(p) for p in self.parts)])

    def pieces(self) -> list[tuple[str, np.ndarray]] | None:
        """The parts' (cache file, rows) in order; None if a part is not read from a file."""
        found = [getattr(p, "pieces", lambda: None)() for p in self.parts]
        return None if any(f is None for f in found) else [x for f in found for x in f]

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self.starts[-1]), *self.parts[0].shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            i = int(key) + len(self) if key < 0 else int(key)
            if not 0 <= i < len(self):
                raise IndexError(f"row {key} out of range for {len(self)} rows")
            part = int(np.searchsorted(self.starts, i, side="right")) - 1
            return np.asarray(self.parts[part][i - int(self.starts[part])])[rest]
        idx = np.arange(len(self))[key]
        part = np.searchsorted(self.starts, idx, side="right") - 1
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        for p in np.unique(part):
            mask = part == p
            out[mask] = self.parts[p][idx[mask] - self.starts[p]]
        return out[(slice(None), *rest)]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.concatenate([np.asarray(p) for p in self.parts])
        return out if dtype is None else out.astype(dtype, copy=False)


def _reopen(filename: str, rows: np.ndarray) -> RowView:
    return RowView(np.load(filename, mmap_mode="r"), rows)
