"""Serving a probe run: one feature pass per image, read by every fold head of the run.

A fine-tuned run's K fold models each look at the image; a probe run's K heads share one frozen
extractor, so ``ProbeRunPredictor.predict_proba`` extracts each image's features once (TTA views
averaged, as in training) and applies the K small heads to them: K times fewer passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from backbones.base import BackboneSpec
from backbones.fold import run_views
from backbones.probe.features import EXTRACTOR_FILE, FeatureExtractor
from backbones.probe.heads import LinearHead, load_head
from oof.errors import DataError


class ProbeRunPredictor:
    """The run's extractor and its fold heads, in fold order."""

    def __init__(self, extractor: FeatureExtractor, heads: list[LinearHead],
                 run_meta: dict[str, Any]) -> None:
        self.extractor, self.heads = extractor, heads
        self.input_size = extractor.spec.input_size
        # fold 0's views for every head: flips and zooms are the same for every fold (random
        # --tta-augment views are drawn per image position, never reproducible when served)
        self.views = run_views(run_meta, {"fold": 0}, self.input_size)

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.extractor.features(images, self.views)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """(K, N, C): each fold head's probabilities, from one feature pass."""
        feats = self.features(images)
        return np.stack([h.predict_proba(feats) for h in self.heads])

    def fold(self, k: int) -> ProbeFoldPredictor:
        return ProbeFoldPredictor(self, k)


class ProbeFoldPredictor:
    """Fold ``k`` alone (``load_predictor``): the per-fold view of a run predictor."""

    def __init__(self, run: ProbeRunPredictor, k: int) -> None:
        self.run, self.k, self.input_size = run, k, run.input_size

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return self.run.heads[self.k].predict_proba(self.run.features(images))


def load_run_predictor(run_meta: dict[str, Any], checkpoints: list[Path],
                       threads: int | None = None, device: str = "cpu") -> ProbeRunPredictor:
    """The heads ``checkpoints`` (fold order) and the extractor saved beside them."""
    import torch

    if not checkpoints:
        raise DataError(f"run {run_meta.get('run')!r}: no fold heads to load")
    if threads:
        torch.set_num_threads(threads)
    spec = BackboneSpec(**run_meta["backbone"])
    path = Path(checkpoints[0]).parent / EXTRACTOR_FILE
    if not path.is_file():
        raise DataError(f"run {run_meta.get('run')!r}: its feature extractor {path} is missing")
    heads = []
    for ck in checkpoints:
        head, meta = load_head(Path(ck))
        if list(meta.get("classes", [])) != list(run_meta["classes"]):
            raise DataError(f"{ck}: class order {meta.get('classes')} != the run's "
                            f"{run_meta['classes']}")
        heads.append(head)
    return ProbeRunPredictor(FeatureExtractor.load(spec, path, device), heads, run_meta)
