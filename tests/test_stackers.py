"""Stackers: scikit-learn conformance, known answers, and honesty of the level-2 CV."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.estimator_checks import parametrize_with_checks

from ensemble.evaluate import cross_val_level2
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
from oof.errors import ConfigError
from oof.folds import make_folds
from oof.metrics import log_loss
from tests.stacker_configs import config_id, stack_configurations
from tests.synthetic import synthetic_proba

CONFIGS = stack_configurations()  # every (method, params) stack.py can build
CONFIG_IDS = [config_id(m, p) for m, p in CONFIGS]

# MeanBlend and GreedyEnsemble read X as R blocks of C class probabilities (C = classes in y):
# that is their whole job. These checks feed free-form features whose width is not a multiple
# of the number of classes (e.g. 2 features, 3 classes) or whose columns are not probabilities,
# so fit refuses with a ValueError naming the block shape, or (classifiers_train) the arg-max
# of raw features is not a good classifier. Their pickling, NaN refusal and n_features checks
# are exercised on proper probability blocks in test_stacker_basics below.
_BLOCK_ONLY = {
    name: "X must be whole blocks of class probabilities; this check feeds free-form features"
    for name in (
        "check_estimators_overwrite_params", "check_estimators_fit_returns_self",
        "check_readonly_memmap_input", "check_n_features_in_after_fitting",
        "check_estimators_dtypes", "check_dtype_object", "check_pipeline_consistency",
        "check_estimators_nan_inf", "check_estimators_pickle", "check_classifiers_classes",
        "check_classifiers_train", "check_fit2d_1feature",
    )
}


def _expected_failures(est: BaseEstimator) -> dict[str, str]:
    blocks = isinstance(est, (MeanBlend, GreedyEnsemble, OptimizedBlend, GeometricMean,
                              RankMean)) or (
        isinstance(est, LogRegStacker) and est.pooling == "run") or (
        isinstance(est, LightGBMStacker) and est.base is not None)
    if isinstance(est, OptimizedBlend) or (isinstance(est, LogRegStacker)
                                           and est.pooling == "run"):
        return {**_BLOCK_ONLY, "check_non_transformer_estimators_n_iter":
                _BLOCK_ONLY["check_fit2d_1feature"]}
    return _BLOCK_ONLY if blocks else {}


# Every stacker stack.py can build (the default LogRegStacker, one weight per run, and the
# LightGBMStacker boosted from it read X as blocks too), plus the free-form variants, which go
# through every check. Strict: a check listed above as failing that passes fails the test, so
# the list cannot go stale.
@parametrize_with_checks(
    [make_stacker(m, **p) for m, p in CONFIGS]
    + [LogRegStacker(pooling="none"), LightGBMStacker(base=None)],
    expected_failed_checks=_expected_failures, xfail_strict=True,
)
def test_sklearn_conformance(estimator: BaseEstimator, check,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    # check_array_api_input (array API dispatch on NumPy input must not change results) skips
    # itself unless SCIPY_ARRAY_API is set; set for the check only, scipy's import is unchanged
    monkeypatch.setenv("SCIPY_ARRAY_API", "1")
    check(estimator)


def _level1(n: int = 600, skills: tuple[float, ...] = (0.7, 0.0, 0.0, 0.0), n_classes: int = 4,
            seed: int = 0, temperatures: tuple[float, ...] | None = None):
    """X (n, R*C), y, a stratified fold column: one block per run of known skill."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % n_classes)
    temps = temperatures or (1.0,) * len(skills)
    X = np.hstack([synthetic_proba(y, n_classes, s, rng, t) for s, t in zip(skills, temps)])
    folds = np.empty(n, dtype=np.int64)
    folds[np.argsort(y, kind="stable")] = np.arange(n) % 5
    return X, y, folds


