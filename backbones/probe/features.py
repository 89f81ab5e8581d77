"""The probe's frozen feature extractor: a timm model without its classifier, built, loaded and
fed exactly as the timm family builds and feeds its models (``backbones.timm``).

Its weights are saved once per run beside the fold heads (``extractor.safetensors``), so a
served run, or a bundle, needs neither the ``--pretrained`` file nor the hub cache; with no
pretrained weights the random extractor is drawn from the run's training seed, so every fold of
the run sees the same features.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from backbones.base import BackboneSpec
from backbones.timm.model import create_model, pick_device
from backbones.timm.serving import save_checkpoint
from backbones.timm.train import Trainer, seed_everything
from oof.config import RunConfig, make_config
from recipe.tta import TTAView

EXTRACTOR_FILE = "extractor.safetensors"


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

    @torch.no_grad()
    def features(self, images: np.ndarray, views: list[TTAView],
                 batch_size: int = 128) -> np.ndarray:
        """(N, D) float32: the model's pooled features, the mean over ``views``."""
        out = []
        for start in range(0, len(images), batch_size):
            batch = np.array(images[start:start + batch_size])
            rows = np.arange(start, start + len(batch))
            total = 0
            for view in views:
                x = self.trainer.to_input(torch.from_numpy(view(batch, rows)))
                with self.trainer._autocast():
                    total = total + self.model(x).float()
                self.passes += 1
            out.append((total / len(views)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)


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
