"""The learning-rate curve, written once: a multiplier of the peak LR as a function of the step.

timm applies it through ``torch.optim.lr_scheduler.LambdaLR``; Keras evaluates the same function
into a per-step table (``backbones.keras.optim.WarmupSchedule``), so the two frameworks follow
one curve.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "onecycle", "cyclic", "step", "constant")
STEP_MILESTONES = (0.5, 0.75)  # "step": x0.1 at half and three quarters of the phase
STEP_GAMMA = 0.1
CYCLES = 3  # "cyclic": cosine warm restarts (SGDR), this many cycles per phase


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak LR at ``step`` of ``total``: linear warmup, then

    - cosine: cosine decay to 1 % of the peak;
    - onecycle: cosine annealing to 1/10^4 of the peak (torch's OneCycleLR shape, warmup = its
      rising part);
    - cyclic: cosine warm restarts, ``CYCLES`` equal cycles (SGDR), each down to 1 %;
    - step: x0.1 at 50 % and 75 % of the steps after warmup (multistep);
    - constant.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: choose one of {list(SCHEDULES)}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "step":
        return STEP_GAMMA ** sum(progress >= m for m in STEP_MILESTONES)
    if schedule == "cyclic":
        progress = min(progress * CYCLES, CYCLES - 1e-9) % 1.0
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "onecycle":  # anneal to 1/10^4 of peak, like torch's OneCycleLR default
        return 1e-4 + (1 - 1e-4) * cosine
    return 0.01 + 0.99 * cosine  # cosine (and each cyclic cycle) to 1% of peak


def lr_table(total: int, warmup: int, schedule: str) -> list[float]:
    """``lr_factor`` for every step of a phase and one more, the value of every later step
    (what Keras' schedule looks up)."""
    return [lr_factor(s, total, warmup, schedule) for s in range(total + 1)]


def phase_lengths(epochs: int, warmup_epochs: float, steps_per_epoch: int) -> tuple[int, int]:
    """Total and warmup steps of one phase, counted the same way by every backend."""
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total - 1, int(warmup_epochs * steps_per_epoch))
    return total, max(warmup, 1)