@pytest.mark.parametrize("metric", ["log_loss", "accuracy"])
def test_greedy_picks_the_informative_run(metric: str) -> None:
    X, y, _ = _level1(skills=(0.0, 0.0, 0.7, 0.0))
    g = GreedyEnsemble(metric=metric).fit(X, y)
    assert g.path_[0] == 2 and g.weights_.argmax() == 2
    # Accuracy is coarse: adding a noise run can flip a few training arg-maxes by luck, so it
    # keeps some noise weight; log loss sees that noise dilutes the informative run.
    assert g.weights_[2] >= (0.9 if metric == "log_loss" else 0.5), g.weights_
    assert g.weights_.sum() == pytest.approx(1.0)
    assert g.best_size_ <= g.ensemble_size


def test_greedy_keeps_best_prefix_and_counts() -> None:
    X, y, _ = _level1(skills=(0.6, 0.5, 0.0))
    g = GreedyEnsemble(ensemble_size=10).fit(X, y)
    assert g.path_log_loss_[g.best_size_ - 1] == pytest.approx(g.path_log_loss_.min())
    counts = np.bincount(g.path_[: g.best_size_], minlength=3)
    np.testing.assert_allclose(g.weights_, counts / g.best_size_)


def test_logreg_beats_the_mean_level2() -> None:
    """With noise runs diluting the mean, LR on log-probs must do better, scored honestly."""
    X, y, folds = _level1(skills=(0.7, 0.0, 0.0, 0.0, 0.3), temperatures=(1, 1, 1, 1, 2))
    mean = cross_val_level2("mean", MeanBlend(), X, y, folds, 4)
    lr = cross_val_level2("logreg", LogRegStacker(), X, y, folds, 4)
    assert lr.scores["log_loss"] < mean.scores["log_loss"] - 0.1
    assert lr.scores["accuracy"] >= mean.scores["accuracy"]
    assert not np.isnan(lr.oof).any()


def test_lightgbm_early_stops_and_beats_the_mean() -> None:
    X, y, folds = _level1(n=1000, skills=(0.7, 0.0, 0.0, 0.3))
    lg = cross_val_level2("lightgbm", LightGBMStacker(), X, y, folds, 4)
    mean = cross_val_level2("mean", MeanBlend(), X, y, folds, 4)
    assert lg.scores["log_loss"] < mean.scores["log_loss"]
    assert all(f["boosting_rounds"] < 80 for f in lg.folds)


class _Spy(ClassifierMixin, BaseEstimator):
    """Records the row ids (column 0) it was fitted on; predicts uniform probabilities."""

    fitted: list[set[int]] = []

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        _Spy.fitted.append(set(X[:, 0].astype(int)))
        return self

    def predict_proba(self, X):
        return np.full((len(X), len(self.classes_)), 1 / len(self.classes_))


