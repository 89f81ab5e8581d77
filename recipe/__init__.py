"""The training recipe, shared by every backend: the LR curve and the fine-tuning phases.

It sits above the OOF contract (``oof``) and below the backends: both timm and Keras read their
phases and learning rates from here, so one config key means one thing in both frameworks.
"""

from recipe.phases import (
    DEFAULT_HEAD_EPOCHS,
    DEFAULT_LAYER_DECAY,
    Phase,
    Segment,
    SizeStage,
    peak_lr,
    plan_phases,
    plan_segments,
    plan_sizes,
    size_of,
)
from recipe.schedule import SCHEDULES, lr_factor, lr_table, phase_lengths

__all__ = ["DEFAULT_HEAD_EPOCHS", "DEFAULT_LAYER_DECAY", "SCHEDULES", "Phase", "Segment",
           "SizeStage", "lr_factor", "plan_segments", "plan_sizes", "size_of",
           "lr_table", "peak_lr", "phase_lengths", "plan_phases"]
