"""The demo datasets, written to disk in the competition layout.

- ``demo`` (``demo-digits``): scikit-learn's digits, offline and fast (the tests use it). Its
  single backbones saturate (0.99+), so it cannot show what stacking adds.
- ``demo-fashion``: a stratified subset of Fashion-MNIST from Debian's ``dataset-fashion-mnist``
  package (MIT; ``apt-get download`` + ``dpkg-deb -x``, no root), fetched once at set-up into the
  cache and never committed. Hard enough (single models near 0.87-0.88 at this scale) that
  heterogeneous backbones disagree and level 2 gains.

The demos go through exactly the code path of real photos (CSV, folders, PNG files). Test labels
live in ``test_labels.csv``, read only by the scorers (``score_submission``,
``held_out_labels``): training cannot see them.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from oof.atomic import write_text
from oof.errors import DataError, FetchError

DEMO_NAME = "demo-digits"
DEMO_TEST_SIZE = 300
DEMO_SEED = 0

TEST_LABELS = "test_labels.csv"  # a demo's held-out labels, read only by the scorers here

FASHION_NAME = "demo-fashion"
FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "boot")
FASHION_TRAIN_PER_CLASS = 450  # 4,500 train images from the 60,000 of the package's train set
FASHION_TEST_PER_CLASS = 200  # 2,000 held-out images from its separate 10,000 test images
# --data names of the bundled demos -> their folder name in the cache
DEMO_DATA = {"demo": DEMO_NAME, FASHION_NAME: FASHION_NAME}


def cache_root() -> Path:
    """Where foldstack keeps generated data: $FOLDSTACK_CACHE or ~/.cache/foldstack."""
    return Path(os.environ.get("FOLDSTACK_CACHE", Path.home() / ".cache" / "foldstack"))


def demo_path() -> Path:
    return cache_root() / DEMO_NAME


def resolve_demo(data: str) -> Path | None:
    """The folder of a bundled demo named by ``--data`` (built on first use), else None."""
    if data == "demo":
        return ensure_demo()
    if data == FASHION_NAME:
        return ensure_fashion_demo()
    return None


def _publish(staging: Path, path: Path) -> Path:
    """Put a fully built folder in place in one step, so a killed build leaves no half dataset."""
    if path.exists():
        shutil.rmtree(path)
    os.replace(staging, path)
    return path


def ensure_demo(path: Path | None = None) -> Path:
    """Write the digits demo once (1,497 train / 300 test, stratified) and return its folder."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    path = Path(path) if path else demo_path()
    if (path / ".complete").exists():
        return path
    digits = load_digits()
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    labels = digits.target
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=DEMO_TEST_SIZE, stratify=labels, random_state=DEMO_SEED
    )
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "test_upload").mkdir(parents=True)
    train_rows, test_rows = [], []
    for i in idx_train:
        image_id, cat = f"digit_{i:04d}.png", str(labels[i])
        (staging / "train" / cat).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i], mode="L").save(staging / "train" / cat / image_id)
        train_rows.append((image_id, cat))
    for i in sorted(idx_test):
        image_id = f"digit_{i:04d}.png"
        Image.fromarray(pixels[i], mode="L").save(staging / "test_upload" / image_id)
        test_rows.append((image_id, str(labels[i])))
    pd.DataFrame(train_rows, columns=["Id", "Category"]).to_csv(staging / "train.csv", index=False)
    test_df = pd.DataFrame(test_rows, columns=["Id", "Category"])
    test_df.to_csv(staging / TEST_LABELS, index=False)
    test_df.assign(Category=0).to_csv(staging / "sample-submission.csv", index=False)
    write_text(staging / ".complete", "digits demo\n")
    return _publish(staging, path)