def test_level2_cv_never_fits_on_the_rows_it_scores() -> None:
    _, y, folds = _level1()
    X = np.arange(len(y), dtype=float)[:, None]
    _Spy.fitted = []
    res = cross_val_level2("spy", _Spy(), X, y, folds, 4)
    assert len(_Spy.fitted) == 5
    for k, rows in enumerate(_Spy.fitted):
        held = set(np.flatnonzero(folds == k))
        assert rows.isdisjoint(held) and rows | held == set(range(len(y)))
    assert not np.isnan(res.oof).any()


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize(("method", "params"), CONFIGS, ids=CONFIG_IDS)
def test_stacker_basics(method: str, params: dict, n_classes: int) -> None:
    """Every stacker stack.py can build, on probability blocks of 2 runs: fit returns self,
    classes_ sorted and ordering the columns, rows summing to 1, an identical pickle round trip,
    and NaN/inf, a wrong width or a wrong feature count refused with a clear error."""
    X, yi, _ = _level1(n=200, skills=(0.6, 0.3), n_classes=n_classes, seed=n_classes)
    names = np.array(["ant", "bee", "cat", "dog"])[:n_classes]
    y = names[yi]
    assert y[0] != names[0]  # the first label seen is not the first class
    est = make_stacker(method, **params)
    assert est.fit(X, y) is est
    assert list(est.classes_) == list(names)
    p = est.predict_proba(X)
    assert p.shape == (len(X), n_classes) and (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert (est.predict(X) == names[p.argmax(axis=1)]).all()
    assert (est.predict(X) == y).mean() > 1 / n_classes + 0.3  # column j is classes_[j]
    assert log_loss(yi, p) < log_loss(yi, np.full_like(p, 1 / n_classes))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(est)).predict_proba(X), p)
    who = type(est).__name__
    with pytest.raises(ValueError, match=f"{who}.*whole number of blocks of {n_classes}"):
        make_stacker(method, **params).fit(X[:, :-1], y)
    width = 2 * n_classes
    with pytest.raises(ValueError, match=f"X has {n_classes} features, but {who} is expecting "
                                         f"{width} features"):
        est.predict_proba(X[:, :n_classes])
    with pytest.raises(ValueError, match=f"X has {width + 1} features"):
        est.predict_proba(np.hstack([X, X[:, :1]]))
    for value, word in ((np.nan, "NaN"), (np.inf, "infinity")):
        bad = X.copy()
        bad[3, 1] = value
        with pytest.raises(ValueError, match=f"Input X contains {word}"):
            make_stacker(method, **params).fit(bad, y)
        with pytest.raises(ValueError, match=f"Input X contains {word}"):
            est.predict_proba(bad)


