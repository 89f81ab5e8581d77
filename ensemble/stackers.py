"""Level-2 stackers as scikit-learn estimators.

Every stacker takes ``X`` = the level-1 probability matrices of R runs side by side, shape
(n, R * C), each block of C columns in the class order of ``classes_`` (the columns
``<run>__<class>`` of the runs, concatenated). ``MeanBlend`` and ``GreedyEnsemble`` rely on that
block structure; ``LogRegStacker`` and ``LightGBMStacker`` treat the columns as plain features.

Conventions of ``sklearn.base.BaseEstimator``: ``__init__`` only stores keyword arguments, ``fit``
validates and returns ``self``, learned attributes end in ``_``, ``classes_`` orders the columns
of ``predict_proba``. Any inner cross-validation (C of the logistic regression, early stopping of
LightGBM) uses only the rows given to ``fit``, so when ``ensemble.evaluate`` passes the rows of
the other folds, nothing of the held-out fold is seen.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from oof.errors import ConfigError

log = logging.getLogger(__name__)

EPS = 1e-15
LOG_FLOOR = 1e-6  # log-probability features are clipped here: a 1e-30 is no surer than 1e-6
# Row-wise passes go through the rows in blocks of this many: a block's temporaries (a few MB)
# are reused from malloc's heap and stay in cache, where whole-column temporaries of a 1.5M-row
# OOF (60-600 MB each) were mapped and zeroed afresh by every numpy operation. Memory above the
# data stays bounded by the CV's two row buffers (bench/stack_scale.py).
ROW_BLOCK = 16_384


def _row_blocks(n: int) -> Iterator[slice]:
    """Consecutive slices covering ``range(n)``, ``ROW_BLOCK`` rows each (the last shorter)."""
    size = ROW_BLOCK
    return (slice(a, min(n, a + size)) for a in range(0, n, size))


def _blocks(X: np.ndarray, n_classes: int, who: str) -> np.ndarray:
    """(n, R*C) -> (n, R, C); refuse a width that is not whole blocks of C classes."""
    n, width = X.shape
    if n_classes < 1 or width % n_classes:
        raise ValueError(
            f"{who}: X has {width} columns, not a whole number of blocks of {n_classes} class "
            "probabilities (expected the runs' probability matrices side by side)"
        )
    return X.reshape(n, width // n_classes, n_classes)


def _normalise(p: np.ndarray) -> np.ndarray:
    """Rows summing to 1; an all-zero row becomes uniform rather than NaN."""
    s = p.sum(axis=1, keepdims=True)
    out = np.divide(p, s, out=np.full_like(p, 1.0 / p.shape[1]), where=s > 0)
    return out


def _inner_splits(y: np.ndarray, n_splits: int, seed: int | None) -> StratifiedKFold | None:
    """Stratified inner folds, fewer when a class is small; None when not even 2 are possible."""
    _, counts = np.unique(y, return_counts=True)
    k = min(n_splits, int(counts.min()) if len(counts) else 0)
    if k < 2 or len(counts) < 2:
        return None
    return StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)


class _Stacker(ClassifierMixin, BaseEstimator):
    """Shared predict/validation: ``predict`` is the arg-max of ``predict_proba``."""

    def _fit_start(self, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        if self.__sklearn_tags__().input_tags.positive_only and len(X) and X.min() < 0:
            raise ValueError(f"Negative values in data passed to {type(self).__name__}: "
                             "expected probabilities")
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        return X, y_idx

    def _check_X(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=[np.float64, np.float32])

    def predict(self, X: Any) -> np.ndarray:
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]


class _WeightedBlend(_Stacker):
    """A fixed weight per run: ``predict_proba`` is the weighted mean of the runs' blocks."""

    def predict_proba(self, X: Any) -> np.ndarray:
        X = self._check_X(X)
        P = _blocks(X, len(self.classes_), type(self).__name__)
        out = np.empty((len(X), len(self.classes_)))
        for rows in _row_blocks(len(X)):
            out[rows] = _normalise(np.einsum("nrc,r->nc", P[rows], self.weights_))
        return out


