"""The learning-rate curve, written once: a multiplier of the peak LR as a function of the step.

timm applies it through ``torch.optim.lr_scheduler.LambdaLR``; Keras evaluates the same function
into a per-step table (``keras_backend.WarmupSchedule``), so the two frameworks follow one curve.
"""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak LR at ``step``: linear warmup, then cosine/one-cycle/constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "onecycle":  # anneal to 1/10^4 of peak, like torch's OneCycleLR default
        return 1e-4 + (1 - 1e-4) * cosine
    return 0.01 + 0.99 * cosine  # cosine to 1% of peak


def phase_lengths(epochs: int, warmup_epochs: float, steps_per_epoch: int) -> tuple[int, int]:
    """Total and warmup steps of one phase, counted the same way by every backend."""
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total - 1, int(warmup_epochs * steps_per_epoch))
    return total, max(warmup, 1)
