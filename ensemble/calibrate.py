"""Temperature scaling of the chosen stacker's output: one scalar T, p -> softmax(log p / T).

Guo et al. (2017): a single temperature fixes most of a classifier's over- or under-confidence
without moving its arg-max (accuracy is unchanged). T is fitted by minimising the log loss; its
honest score is CV over the stored folds: the T scoring fold k is fitted on the other folds'
level-2 OOF rows only. ``stack.py`` applies the T fitted on all OOF rows to the final stacker
(``TemperatureScaled``, pickled with it, so predict.py, serve.py and bundles apply it) when that
CV lowers the level-2 log loss, or always with ``--temperature always``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from oof.metrics import EPS, log_loss, scores

T_BOUNDS = (0.05, 20.0)  # a temperature outside this range means the probabilities are broken


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """Rows of ``proba`` rescaled in log space by ``1 / temperature`` and renormalised."""
    z = np.log(np.clip(np.asarray(proba, dtype=np.float64), EPS, 1.0)) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> float:
    """The T in ``T_BOUNDS`` minimising the log loss of ``apply_temperature(proba, T)`` on these
    rows; 1.0 unless it is strictly lower there than at T = 1 (so it never raises it)."""
    from scipy.optimize import minimize_scalar

    proba, y = np.asarray(proba, dtype=np.float64), np.asarray(y)
    ok = ~np.isnan(proba).any(axis=1)
    proba, y = proba[ok], y[ok]
    if not len(y):
        return 1.0
    logp = np.log(np.clip(proba, EPS, 1.0))
    true = logp[np.arange(len(y)), y]

    def loss(log_t: float) -> float:
        z = logp / np.exp(log_t)
        m = z.max(axis=1)
        lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
        return float((lse - true / np.exp(log_t)).mean())

    res = minimize_scalar(loss, bounds=tuple(np.log(T_BOUNDS)), method="bounded",
                          options={"xatol": 1e-6})
    t = float(np.exp(res.x))
    return t if log_loss(y, apply_temperature(proba, t)) < log_loss(y, proba) else 1.0


@dataclass
class TemperatureCV:
    """Temperature scaling scored by CV over the stored folds, and the T for all rows."""

    oof: np.ndarray  # level-2 OOF, row of fold k scaled by the T fitted without fold k
    per_fold: dict[int, float]
    temperature: float  # fitted on all OOF rows: the one served
    scores: dict[str, float]  # of ``oof``
    before: dict[str, float]  # of the unscaled OOF
    applied: bool
    rule: str

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "applied": self.applied, "rule": self.rule,
                "per_fold": {str(k): t for k, t in self.per_fold.items()},
                "cv_scores": self.scores, "cv_scores_before": self.before}


def cross_val_temperature(oof: np.ndarray, y: np.ndarray, folds: np.ndarray,
                          mode: str = "auto") -> TemperatureCV:
    """Fit T on K-1 folds' rows of ``oof``, apply it to the K-th, for every k; T for serving is
    fitted on all rows. ``mode`` 'auto': applied when the CV log loss is lower than without;
    'always': applied anyway."""
    if mode not in ("auto", "always"):
        raise ValueError(f"temperature mode {mode!r}: choose 'auto' or 'always'")
    out = np.array(oof, dtype=np.float64, copy=True)
    per_fold = {}
    for k in np.unique(folds):
        held = folds == k
        t = fit_temperature(oof[~held], y[~held])
        per_fold[int(k)] = t
        out[held] = apply_temperature(oof[held], t)
    after, before = scores(y, out), scores(y, oof)
    lower = after["log_loss"] < before["log_loss"]
    applied = mode == "always" or lower
    rule = ("--temperature always" if mode == "always" else
            f"CV log loss {after['log_loss']:.4f} {'<' if lower else '>='} "
            f"{before['log_loss']:.4f} without")
    return TemperatureCV(out, per_fold, fit_temperature(oof, y), after, before, applied, rule)


class TemperatureScaled(ClassifierMixin, BaseEstimator):
    """A fitted stacker whose ``predict_proba`` is temperature-scaled by ``temperature``.

    Saved (pickled) as the final stacker, so whatever loads a stack applies the same T.
    """

    def __init__(self, estimator: Any = None, temperature: float = 1.0) -> None:
        self.estimator = estimator
        self.temperature = temperature

    @property
    def classes_(self) -> np.ndarray:
        return self.estimator.classes_

    def fit(self, X: Any, y: Any) -> TemperatureScaled:
        """Fits the wrapped stacker; T stays as given (it is fitted on CV OOF, not here)."""
        self.estimator.fit(X, y)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        return apply_temperature(self.estimator.predict_proba(X), self.temperature)

    def predict(self, X: Any) -> np.ndarray:
        return self.estimator.predict(X)  # T > 0 keeps each row's arg-max
