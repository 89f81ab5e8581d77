"""Keras weights in and out: one padded batch through the model, fold checkpoints written and
read back, and the predictor a service loads.

Fold checkpoints stay ``.weights.h5``: HDF5 holds arrays only and ``load_weights`` reads them into
a graph rebuilt from the run's spec by ``build_model``; no code or pickle is loaded (a full
``.keras`` model file would deserialise the preprocessing Lambda, which is code). The metadata
(``backbones.fold``'s one schema) sits in the file's HDF5 attributes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backbones.base import BackboneSpec
from backbones.fold import FoldPredictor, PredictingModel, run_views
from backbones.keras.model import load_fold_model
from backbones.keras.runtime import configure_serving, keras
from oof.atomic import atomic_path

if TYPE_CHECKING:
    from backbones.fold import Family

PREDICT_BATCH = 256


def padded(images: np.ndarray, size: int) -> np.ndarray:
    """``images`` with zero images appended up to ``size`` rows, so the traced predict step
    meets a handful of shapes, not one per batch length."""
    pad = size - len(images)
    if pad <= 0:
        return images
    return np.concatenate([images, np.zeros((pad, *images.shape[1:]), dtype=images.dtype)])


def predict_padded(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Probabilities (float64) of one batch of one view, padded to ``batch_size`` rows: the
    batches of a fold's held-out and test predictions (``backbones.fold.predict_views``)."""
    out = model.predict(padded(images, batch_size), batch_size=batch_size, verbose=0)
    return np.asarray(out, dtype=np.float64)[:len(images)]


class ServedModel(PredictingModel):
    """A fold model loaded for a service: ``predict_on_batch`` (``model.predict`` builds an
    iterator per call: measured 140 ms against 5 ms for one small image on CPU), each batch
    padded to a power of two, so a service meets a handful of traced shapes, not one per
    request size. The template's ``FoldPredictor`` loops batches and views over it."""

    def __init__(self, model: keras.Model) -> None:
        self.model = model

    def predict_batch(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        size = min(PREDICT_BATCH, 1 << (len(images) - 1).bit_length())
        out = self.model.predict_on_batch(padded(images, size))
        return np.asarray(out, dtype=np.float64)[:len(images)]


def publish_checkpoint(src: Path, dest: Path, meta: dict[str, Any]) -> None:
    """Copy saved weights into the run atomically, with the fold's metadata inside."""
    import h5py

    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
        with h5py.File(tmp, "a") as fh:
            fh.attrs["foldstack"] = json.dumps(meta)


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The metadata ``publish_checkpoint`` put in a fold checkpoint's HDF5 attributes."""
    import h5py

    with h5py.File(str(path), "r") as fh:
        return json.loads(fh.attrs.get("foldstack", "{}"))


def load_predictor(family: Family, run_meta: dict[str, Any], checkpoint: Path,
                   threads: int | None = None, device: str = "cpu") -> FoldPredictor:
    """Load fold model ``checkpoint`` of the run described by ``run_meta`` (its meta.json).

    ``device`` is accepted for the same signature as the timm family; TensorFlow places the
    model itself (a GPU when it sees one, memory grown on demand). Checkpoints written before
    issue 29 name their weights under ``weights``: ``FoldPredictor`` reads both keys.
    """
    configure_serving(threads)
    meta = read_checkpoint_meta(checkpoint)
    spec = BackboneSpec(**run_meta["backbone"])
    num_classes = len(run_meta["classes"])
    model = load_fold_model(spec, num_classes, checkpoint)
    return FoldPredictor(family, ServedModel(model), run_views(run_meta, meta, spec.input_size),
                         meta, spec.input_size, num_classes)