class MeanBlend(_WeightedBlend):
    """Average of the runs' probabilities, optionally weighted (weights need not sum to 1).

    Nothing is learned from the labels, so its OOF score needs no CV, but it goes through the same
    path as the others to keep one code path.
    """

    def __init__(self, *, weights: tuple[float, ...] | None = None) -> None:
        self.weights = weights

    def __sklearn_tags__(self):  # noqa: ANN204 - sklearn's Tags type
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        return tags

    def fit(self, X: Any, y: Any) -> MeanBlend:
        X, _ = self._fit_start(X, y)
        n_runs = _blocks(X, len(self.classes_), "MeanBlend").shape[1]
        w = np.ones(n_runs) if self.weights is None else np.asarray(self.weights, np.float64)
        if w.shape != (n_runs,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"MeanBlend: weights={self.weights!r} must be {n_runs} "
                             "non-negative numbers, not all 0 (one per run)")
        self.n_runs_ = n_runs
        self.weights_ = w / w.sum()
        return self


class OptimizedBlend(_WeightedBlend):
    """Blend weights that minimise the OOF log loss: non-negative, summing to one (SLSQP).

    The blend's log loss depends only on each run's true-class probability (rows sum to 1), so
    one evaluation costs O(n * R) and the fit is cheap at any size. Convex in the weights: the
    optimum is unique up to ties, and a useless run gets weight ~0.
    """

    def __init__(self, *, max_iter: int = 200, tol: float = 1e-9) -> None:
        self.max_iter = max_iter
        self.tol = tol

    def __sklearn_tags__(self):  # noqa: ANN204
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        return tags

    def fit(self, X: Any, y: Any) -> OptimizedBlend:
        from scipy.optimize import minimize

        X, yi = self._fit_start(X, y)
        P = _blocks(X, len(self.classes_), "OptimizedBlend")
        n, n_runs, _ = P.shape
        q = P[np.arange(n), :, yi].astype(np.float64) / np.maximum(P.sum(axis=2), EPS)

        def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
            m = np.maximum(q @ w, EPS)
            return float(-np.log(m).mean()), -(q.T @ (1.0 / m)) / n  # no (n, R) temporary

        res = minimize(loss, np.full(n_runs, 1.0 / n_runs), jac=True, method="SLSQP",
                       bounds=[(0.0, 1.0)] * n_runs,
                       constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0,
                                     "jac": lambda w: np.ones_like(w)}],
                       options={"maxiter": self.max_iter, "ftol": self.tol})
        w = np.clip(res.x, 0.0, None)
        self.weights_ = w / w.sum() if w.sum() > 0 else np.full(n_runs, 1.0 / n_runs)
        self.n_runs_, self.n_iter_ = n_runs, int(res.nit)
        return self


class GeometricMean(_Stacker):
    """Geometric (log-space) mean of the runs' probabilities, renormalised per row.

    Nothing learned: a run sure of a class must be contradicted by the others in log space, so a
    confident, well calibrated run weighs more than in the arithmetic mean.
    """

    def __sklearn_tags__(self):  # noqa: ANN204
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        return tags

    def fit(self, X: Any, y: Any) -> GeometricMean:
        X, _ = self._fit_start(X, y)
        self.n_runs_ = _blocks(X, len(self.classes_), "GeometricMean").shape[1]
        self.weights_ = np.full(self.n_runs_, 1.0 / self.n_runs_)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        X = self._check_X(X)
        P = _blocks(X, len(self.classes_), "GeometricMean")
        out = np.empty((len(X), len(self.classes_)))
        for rows in _row_blocks(len(X)):
            out[rows] = _softmax(np.log(np.clip(P[rows], LOG_FLOOR, None)).mean(axis=1))
        return out