def _learnable_oof(n: int = 900, n_classes: int = 4, k: int = 5, seed: int = 0):
    """Three runs of similar skill with independent errors, on stored-fold structure: folds
    from ``make_folds`` (stratified, seeded, as run_folds.py makes them), and the rows of fold
    f predicted by "fold model f", whose calibration (temperature) differs from the other
    folds'. Any sound combination of these runs beats the best one alone."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % n_classes)
    folds = make_folds([f"img_{i:05d}.png" for i in range(n)], [f"c{c}" for c in y], k,
                       seed).fold
    blocks = []
    for skill in (0.35, 0.3, 0.3):
        P = np.empty((n, n_classes))
        for f in range(k):
            rows = np.flatnonzero(folds == f)
            temperature = rng.uniform(0.8, 1.25) / (4 * skill)
            P[rows] = synthetic_proba(y[rows], n_classes, skill, rng, temperature)
        blocks.append(P)
    return np.hstack(blocks), y, folds, blocks


# RankMean's outputs are ranks, not calibrated probabilities (see its docstring): it is held to
# its input's accuracy, not to their log loss.
_SCORES_NOT_PROBABILITIES = {"rank"}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("method", "params"), CONFIGS, ids=CONFIG_IDS)
def test_stacker_is_not_worse_than_its_best_input(method: str, params: dict, seed: int) -> None:
    """Scored by the honest level-2 CV over the stored folds, every stacker stack.py can build
    is at least as good as the best of its input runs (log loss within 0.005, accuracy within
    0.005), so a broken stacker fails here (checked: blocks read in the wrong column order, the
    weakest run served alone, LightGBM's start dropped at predict time)."""
    X, y, folds, blocks = _learnable_oof(seed=seed)
    res = cross_val_level2(method, make_stacker(method, **params), X, y, folds, 4)
    assert not np.isnan(res.oof).any()
    best_ll = min(log_loss(y, b) for b in blocks)
    best_acc = max(float((b.argmax(axis=1) == y).mean()) for b in blocks)
    assert res.scores["accuracy"] >= best_acc - 0.005, (res.scores, best_acc)
    if method not in _SCORES_NOT_PROBABILITIES:
        assert res.scores["log_loss"] <= best_ll + 0.005, (res.scores, best_ll)


def test_mean_blend_weights_validated() -> None:
    X, y, _ = _level1(n=100, skills=(0.6, 0.3))
    np.testing.assert_allclose(MeanBlend(weights=(3, 1)).fit(X, y).weights_, [0.75, 0.25])
    with pytest.raises(ValueError, match="one per run"):
        MeanBlend(weights=(1, 1, 1)).fit(X, y)


def test_make_stacker_names_the_choices() -> None:
    assert set(STACKERS) == {"mean", "geo", "rank", "blend", "greedy", "logreg", "lightgbm"}
    with pytest.raises(ConfigError, match="lightgbm"):
        make_stacker("xgboost")


def test_lightgbm_is_imported_lazily() -> None:
    code = ("import sys, ensemble.stackers, ensemble.evaluate; "
            "print('lightgbm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_optimized_blend_weights_on_the_simplex_and_beat_mean_and_best_run() -> None:
    X, y, folds = _level1(n=1000, skills=(0.7, 0.0, 0.4, 0.0), temperatures=(1, 1, 2, 1))
    b = OptimizedBlend().fit(X, y)
    assert b.weights_.min() >= 0 and b.weights_.sum() == pytest.approx(1.0)
    assert b.weights_[[1, 3]].max() < 0.05  # noise runs get ~0
    blend = cross_val_level2("blend", OptimizedBlend(), X, y, folds, 4).scores
    mean = cross_val_level2("mean", MeanBlend(), X, y, folds, 4).scores
    best = min(log_loss(y, X[:, 4 * r:4 * r + 4]) for r in range(4))
    assert blend["log_loss"] < mean["log_loss"] - 0.1 and blend["log_loss"] <= best + 1e-9


def test_geometric_mean_by_hand() -> None:
    X = np.array([[0.5, 0.5, 0.9, 0.1], [0.2, 0.8, 0.2, 0.8]])
    p = GeometricMean().fit(X, [0, 1]).predict_proba(X)
    g = np.sqrt([0.5 * 0.9, 0.5 * 0.1])
    np.testing.assert_allclose(p[0], g / g.sum())
    np.testing.assert_allclose(p[1], [0.2, 0.8])


def test_rank_mean_ignores_calibration_and_follows_order() -> None:
    """Sharpening one run (a monotone change of its scores) leaves the rank mean unchanged."""
    X, y, folds = _level1(n=600, skills=(0.6, 0.5))
    sharp = X.copy()
    sharp[:, :4] = X[:, :4] ** 3
    a = RankMean().fit(X, y).predict_proba(X)
    b = RankMean().fit(sharp, y).predict_proba(sharp)
    np.testing.assert_allclose(a, b, atol=1e-3)
    rank = cross_val_level2("rank", RankMean(), X, y, folds, 4).scores
    best = max((X[:, 4 * r:4 * r + 4].argmax(1) == y).mean() for r in range(2))
    assert rank["accuracy"] >= best - 0.01


@pytest.mark.parametrize("method", ["mean", "geo", "rank", "blend", "greedy", "logreg",
                                    "lightgbm"])
def test_row_blocks_change_nothing(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Row-wise passes run in blocks of ROW_BLOCK rows (bounded temporaries at 1.5M rows):
    blocks of 7 rows, with a short last block, give the same level-2 OOF and test predictions
    as one block holding every row."""
    import ensemble.stackers as stackers

    X, y, folds = _level1(n=403, skills=(0.6, 0.3, 0.0), temperatures=(1, 2, 1))
    X_test = X[::5]
    monkeypatch.setattr(stackers, "ROW_BLOCK", 10**9)
    whole = cross_val_level2(method, make_stacker(method), X, y, folds, 4, X_test=X_test)
    monkeypatch.setattr(stackers, "ROW_BLOCK", 7)
    blocked = cross_val_level2(method, make_stacker(method), X, y, folds, 4, X_test=X_test)
    assert not np.isnan(blocked.oof).any()
    np.testing.assert_allclose(blocked.oof, whole.oof, rtol=0, atol=1e-9)
    np.testing.assert_allclose(blocked.test_per_fold, whole.test_per_fold, rtol=0, atol=1e-9)
    assert blocked.scores["accuracy"] > 0.5  # 4 classes: far above chance
