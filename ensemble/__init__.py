"""Level 2: stackers as scikit-learn estimators, honest CV over the stored folds, submissions.

Nothing here imports torch or tensorflow: stacking reads probability files only. The names
below load on first use (PEP 562), so ``import ensemble.cli`` can set numpy's environment
before numpy loads.
"""

from __future__ import annotations

from typing import Any

__all__ = ["STACKERS", "GeometricMean", "GreedyEnsemble", "LightGBMStacker", "LogRegStacker",
           "MeanBlend", "OptimizedBlend", "RankMean", "make_stacker"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ensemble import stackers

        return getattr(stackers, name)
    raise AttributeError(f"module 'ensemble' has no attribute {name!r}")