class RankMean(_Stacker):
    """Mean of the runs' per-class ranks (empirical CDF over the fitted rows), renormalised.

    Ranks ignore each run's calibration: only the order of its scores counts, as in Kaggle rank
    averaging. The CDF of each column is kept as ``n_quantiles`` quantiles of the fitted rows,
    so a new row is ranked against the training distribution (not against the other rows it
    comes with) and memory stays fixed at any size; they are computed on at most
    ``max_rows`` rows drawn with ``random_state`` (a 1001-point CDF needs no more, and the fit
    then costs the same at 15k or 1.5M rows). Its outputs are scores, not calibrated
    probabilities: expect a poor log loss, judge it by accuracy / macro F1.
    """

    def __init__(self, *, n_quantiles: int = 1001, max_rows: int = 100_000,
                 random_state: int | None = 0) -> None:
        self.n_quantiles = n_quantiles
        self.max_rows = max_rows
        self.random_state = random_state

    def __sklearn_tags__(self):  # noqa: ANN204
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        return tags

    def fit(self, X: Any, y: Any) -> RankMean:
        X, _ = self._fit_start(X, y)
        self.n_runs_ = _blocks(X, len(self.classes_), "RankMean").shape[1]
        levels = np.linspace(0.0, 1.0, max(2, int(self.n_quantiles)))
        if len(X) > self.max_rows:
            rng = np.random.default_rng(self.random_state)
            X = X[np.sort(rng.choice(len(X), int(self.max_rows), replace=False))]
        self.quantiles_ = np.quantile(X, levels, axis=0).T  # (R*C, q)
        self.weights_ = np.full(self.n_runs_, 1.0 / self.n_runs_)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        X = self._check_X(X)
        C = len(self.classes_)
        _blocks(X, C, "RankMean")
        grid = np.linspace(0.0, 1.0, self.quantiles_.shape[1])
        out = np.empty((len(X), C))
        for rows in _row_blocks(len(X)):
            ranks = np.empty((rows.stop - rows.start, X.shape[1]))
            for j in range(X.shape[1]):  # piecewise-linear CDF of column j: O(n log q)
                ranks[:, j] = np.interp(X[rows, j], self.quantiles_[j], grid)
            out[rows] = _normalise(_blocks(ranks, C, "RankMean").mean(axis=1) + EPS)
        return out


