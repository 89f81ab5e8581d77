"""The two metrics every table in foldstack reports, computed one way everywhere."""

from __future__ import annotations

import numpy as np

EPS = 1e-15


def accuracy(y: np.ndarray, proba: np.ndarray) -> float:
    """Share of rows whose arg-max class is the label (rows with NaN are skipped)."""
    ok = ~np.isnan(proba).any(axis=1)
    if not ok.any():
        return float("nan")
    return float((proba[ok].argmax(axis=1) == np.asarray(y)[ok]).mean())


def log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    """Multiclass log loss of the true class, probabilities clipped at 1e-15 as Kaggle does."""
    ok = ~np.isnan(proba).any(axis=1)
    if not ok.any():
        return float("nan")
    p = np.clip(proba[ok][np.arange(ok.sum()), np.asarray(y)[ok]], EPS, 1.0)
    return float(-np.log(p).mean())


def scores(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    return {"accuracy": accuracy(y, proba), "log_loss": log_loss(y, proba)}
