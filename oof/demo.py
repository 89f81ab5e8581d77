"""The bundled demo: scikit-learn's digits, written to disk in the competition layout.

The demo goes through exactly the code path of real photos (CSV, folders, PNG files). Test labels
live in ``test_labels.csv``, read only by ``score_submission``: training cannot see them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from oof.atomic import write_text
from oof.errors import DataError

DEMO_NAME = "demo-digits"
DEMO_TEST_SIZE = 300
DEMO_SEED = 0


def cache_root() -> Path:
    """Where foldstack keeps generated data: $FOLDSTACK_CACHE or ~/.cache/foldstack."""
    return Path(os.environ.get("FOLDSTACK_CACHE", Path.home() / ".cache" / "foldstack"))


def demo_path() -> Path:
    return cache_root() / DEMO_NAME


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
    test_df.to_csv(staging / "test_labels.csv", index=False)
    test_df.assign(Category=0).to_csv(staging / "sample-submission.csv", index=False)
    write_text(staging / ".complete", "digits demo\n")
    if path.exists():
        shutil.rmtree(path)
    os.replace(staging, path)
    return path


def score_submission(submission: str | os.PathLike[str], data: Path | None = None) -> float:
    """Accuracy of a submission on the demo's held-out test labels."""
    data = Path(data) if data else demo_path()
    truth = pd.read_csv(data / "test_labels.csv", dtype=str)
    sub = pd.read_csv(submission, dtype=str)
    if list(sub["Id"]) != list(truth["Id"]):
        raise DataError(f"{submission}: ids differ from the demo's test set")
    return float((sub["Category"].values == truth["Category"].values).mean())


__all__ = ["DEMO_NAME", "cache_root", "demo_path", "ensure_demo", "score_submission"]
