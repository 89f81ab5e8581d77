"""Level 2: stackers as scikit-learn estimators, honest CV over the stored folds, submissions.

Nothing here imports torch or tensorflow: stacking reads probability files only.
"""

from ensemble.stackers import (
    STACKERS,
    GeometricMean,
    GreedyEnsemble,
    LightGBMStacker,
    LogRegStacker,
    MeanBlend,
    OptimizedBlend,
    RankMean,
    make_stacker,
)

__all__ = ["STACKERS", "GeometricMean", "GreedyEnsemble", "LightGBMStacker", "LogRegStacker",
           "MeanBlend", "OptimizedBlend", "RankMean", "make_stacker"]
