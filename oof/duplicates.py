"""Near-duplicate images by perceptual hash: groups within train, pairs across train and test.

Photo competitions carry the same object photographed twice and resized or recompressed copies.
Stratified folds put such twins on both sides of a split, so the held-out score (and every stacker
fitted on it) is flattered by memorised images. Grouping them keeps each group inside one fold.

The hash is imagehash's DCT ``phash`` (64 bits): resizing, recompression and small colour changes
move it by a few bits, different photos by about 32. Distances are Hamming distances between the
bit strings, computed in chunks with numpy so 15k x 15k pairs take about a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oof.atomic import atomic_path
from oof.errors import DataError
from oof.images import MAX_LISTED, read_rgb

log = logging.getLogger(__name__)

HASH_BITS = 64
DEFAULT_MAX_DISTANCE = 4  # bits of 64: resized/recompressed copies sit at 0-4, other photos ~32
_DECODE_SIZE = 64  # phash looks at a 32x32 grey DCT: decoding more pixels buys nothing
_CHUNK = 512  # rows per distance block: 512 x N uint64, ~60 MB at car scale


def phash_one(path: str | os.PathLike[str]) -> int:
    """64-bit perceptual hash of one image, decoded as every model sees it (EXIF, RGB)."""
    import imagehash
    from PIL import Image

    bits = imagehash.phash(Image.fromarray(read_rgb(path, _DECODE_SIZE))).hash.ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def _key(paths: Sequence[str]) -> str:
    digest = hashlib.sha256(b"phash-v1")
    for p in paths:
        st = os.stat(p)
        digest.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def perceptual_hashes(paths: Sequence[str | os.PathLike[str]], cache_dir: Path | None = None,
                      threads: int | None = None) -> np.ndarray:
    """uint64 phash per path (cached per file list); one DataError lists every unreadable file."""
    paths = [str(p) for p in paths]
    target = Path(cache_dir) / f"phash_{len(paths)}_{_key(paths)}.npy" if cache_dir else None
    if target is not None and target.exists():
        return np.load(target)
    out = np.zeros(len(paths), dtype=np.uint64)
    errors: list[str] = []

    def work(i: int) -> None:
        try:
            out[i] = phash_one(paths[i])
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's fault
            errors.append(f"{paths[i]}: {type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(max_workers=threads or min(8, (os.cpu_count() or 1) + 1)) as pool:
        list(pool.map(work, range(len(paths))))
    if errors:
        errors.sort()
        raise DataError(f"{len(errors)} image(s) could not be hashed:\n  "
                        + "\n  ".join(errors[:MAX_LISTED]))
    if target is not None:
        with atomic_path(target) as tmp, open(tmp, "wb") as fh:
            np.save(fh, out)
    return out


def close_pairs(a: np.ndarray, b: np.ndarray | None = None,
                max_distance: int = DEFAULT_MAX_DISTANCE) -> tuple[np.ndarray, ...]:
    """Index pairs (i, j, distance) with Hamming distance <= ``max_distance``.

    With ``b`` None the pairs are within ``a`` and i < j; otherwise i indexes ``a``, j ``b``.
    """
    if not 0 <= max_distance < HASH_BITS:
        raise ValueError(f"max_distance={max_distance}: must be within 0..{HASH_BITS - 1}")
    a = np.asarray(a, dtype=np.uint64)
    other = a if b is None else np.asarray(b, dtype=np.uint64)
    rows, cols, dists = [], [], []
    for start in range(0, len(a), _CHUNK):
        block = a[start:start + _CHUNK, None] ^ other[None, :]
        dist = np.bitwise_count(block)
        if b is None:  # keep j > i only: each pair once, never a row with itself
            dist[np.arange(len(dist))[:, None] + start >= np.arange(len(other))[None, :]] = 255
        i, j = np.nonzero(dist <= max_distance)
        rows.append(i + start)
        cols.append(j)
        dists.append(dist[i, j])
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(dists).astype(np.uint8)


def group_ids(hashes: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE) -> np.ndarray:
    """Connected components of the "near-duplicate" graph: one group number per row.

    Transitive on purpose (a~b and b~c puts a, b, c together): a fold split between any two of
    them would leak.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(hashes)
    i, j, _ = close_pairs(hashes, max_distance=max_distance)
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


@dataclass(frozen=True)
class DuplicateReport:
    """Near-duplicate groups within train (size >= 2) and train/test pairs, by id."""

    groups: list[list[str]]
    mixed_label_groups: list[list[str]]  # one image, two labels: a likely labelling error
    train_test_pairs: list[tuple[str, str, int]]  # (train id, test id, distance)
    max_distance: int

    def to_dict(self) -> dict[str, object]:
        return {"max_distance": self.max_distance, "groups": self.groups,
                "mixed_label_groups": self.mixed_label_groups,
                "train_test_pairs": [list(p) for p in self.train_test_pairs]}


def find_duplicates(train_ids: Sequence[str], train_labels: Sequence[str],
                    train_hashes: np.ndarray, test_ids: Sequence[str] = (),
                    test_hashes: np.ndarray | None = None,
                    max_distance: int = DEFAULT_MAX_DISTANCE) -> DuplicateReport:
    """Everything the analysis report and the user need to see about duplicates."""
    groups = group_ids(train_hashes, max_distance)
    members: dict[int, list[int]] = {}
    for row, g in enumerate(groups):
        members.setdefault(int(g), []).append(row)
    multi = sorted((rows for rows in members.values() if len(rows) > 1), key=lambda r: -len(r))
    as_ids = [[str(train_ids[r]) for r in rows] for rows in multi]
    mixed = [[str(train_ids[r]) for r in rows] for rows in multi
             if len({str(train_labels[r]) for r in rows}) > 1]
    pairs: list[tuple[str, str, int]] = []
    if test_hashes is not None and len(test_hashes):
        i, j, d = close_pairs(train_hashes, test_hashes, max_distance)
        pairs = [(str(train_ids[a]), str(test_ids[b]), int(c)) for a, b, c in zip(i, j, d)]
    return DuplicateReport(as_ids, mixed, pairs, max_distance)


def dataset_duplicates(dataset: Any, cache_dir: Path | None = None,
                       max_distance: int = DEFAULT_MAX_DISTANCE
                       ) -> tuple[DuplicateReport, dict[str, str], dict[str, str]]:
    """``find_duplicates`` over a loaded dataset's train and test images (hashes cached), with
    the path (test ids as ``test:<id>``) and training label of every id the report names."""
    train, test = dataset.train, dataset.test
    train_hashes = perceptual_hashes(list(train["path"]), cache_dir)
    test_hashes = perceptual_hashes(list(test["path"]), cache_dir) if len(test) else None
    report = find_duplicates(list(train["id"]), list(train["label"]), train_hashes,
                             list(test["id"]), test_hashes, max_distance)
    named = {i for g in report.groups for i in g} | {p[0] for p in report.train_test_pairs}
    paths = {str(i): str(p) for i, p in zip(train["id"], train["path"]) if str(i) in named}
    tests = {p[1] for p in report.train_test_pairs}
    paths.update({f"test:{i}": str(p) for i, p in zip(test["id"], test["path"])
                  if str(i) in tests})
    labels = {str(i): str(c) for i, c in zip(train["id"], train["label"]) if str(i) in named}
    return report, paths, labels
