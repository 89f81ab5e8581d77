"""The probe's frozen feature extractor: a timm model without its classifier, built, loaded and
fed exactly as the timm family builds and feeds its models (``backbones.timm``).

Its weights are saved once per run beside the fold heads (``extractor.safetensors``), so a
served run, or a bundle, needs neither the ``--pretrained`` file nor the hub cache; with no
pretrained weights the random extractor is drawn from the run's training seed, so every fold of
the run sees the same features.

The features are frozen, so each image needs one pass per view, not one per fold: with
``store=True`` the features of every image of an image cache file (the rows a fold job reads)
are computed once per extractor and view into ``<cache>/features/`` and sliced from there by
every fold, the refit model and any probe run of the same extractor. On CPU a row's features do
not depend on the batch it is computed in, so they equal the per-fold pass bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbones.base import BackboneSpec
from backbones.timm.model import create_model, pick_device
from backbones.timm.serving import save_checkpoint
from backbones.timm.train import Trainer, seed_everything
from oof.atomic import atomic_path
from oof.config import RunConfig, make_config
from oof.images import build_once
from recipe.tta import TTAView

log = logging.getLogger(__name__)
EXTRACTOR_FILE = "extractor.safetensors"
FEATURES_DIR = "features"  # beside the image cache files: <run root>/cache/features/


class FeatureExtractor:
    """Pooled features of a frozen timm model for uint8 RGB images, averaged over TTA views.

    ``passes`` counts forward calls (tests check one pass per batch and view, whatever the
    number of fold heads that read the features).
    """

    def __init__(self, model: torch.nn.Module, spec: BackboneSpec, device: str = "cpu") -> None:
        cfg = make_config(RunConfig, {"backbone": f"timm/{spec.model_name}", "ema": False,
                                      "device": device})
        model.requires_grad_(False)
        # the timm family's own input path (normalisation, device, autocast) feeds the model
        self.trainer = Trainer(model, spec, cfg, pick_device(cfg), 1)
        self.model = self.trainer.model.eval()
        self.spec, self.passes = spec, 0
        self.dim = int(model.num_features)
        self._key: str | None = None

    @classmethod
    def build(cls, spec: BackboneSpec, seed: int, device: str = "cpu") -> FeatureExtractor:
        """From the spec's pretrained source (seeded, so a random extractor is reproducible)."""
        seed_everything(seed)
        return cls(create_model(spec, 0), spec, device)

    @classmethod
    def load(cls, spec: BackboneSpec, path: Path, device: str = "cpu") -> FeatureExtractor:
        """The run's saved extractor (safetensors: loading runs no code)."""
        from safetensors.torch import load_model

        model = create_model(replace(spec, pretrained=""), 0)
        load_model(model, str(path), strict=True, device="cpu")
        return cls(model, spec, device)

    def save(self, path: Path) -> None:
        save_checkpoint(path, self.model, {"backbone": self.spec.to_dict(), "role": "extractor"})

    @property
    def key(self) -> str:
        """What a stored feature depends on besides the pixels: the network (its layers, pooling
        and weights), the input normalisation, torch, the device, mixed precision and the thread
        count (which orders float sums)."""
        if self._key is None:
            h = hashlib.sha256(json.dumps(
                {"model": repr(self.model), "size": self.spec.input_size,
                 "torch": torch.__version__, "device": str(self.trainer.device),
                 "amp": str(self.trainer.amp_dtype), "threads": torch.get_num_threads()},
                sort_keys=True).encode())
            for name, t in [("mean", self.trainer.mean), ("std", self.trainer.std),
                            *sorted(self.model.state_dict().items())]:
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            self._key = h.hexdigest()[:16]
        return self._key

    @staticmethod
    def storable(images: Any, views: list[TTAView]) -> bool:
        """Whether ``features(images, views, store=True)`` reads stored features: rows of image
        cache files, and views that depend on the pixels alone (not random views)."""
        return bool(views) and not any(v.by_row for v in views) and _pieces(images) is not None

    @torch.no_grad()
    def features(self, images: np.ndarray, views: list[TTAView], batch_size: int = 128,
                 store: bool = False) -> np.ndarray:
        """(N, D) float32: the model's pooled features, the mean over ``views``. ``store``: read
        them from the feature store where ``storable`` (computed there on first use)."""
        if not len(images):
            return np.zeros((0, self.dim), dtype=np.float32)
        if store and self.storable(images, views):
            total: Any = 0
            for view in views:  # the same sums, in the same order, as the pass below
                total = total + np.concatenate([self._stored(file, view, batch_size)[rows]
                                                for file, rows in _pieces(images)])
            return total / len(views)
        out = []
        for start in range(0, len(images), batch_size):
            batch = np.array(images[start:start + batch_size])
            rows = np.arange(start, start + len(batch))
            total = 0
            for view in views:
                total = total + self._pass(batch, rows, view)
            out.append((total / len(views)).cpu().numpy())
        return np.concatenate(out)

    def _pass(self, batch: np.ndarray, rows: np.ndarray, view: TTAView) -> torch.Tensor:
        """One forward call: the pooled features of ``view`` of ``batch``."""
        x = self.trainer.to_input(torch.from_numpy(view(batch, rows)))
        with self.trainer._autocast():
            feats = self.model(x).float()
        self.passes += 1
        return feats

    def _stored(self, file: str, view: TTAView, batch_size: int) -> np.ndarray:
        """The features of every image of the image cache ``file`` under ``view`` (memory-mapped),
        computed on first use by one process (the others wait for its file)."""
        target = Path(file).parent / FEATURES_DIR / f"{Path(file).stem}_{self.key}_{view.name}.npy"

        def build() -> None:
            from numpy.lib.format import open_memmap

            images = np.load(file, mmap_mode="r")
            with atomic_path(target) as tmp:
                out = open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(images), self.dim))
                for start in range(0, len(images), batch_size):
                    batch = np.array(images[start:start + batch_size])
                    rows = np.arange(start, start + len(batch))
                    out[start:start + len(batch)] = self._pass(batch, rows, view).cpu().numpy()
                out.flush()
                del out

        what = f"{self.spec.name}: features of {Path(file).name} ({view.name})"
        build_once(target, build, what)
        try:
            feats = np.load(target, mmap_mode="r")
            if feats.shape == (len(np.load(file, mmap_mode="r")), self.dim):
                return feats
            problem = f"shape {feats.shape}"
        except (OSError, ValueError) as exc:  # truncated or edited since it was written
            problem = str(exc)
        log.warning("%s is damaged (%s): computing it again", target, problem)
        target.unlink(missing_ok=True)
        build_once(target, build, what)
        return np.load(target, mmap_mode="r")


def _pieces(images: Any) -> list[tuple[str, np.ndarray]] | None:
    """(image cache file, rows) pieces of ``images`` (``oof.images.RowView``, ``JoinedRows``);
    None for an in-memory array."""
    pieces = getattr(images, "pieces", None)
    return pieces() if pieces is not None else None


def extractor_for(spec: BackboneSpec, checkpoint_dir: Path, seed: int,
                  device: str = "auto") -> FeatureExtractor:
    """The run's extractor: built from the pretrained source and saved beside the fold heads
    by the first fold, read back by the others (every fold would build the same one: same
    source, same seed; two folds saving at once write the same bytes, atomically)."""
    cfg = make_config(RunConfig, {"backbone": f"timm/{spec.model_name}", "device": device})
    device = str(pick_device(cfg))
    path = checkpoint_dir / EXTRACTOR_FILE
    if path.exists():
        return FeatureExtractor.load(spec, path, device)
    extractor = FeatureExtractor.build(spec, seed, device)
    extractor.save(path)
    return extractor
