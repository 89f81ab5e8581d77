"""Precise BatchNorm for torch models: running statistics recomputed on the training rows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from recipe.batches import PooledMoments, bn_chunks


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, trained: nn.Module, images: np.ndarray,
                          to_input: Callable[[torch.Tensor], torch.Tensor],
                          autocast: Callable[[], Any], chunk: int | None = None) -> int:
    """Precise BatchNorm: running statistics become those of ``images``, each image
    weighing the same (``recipe.batches``: chunks of ``BN_CHUNK``, never of one image).

    The same fix as the Keras family's ``recalibrate_batchnorm`` (see why there). Each
    chunk's statistics are read with momentum 1 and pooled by their value counts, spread of
    the chunk means included (``PooledMoments``), so a short last chunk counts by its images
    and a layer's running mean and variance are those of all its inputs at once. Every
    other module stays in eval mode, so dropout and drop-path do not shift the statistics.
    BatchNorm layers whose weights are frozen keep their statistics, and so does every
    layer when there are fewer than 2 images. Returns the count of layers recalibrated.
    ``model`` predicts (the EMA copy with ``ema``); ``trained`` is the model the optimiser
    trained, whose flags say which layers are frozen.
    """
    bns = layers_to_recalibrate(model, trained)
    chunks = bn_chunks(len(images), chunk)
    if not bns or not chunks:
        return 0
    model.eval()
    momenta = [m.momentum for m in bns]
    values: dict[nn.Module, int] = {}  # values per channel of the chunk, per layer

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        values[module] = inputs[0].numel() // inputs[0].shape[1]

    hooks = [m.register_forward_pre_hook(count) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = 1.0  # running statistics := this chunk's
        m.train()
    try:
        pooled = pooled_statistics(model, bns, values, images, chunks, to_input, autocast)
        if len(chunks) > 1:  # one chunk: torch's own statistics are already exact
            for m in bns:
                m.running_mean.copy_(torch.from_numpy(pooled[m].mean))
                m.running_var.copy_(torch.from_numpy(pooled[m].unbiased_var))
    finally:
        for hook in hooks:
            hook.remove()
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.eval()
    return len(bns)


def layers_to_recalibrate(model: nn.Module, trained: nn.Module) -> list[nn.Module]:
    """``model``'s BatchNorm layers with running statistics, less those whose weights are
    frozen as the trained model says (the EMA copy kept its flags from the start)."""
    frozen = {name for name, m in trained.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.weight is not None and not m.weight.requires_grad}
    return [m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and name not in frozen]


def pooled_statistics(model: nn.Module, bns: list[nn.Module], values: dict[nn.Module, int],
                      images: np.ndarray, chunks: list[tuple[int, int]],
                      to_input: Callable[[torch.Tensor], torch.Tensor],
                      autocast: Callable[[], Any]) -> dict[nn.Module, PooledMoments]:
    """Each chunk through ``model`` (its layers in ``bns`` reading the chunk's statistics with
    momentum 1), pooled per layer by the value counts the forward pre-hooks put in ``values``."""
    pooled = {m: PooledMoments() for m in bns}
    for start, stop in chunks:
        x = to_input(torch.from_numpy(np.array(images[start:stop])))
        with autocast():
            model(x)
        for m in bns:
            c = values[m]  # torch's running_var is unbiased: back to the biased one
            pooled[m].add(c, m.running_mean.double().cpu().numpy(),
                          m.running_var.double().cpu().numpy() * ((c - 1) / c))
    return pooled