class GreedyEnsemble(_WeightedBlend):
    """Ensemble selection with replacement (Caruana et al., ICML 2004), as AutoGluon does it.

    Start empty; at each of ``ensemble_size`` steps add the run (repeats allowed) whose addition
    gives the best blend; keep the best prefix of that path; weights = counts / prefix size.
    Repeats let a strong run weigh more; the best prefix stops noise runs from diluting it.
    ``metric`` is 'log_loss' or 'accuracy' (ties in accuracy broken by log loss). Sums are
    updated incrementally, so a step costs O(n * R) (O(n * R * C) for accuracy).
    """

    def __init__(self, *, ensemble_size: int = 25, metric: str = "log_loss") -> None:
        self.ensemble_size = ensemble_size
        self.metric = metric

    def __sklearn_tags__(self):  # noqa: ANN204
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        return tags

    def fit(self, X: Any, y: Any) -> GreedyEnsemble:
        if self.metric not in ("log_loss", "accuracy"):
            raise ValueError(f"GreedyEnsemble: metric={self.metric!r}; "
                             "choose 'log_loss' or 'accuracy'")
        if int(self.ensemble_size) < 1:
            raise ValueError(f"GreedyEnsemble: ensemble_size={self.ensemble_size} must be >= 1")
        X, yi = self._fit_start(X, y)
        P = _blocks(X, len(self.classes_), "GreedyEnsemble")
        n, n_runs, _ = P.shape
        rows = np.arange(n)
        p_true = P[rows, :, yi].astype(np.float64)  # (n, R): each run's true-class probability
        p_sum = P.sum(axis=2, dtype=np.float64)  # (n, R): row sums (1 for probabilities)
        s_true, s_sum = np.zeros(n), np.zeros(n)
        S = np.zeros((n, P.shape[2])) if self.metric == "accuracy" else None
        path: list[int] = []
        losses: list[float] = []
        accs: list[float] = []
        for _ in range(int(self.ensemble_size)):
            ll = np.zeros(n_runs)  # log loss of the blend with each run added
            for b in _row_blocks(n):
                q = (s_true[b, None] + p_true[b]) / np.maximum(s_sum[b, None] + p_sum[b], EPS)
                ll -= np.log(np.clip(q, EPS, 1.0)).sum(axis=0)
            ll /= n
            if S is not None:
                hits = np.zeros(n_runs)
                for b in _row_blocks(n):
                    for r in range(n_runs):
                        hits[r] += ((S[b] + P[b, r]).argmax(axis=1) == yi[b]).sum()
                acc = hits / n
                best = int(np.lexsort((ll, -acc))[0])
                S += P[:, best]
                accs.append(float(acc[best]))
            else:
                best = int(np.argmin(ll))
            s_true += p_true[:, best]
            s_sum += p_sum[:, best]
            path.append(best)
            losses.append(float(ll[best]))
        if S is not None:
            size = int(np.lexsort((losses, -np.asarray(accs)))[0]) + 1
        else:
            size = int(np.argmin(losses)) + 1
        counts = np.bincount(path[:size], minlength=n_runs)
        self.path_ = np.asarray(path)
        self.path_log_loss_ = np.asarray(losses)
        self.path_accuracy_ = np.asarray(accs) if S is not None else None
        self.best_size_ = size
        self.n_runs_ = n_runs
        self.weights_ = counts / size
        return self


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class _PooledLogit:
    """Weighted log-linear pool: logit_c = sum_r w_r * z[r, c] + b_c, L2 on w (strength 1/C).

    One weight per run and one bias per class (R + C parameters), whatever the number of
    classes: a run that carries no signal (constant, or random) costs one weight that the fit
    drives to about 0, so it cannot swamp the good runs. A full multinomial model has C weights
    per input column; with per-column standardisation a near-constant column was blown up to unit
    variance and fitted on noise (level-2 accuracy 0.43 where the good run alone gave 0.70).
    """

    def __init__(self, C: float, n_classes: int, max_iter: int, tol: float) -> None:
        self.C, self.n_classes, self.max_iter, self.tol = C, n_classes, max_iter, tol
        self.theta: np.ndarray | None = None

    def set_C(self, C: float) -> _PooledLogit:
        self.C = C
        return self

    def decision(self, Z: np.ndarray) -> np.ndarray:
        assert self.theta is not None
        R = Z.shape[1]
        return np.einsum("nrc,r->nc", Z, self.theta[:R]) + self.theta[R:]

    def fit(self, Z: np.ndarray, y: np.ndarray) -> _PooledLogit:
        from scipy.optimize import minimize

        n, R, C = Z.shape
        lam = 1.0 / (self.C * n)

        def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
            f, grad = 0.0, np.zeros(R + C)
            for b in _row_blocks(n):
                s = np.einsum("nrc,r->nc", Z[b], theta[:R]) + theta[R:]
                s -= s.max(axis=1, keepdims=True)
                lse = np.log(np.exp(s).sum(axis=1))
                f += float((lse - s[np.arange(len(s)), y[b]]).sum())
                G = np.exp(s - lse[:, None])  # softmax minus the one-hot label:
                G[np.arange(len(G)), y[b]] -= 1.0
                grad[:R] += np.einsum("nrc,nc->r", Z[b], G)
                grad[R:] += G.sum(axis=0)
            grad /= n
            grad[:R] += lam * theta[:R]
            return f / n + 0.5 * lam * float(theta[:R] @ theta[:R]), grad

        start = self.theta if self.theta is not None else np.concatenate(
            [np.full(R, 1.0 / R), np.zeros(C)])
        res = minimize(loss, start, jac=True, method="L-BFGS-B",
                       options={"maxiter": self.max_iter, "gtol": self.tol})
        self.theta, self.n_iter = res.x, int(res.nit)
        return self

    def predict_proba(self, Z: np.ndarray) -> np.ndarray:
        return _softmax(self.decision(Z))