def fashion_sources(dest: Path | None = None) -> Path:
    """Folder of Fashion-MNIST's idx files from the Debian package, fetched once.

    ``apt-get download`` (no root) then ``dpkg-deb -x``; the folder appears whole or not at all.
    """
    dest = Path(dest) if dest else cache_root() / "debian-fashion-mnist"
    if (dest / "train-images-idx3-ubyte.gz").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        for cmd in (["apt-get", "download", FASHION_PACKAGE], None):
            if cmd is None:
                debs = sorted(Path(tmp).glob(f"{FASHION_PACKAGE}_*.deb"))
                if not debs:
                    raise FetchError(f"apt-get download {FASHION_PACKAGE} wrote no .deb")
                cmd = ["dpkg-deb", "-x", str(debs[-1]), str(Path(tmp) / "x")]
            try:
                subprocess.run(cmd, cwd=tmp, check=True, capture_output=True, text=True,
                               timeout=600)
            except (OSError, subprocess.SubprocessError) as exc:
                detail = getattr(exc, "stderr", None) or exc
                raise FetchError(
                    f"could not fetch the Fashion-MNIST demo data ({' '.join(cmd)}: "
                    f"{str(detail).strip()[-300:]}). It comes from Debian's {FASHION_PACKAGE} "
                    "package: on a Debian/Ubuntu machine with apt sources, run 'apt-get update' "
                    f"(as root) and retry, or unpack the package's *-idx*-ubyte.gz files into "
                    f"{dest} yourself; '--data demo' (the digits) needs no download") from exc
        found = sorted((Path(tmp) / "x").rglob("train-images-idx3-ubyte.gz"))
        if not found:
            raise DataError(f"the {FASHION_PACKAGE} package has no train-images-idx3-ubyte.gz")
        shutil.rmtree(dest, ignore_errors=True)  # a folder left without the files
        os.replace(found[0].parent, dest)
    return dest


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format: magic, dims, uint8 data), gzipped or not, as an array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[:3] != b"\0\0\x08":
        raise DataError(f"{path}: not a uint8 idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_arrays(split: str, sources: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 28, 28) and labels of the package's ``train`` or ``t10k`` split."""
    src = fashion_sources(sources)
    return (read_idx(src / f"{split}-images-idx3-ubyte.gz"),
            read_idx(src / f"{split}-labels-idx1-ubyte.gz"))


def _per_class(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random indices of each class, sorted: a stratified, seeded subset."""
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n]
                                   for c in range(len(FASHION_CLASSES))]))


def ensure_fashion_demo(path: Path | None = None, train_per_class: int = FASHION_TRAIN_PER_CLASS,
                        test_per_class: int = FASHION_TEST_PER_CLASS, seed: int = DEMO_SEED,
                        sources: Path | None = None) -> Path:
    """Write the Fashion-MNIST demo once (train from the package's train split, held-out test
    from its t10k split, both stratified) in the competition layout and return its folder."""
    path = Path(path) if path else cache_root() / FASHION_NAME
    if (path / ".complete").exists():
        return path
    rng = np.random.default_rng(seed)
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "test_upload").mkdir(parents=True)
    train_rows, test_rows = [], []
    images, labels = fashion_arrays("train", sources)
    for i in _per_class(labels, train_per_class, rng):
        image_id, cat = f"fashion_{i:05d}.png", FASHION_CLASSES[labels[i]]
        (staging / "train" / cat).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], mode="L").save(staging / "train" / cat / image_id)
        train_rows.append((image_id, cat))
    images, labels = fashion_arrays("t10k", sources)
    for i in _per_class(labels, test_per_class, rng):
        image_id = f"test_{i:05d}.png"
        Image.fromarray(images[i], mode="L").save(staging / "test_upload" / image_id)
        test_rows.append((image_id, FASHION_CLASSES[labels[i]]))
    pd.DataFrame(train_rows, columns=["Id", "Category"]).to_csv(staging / "train.csv", index=False)
    test_df = pd.DataFrame(test_rows, columns=["Id", "Category"])
    test_df.to_csv(staging / TEST_LABELS, index=False)
    test_df.assign(Category=FASHION_CLASSES[0]).to_csv(staging / "sample-submission.csv",
                                                       index=False)
    write_text(staging / ".complete", f"fashion-mnist demo from Debian's {FASHION_PACKAGE}\n")
    return _publish(staging, path)


def held_out_labels(data: Path) -> pd.DataFrame | None:
    """The held-out test labels (``Id``, ``Category``) a demo ships, or None where it has none."""
    path = Path(data) / TEST_LABELS
    if not path.exists():
        return None
    truth = pd.read_csv(path, dtype=str)
    if not {"Id", "Category"} <= set(truth.columns):
        raise DataError(f"{path}: expected columns Id,Category, found {list(truth.columns)}")
    return truth


def score_submission(submission: str | os.PathLike[str], data: Path | None = None) -> float:
    """Accuracy of a submission on the demo's held-out test labels (rows matched by id)."""
    data = Path(data) if data else demo_path()
    truth = held_out_labels(data)
    if truth is None:
        raise DataError(f"{data}: no {TEST_LABELS} to score a submission against")
    sub = pd.read_csv(submission, dtype=str)
    if len(sub) != len(truth) or set(sub["Id"]) != set(truth["Id"]):
        raise DataError(f"{submission}: ids differ from the demo's test set")
    pred = sub.set_index("Id")["Category"].reindex(truth["Id"])
    return float((pred.values == truth["Category"].values).mean())


__all__ = ["DEMO_DATA", "DEMO_NAME", "FASHION_CLASSES", "FASHION_NAME", "cache_root",
           "demo_path", "ensure_demo", "ensure_fashion_demo", "fashion_arrays", "fashion_sources",
           "held_out_labels", "read_idx", "resolve_demo", "score_submission"]