class LogRegStacker(_Stacker):
    """Logistic regression on the runs' log-probabilities (or probabilities).

    ``pooling="run"`` (default): a weighted geometric mean of the runs with a bias per class
    (``_PooledLogit``): it recalibrates and weighs runs, and a useless run gets a weight near 0.
    ``pooling="none"``: scikit-learn's multinomial LogisticRegression on every column (C weights
    per column), for free-form features. Its columns are centred and divided by ONE common scale
    (they share a unit, the log-probability): per-column standardisation turned a near-constant
    run's columns into unit-variance noise. C is chosen among ``Cs`` by stratified
    ``inner_cv``-fold log loss on the rows given to ``fit`` (at most ``max_search_rows`` of them),
    warm-started along increasing C; then one fit on all rows.
    """

    def __init__(self, *, inputs: str = "log", pooling: str = "run",
                 Cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0), inner_cv: int = 3,
                 max_iter: int = 200, tol: float = 1e-4, max_search_rows: int = 20_000,
                 random_state: int | None = 0) -> None:
        self.inputs = inputs
        self.pooling = pooling
        self.Cs = Cs
        self.inner_cv = inner_cv
        self.max_iter = max_iter
        self.tol = tol
        self.max_search_rows = max_search_rows
        self.random_state = random_state

    def __sklearn_tags__(self):  # noqa: ANN204
        tags = super().__sklearn_tags__()
        # log-probabilities need X > 0; the run pool reads X as probability blocks either way
        tags.input_tags.positive_only = self.inputs == "log" or self.pooling == "run"
        return tags

    def _features(self, X: np.ndarray) -> np.ndarray:
        if self.inputs == "log":
            F = np.maximum(X, LOG_FLOOR)  # one temporary, logged in place
            np.log(F, out=F)
        else:
            F = X
        if self.pooling == "run":
            return _blocks(F, len(self.classes_), "LogRegStacker(pooling='run')")
        return (F - self.center_) / self.scale_

    def _model(self, C: float, warm: bool = False) -> Any:
        if self.pooling == "run":
            return _PooledLogit(C, len(self.classes_), self.max_iter, self.tol)
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=C, solver="lbfgs", max_iter=self.max_iter, tol=self.tol,
                                  warm_start=warm)

    def _search_C(self, F: np.ndarray, y: np.ndarray) -> tuple[float, dict[float, float]]:
        Cs = sorted(float(c) for c in self.Cs)
        default = Cs[len(Cs) // 2]
        rng = np.random.default_rng(self.random_state)
        if len(F) > self.max_search_rows:
            keep = np.sort(rng.permutation(len(F))[: self.max_search_rows])
            F, y = F[keep], y[keep]
        cv = _inner_splits(y, self.inner_cv, self.random_state) if len(Cs) > 1 else None
        if cv is None:
            return default, {}
        loss = dict.fromkeys(Cs, 0.0)
        for tr, va in cv.split(np.zeros(len(y)), y):
            model = self._model(Cs[0], warm=True)
            for c in Cs:  # increasing C: each fit starts from the more regularised solution
                if self.pooling == "run":
                    model.set_C(c).fit(F[tr], y[tr])
                    p_true = model.predict_proba(F[va])[np.arange(len(va)), y[va]]
                else:
                    model.set_params(C=c).fit(F[tr], y[tr])
                    p = model.predict_proba(F[va])
                    p_true = p[np.arange(len(va)), np.searchsorted(model.classes_, y[va])]
                loss[c] += float(-np.log(np.clip(p_true, EPS, 1)).mean()) * len(va) / len(F)
        return min(Cs, key=lambda c: loss[c]), loss

    def fit(self, X: Any, y: Any) -> LogRegStacker:
        if self.inputs not in ("log", "proba"):
            raise ValueError(f"LogRegStacker: inputs={self.inputs!r}; choose 'log' or 'proba'")
        if self.pooling not in ("run", "none"):
            raise ValueError(f"LogRegStacker: pooling={self.pooling!r}; choose 'run' or 'none'")
        if not len(self.Cs) or min(self.Cs) <= 0:
            raise ValueError(f"LogRegStacker: Cs={self.Cs!r} must be positive numbers")
        X, yi = self._fit_start(X, y)
        if self.pooling == "none":
            raw = np.log(np.clip(X, LOG_FLOOR, None)) if self.inputs == "log" else X
            self.center_ = raw.mean(axis=0)
            spread = float(np.sqrt(((raw - self.center_) ** 2).mean()))
            self.scale_ = spread if spread > 0 else 1.0
        F = self._features(X)
        if len(self.classes_) < 2:
            self.C_, self.cv_log_loss_, self.model_, self.n_iter_ = float(self.Cs[0]), {}, None, 0
            return self
        # One BLAS thread: under sklearn's OpenMP loss, 2x2 threads on 2 busy cores ran 25x slower.
        with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"):
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.C_, self.cv_log_loss_ = self._search_C(F, yi)
            self.model_ = self._model(self.C_).fit(F, yi)
        self.n_iter_ = int(np.max(getattr(self.model_, "n_iter_", None)
                                  if self.pooling == "none" else self.model_.n_iter))
        if self.n_iter_ >= self.max_iter:
            log.info("LogRegStacker: lbfgs stopped at max_iter=%d (C=%g)", self.max_iter, self.C_)
        if self.pooling == "run":
            self.run_weights_ = self.model_.theta[: F.shape[1]].copy()
        return self

    def pooled_logits(self, X: np.ndarray) -> np.ndarray:
        """Logits of the fitted pool for validated ``X`` (pooling='run'): LightGBM boosts from
        these."""
        with threadpool_limits(1, user_api="blas"):
            return self.model_.decision(self._features(X))

    def predict_proba(self, X: Any) -> np.ndarray:
        X = self._check_X(X)
        if self.model_ is None:
            return np.ones((len(X), 1))
        with threadpool_limits(1, user_api="blas"):
            p = self.model_.predict_proba(self._features(X))
        if p.shape[1] == len(self.classes_):
            return p
        out = np.zeros((len(X), len(self.classes_)))  # a class absent from an inner fit
        out[:, self.model_.classes_] = p
        return out


class LightGBMStacker(_Stacker):
    """LightGBM multiclass on the runs' probabilities, boosted from the log-linear pool.

    With ``base="logreg"`` (default) boosting starts from the logits of a ``LogRegStacker``
    (weighted geometric mean of the runs, fitted on the same rows) and the trees only correct it;
    when boosting does not lower the inner held-out log loss of that start, no tree is kept. So a
    useless run (constant or random probabilities) can cost at most a few noisy corrections, not
    the model: starting from zero with half the columns per tree, an untrained run dragged a good
    run from 0.52 to 0.42 accuracy. ``base=None`` boosts from zero (free-form features).
    Defaults suit a few thousand rows of a few dozen features: small trees (7 leaves, 40 rows a
    leaf), coarse histograms (31 bins), a learning rate of 0.1 and at most ``n_estimators`` = 80
    rounds, so the cost per row is bounded and grows linearly with rows.
    The rows given to ``fit`` are split into ``inner_cv`` stratified folds; the model trains on
    all but one and stops when that one's log loss has not improved for
    ``early_stopping_rounds``. By default that model is kept (one fit, trained on 80% of the
    rows); with ``refit`` it is refitted on all rows for the best number of rounds scaled by the
    extra data (twice the cost). lightgbm is imported inside ``fit`` only.
    """

    def __init__(self, *, base: str | None = "logreg", n_estimators: int = 80,
                 learning_rate: float = 0.1, num_leaves: int = 7, min_child_samples: int = 40,
                 subsample: float = 0.8, colsample_bytree: float = 1.0, reg_lambda: float = 1.0,
                 max_bin: int = 31, early_stopping_rounds: int = 10, inner_cv: int = 5,
                 refit: bool = False, n_jobs: int = 1, random_state: int | None = 0) -> None:
        self.base = base
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.reg_lambda = reg_lambda
        self.max_bin = max_bin
        self.early_stopping_rounds = early_stopping_rounds
        self.inner_cv = inner_cv
        self.refit = refit
        self.n_jobs = n_jobs
        self.random_state = random_state

    def __sklearn_tags__(self):  # noqa: ANN204
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = self.base is not None
        return tags

    def _model(self, n_estimators: int) -> Any:
        from lightgbm import LGBMClassifier

        return LGBMClassifier(
            n_estimators=n_estimators, learning_rate=self.learning_rate,
            num_leaves=self.num_leaves, min_child_samples=self.min_child_samples,
            subsample=self.subsample, subsample_freq=1 if self.subsample < 1 else 0,
            colsample_bytree=self.colsample_bytree, reg_lambda=self.reg_lambda,
            max_bin=self.max_bin, n_jobs=self.n_jobs, random_state=self.random_state,
            verbose=-1,
        )

    def _start(self, X: np.ndarray) -> np.ndarray | None:
        """Raw scores boosting starts from, shaped as LightGBM's (one column for 2 classes)."""
        if self.base_ is None:
            return None
        s = self.base_.pooled_logits(X)
        return s[:, 1] - s[:, 0] if s.shape[1] == 2 else s

    def fit(self, X: Any, y: Any) -> LightGBMStacker:
        import lightgbm as lgb

        if self.base not in ("logreg", None):
            raise ValueError(f"LightGBMStacker: base={self.base!r}; choose 'logreg' or None")
        X, yi = self._fit_start(X, y)
        if self.base == "logreg":  # refused under this stacker's name, not its base's
            _blocks(X, len(self.classes_), "LightGBMStacker(base='logreg')")
        self.model_, self.best_iteration_, self.base_ = None, 0, None
        if len(self.classes_) < 2:  # one class: nothing to learn, predict it with certainty
            return self
        if self.base == "logreg":
            self.base_ = LogRegStacker(random_state=self.random_state).fit(X, yi)
        init = self._start(X)
        cv = _inner_splits(yi, self.inner_cv, self.random_state)
        if cv is None:  # too few rows per class for an inner fold
            if self.base_ is None:  # nothing to start from: fixed rounds, no stopping
                self.model_ = self._model(self.n_estimators).fit(X, yi)
                self.best_iteration_ = int(self.n_estimators)
            return self
        tr, va = next(cv.split(X, yi))
        model = self._model(self.n_estimators)
        stop = [lgb.early_stopping(self.early_stopping_rounds, verbose=False)]
        kw: dict[str, Any] = {}
        if init is not None:
            kw = {"init_score": init[tr], "eval_init_score": [init[va]]}
        if "eval_X" in inspect.signature(model.fit).parameters:  # lightgbm >= 4.7
            model.fit(X[tr], yi[tr], eval_X=(X[va],), eval_y=(yi[va],), callbacks=stop, **kw)
        else:
            model.fit(X[tr], yi[tr], eval_set=[(X[va], yi[va])], callbacks=stop, **kw)
        best = int(model.best_iteration_ or self.n_estimators)
        if init is not None:
            s0 = init[va] if init.ndim == 2 else np.column_stack([np.zeros(len(va)), init[va]])
            p0 = _softmax(s0)[np.arange(len(va)), yi[va]]
            start_loss = float(-np.log(np.clip(p0, EPS, 1)).mean())
            if next(iter(model.best_score_["valid_0"].values())) >= start_loss:  # its log loss
                return self  # boosting did not beat its start on held-out rows: keep the start
        self.best_iteration_ = best
        if self.refit:
            rounds = max(1, round(best * len(X) / len(tr)))
            refit_kw = {} if init is None else {"init_score": init}
            model = self._model(min(rounds, int(self.n_estimators))).fit(X, yi, **refit_kw)
        self.model_ = model
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        X = self._check_X(X)
        if len(self.classes_) < 2:
            return np.ones((len(X), 1))
        start = self._start(X)
        raw = 0.0 if self.model_ is None else self.model_.predict(X, raw_score=True)
        raw = raw + (0.0 if start is None else start)
        if np.ndim(raw) == 1:  # two classes: one logit, for class 1
            raw = np.column_stack([np.zeros(len(X)), raw])
        p = _softmax(raw)
        if p.shape[1] == len(self.classes_):
            return p
        out = np.zeros((len(X), len(self.classes_)))
        out[:, np.asarray(self.model_.classes_, dtype=np.int64)] = p
        return out


def label_free_proba(method: str, X: np.ndarray, n_classes: int) -> np.ndarray:
    """What ``MeanBlend()`` or ``GeometricMean()`` fitted on any rows predicts for ``X`` (they
    learn nothing from the rows), in the same arithmetic without scikit-learn's input checks:
    the budget search scores thousands of subsets this way (ensemble.budget)."""
    P = _blocks(X, n_classes, method)
    out = np.empty((len(X), n_classes))
    w = np.full(P.shape[1], 1.0 / P.shape[1])
    for rows in _row_blocks(len(X)):
        if method == "mean":
            out[rows] = _normalise(np.einsum("nrc,r->nc", P[rows], w))
        elif method == "geo":
            out[rows] = _softmax(np.log(np.clip(P[rows], LOG_FLOOR, None)).mean(axis=1))
        else:
            raise ValueError(f"{method!r} learns from its rows; only 'mean' and 'geo' do not")
    return out


STACKERS: dict[str, type[_Stacker]] = {
    "mean": MeanBlend,
    "geo": GeometricMean,
    "rank": RankMean,
    "blend": OptimizedBlend,
    "greedy": GreedyEnsemble,
    "logreg": LogRegStacker,
    "lightgbm": LightGBMStacker,
}


def make_stacker(name: str, **params: Any) -> _Stacker:
    """A stacker by its short name (the ``--method`` vocabulary)."""
    if name not in STACKERS:
        raise ConfigError(f"--method {name!r}: choose one of {sorted(STACKERS)} or 'auto'")
    return STACKERS[name](**params)
