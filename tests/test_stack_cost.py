"""Level 2 at a price (issue 30, level-2 side): ECE, temperature scaling, the cost of every row,
stacks under a budget with their front and nested-CV score. Synthetic run folders written through
the real contract; no training (the predict.py checks with real models are in test_serve.py)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import binom

from ensemble.budget import (
    Budget,
    Candidate,
    cost_front,
    cv_scorer,
    nested_cv,
    search,
)
from ensemble.calibrate import (
    TemperatureScaled,
    apply_temperature,
    cross_val_temperature,
    fit_temperature,
)
from ensemble.cost import Cost, Variant, meta_cost, run_cost, tta_view_count, variant_cost
from ensemble.evaluate import cross_val_level2, full_proba, level1_matrix
from ensemble.saved import load_stacker
from ensemble.stack import stack_runs
from ensemble.stackers import make_stacker
from oof.errors import ConfigError
from oof.metrics import calibration, ece, ece_floor, log_loss
from oof.rundir import Run, load_run
from tests.synthetic import synthetic_run
from tests.test_stack import N_TEST, Project

FAST = settings(deadline=None, derandomize=True, max_examples=25,
                suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------ ECE


def test_ece_matches_a_hand_computation() -> None:
    # top-label confidences .95 .85 .62 .55 .41, each in its own bin of 1/15: (.9333, 1],
    # (.8, .8667], (.6, .6667], (.5333, .6], (.4, .4667]; right, wrong, right, right, wrong
    p = np.array([[0.95, 0.03, 0.02], [0.85, 0.10, 0.05], [0.20, 0.62, 0.18],
                  [0.25, 0.20, 0.55], [0.30, 0.29, 0.41]])
    y = np.array([0, 1, 1, 2, 0])
    hand = (abs(1 - 0.95) + abs(0 - 0.85) + abs(1 - 0.62) + abs(1 - 0.55) + abs(0 - 0.41)) / 5
    assert ece(y, p) == pytest.approx(hand)
    # two rows in one bin: their gaps average inside the bin before weighting
    q = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7]])
    assert ece(np.array([0, 1, 1]), q) == pytest.approx((2 / 3) * abs(0.5 - 0.9) + (1 / 3) * 0.3)
    # NaN rows (no fold predicted them) are skipped
    assert ece(np.array([0, 1, 1, 0]), np.vstack([q, [np.nan, np.nan]])) == pytest.approx(
        ece(np.array([0, 1, 1]), q))


def test_ece_floor_is_the_exact_chance_ece_of_one_bin() -> None:
    # 200 rows of confidence 0.8 (one bin): a calibrated predictor's ECE is |hits/n - 0.8| with
    # hits ~ Binomial(200, 0.8); its exact mean against the 1,000 draws' (s.e. about 0.0007)
    n, c = 200, 0.8
    k = np.arange(n + 1)
    exact = float((binom.pmf(k, n, c) * np.abs(k / n - c)).sum())
    p = np.tile([c, 1 - c], (n, 1))
    y = np.r_[np.zeros(150, int), np.ones(50, int)]  # 150 right: ECE |0.75 - 0.8| = 0.05
    floor, chance_p = ece_floor(y, p)
    assert floor == pytest.approx(exact, abs=0.003)
    assert chance_p == pytest.approx(2 * binom.cdf(150, n, c), abs=0.03)  # |dev| >= 10 hits
    assert ece_floor(y, p) == (floor, chance_p)  # seeded
    # calibration() hands its ECE to ece_floor (computed once): the same three figures
    assert calibration(y, p) == {"ece": ece(y, p), "ece_floor": floor, "calibration_p": chance_p}
    assert ece_floor(y, p, observed=1.0)[1] == 0.0  # p: draws at least the observed ECE
    # NaN rows are skipped; certainty that is always right is exactly calibrated
    assert ece_floor(np.r_[y, 0], np.vstack([p, [np.nan, np.nan]])) == (floor, chance_p)
    assert ece_floor(np.zeros(5, int), np.tile([1.0, 0.0], (5, 1))) == (0.0, 1.0)


def test_ece_floor_draws_fewer_on_big_sets() -> None:
    """1,000 draws up to 50,000 rows; then rows x draws stays near 50 million (100 at least):
    p is then a multiple of 1/draws."""
    rng = np.random.default_rng(3)
    n = 500_000  # 100 draws
    conf = rng.uniform(0.5, 1.0, n)
    proba = np.stack([conf, 1 - conf], axis=1)
    y = (rng.random(n) >= conf).astype(int)
    floor, p = ece_floor(y, proba)
    assert abs(p * 100 - round(p * 100)) < 1e-9 and floor > 0
    assert ece_floor(y, proba, draws=100) == (floor, p)
    small = ece_floor(y[:40_000], proba[:40_000])
    assert small == ece_floor(y[:40_000], proba[:40_000], draws=1000)


def test_ece_floor_tells_chance_from_miscalibration() -> None:
    rng = np.random.default_rng(3)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        logits = rng.normal(size=(n, 10)) * 2.5
        q = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        return (rng.random((n, 1)) > q.cumsum(axis=1)).sum(axis=1).clip(0, 9), q

    draws = [sample(2000) for _ in range(20)]
    observed = [ece(y, q) for y, q in draws]
    floors, ps = zip(*(ece_floor(y, q) for y, q in draws))
    # calibrated labels: the floor is their ECE's mean, and p rarely says "miscalibrated"
    assert np.mean(floors) == pytest.approx(np.mean(observed), rel=0.15)
    assert sum(p < 0.05 for p in ps) <= 3
    # over- and underconfident versions of the same rows: ECE far above the floor, p ~ 0
    y, q = draws[0]
    for power in (2.0, 0.5):
        bent = q ** power / (q ** power).sum(axis=1, keepdims=True)
        assert ece_floor(y, bent)[1] < 0.001
    # the floor shrinks as 1/sqrt(rows)
    assert ece_floor(*sample(8000))[0] < 0.6 * np.mean(floors)


# ------------------------------------------------------------------------------ temperature


def _logits_case(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = draw(st.integers(12, 60))
    c = draw(st.integers(2, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(0.05, 8.0))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    z = rng.normal(size=(n, c)) * scale
    z[np.arange(n), y] += rng.normal(1.0, 1.0) * scale
    p = np.exp(z - z.max(axis=1, keepdims=True))
    folds = np.arange(n) % 3
    return p / p.sum(axis=1, keepdims=True), y, folds


@given(st.composite(_logits_case)())
@FAST
def test_temperature_never_raises_the_log_loss_it_was_fitted_on(case) -> None:
    p, y, folds = case
    t = fit_temperature(p, y)
    assert log_loss(y, apply_temperature(p, t)) <= log_loss(y, p) + 1e-12
    assert (apply_temperature(p, t).argmax(1) == p.argmax(1)).all()  # accuracy untouched
    cv = cross_val_temperature(p, y, folds, "auto")
    if cv.applied:  # applied only when the honest CV log loss goes down
        assert cv.scores["log_loss"] < log_loss(y, p)
    for k, tk in cv.per_fold.items():  # fold k scaled by the T fitted without fold k
        held = folds == k
        assert tk == fit_temperature(p[~held], y[~held])
        np.testing.assert_allclose(cv.oof[held], apply_temperature(p[held], tk))


def test_temperature_undoes_a_known_overconfidence() -> None:
    """Probabilities made 3x too sharp (logits x 3) are fitted a T near 3."""
    rng = np.random.default_rng(0)
    n, c = 4000, 4
    z = rng.normal(size=(n, c))
    true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(c, p=row) for row in true])
    sharp = apply_temperature(true, 1 / 3)
    assert fit_temperature(sharp, y) == pytest.approx(3.0, rel=0.1)
    cv = cross_val_temperature(sharp, y, np.arange(n) % 5)
    assert cv.applied and cv.scores["log_loss"] < log_loss(y, sharp) - 0.1


# ------------------------------------------------------------------------------ cost


def _tta_views():  # the rule's home moves during issue 29's redesign
    try:
        from recipe.tta import tta_views
    except ImportError:
        from backbones.augment import tta_views
    return tta_views


@pytest.mark.parametrize(("tta", "scales", "augment_views"), [
    ("none", [], 0), ("hflip", [], 0), ("flips", [], 0), ("hflip", [1.15, 1.3], 0),
    ("flips", [1.2], 2), ("none", [], 3)])
def test_view_count_is_the_number_of_views_tta_averages(tta, scales, augment_views) -> None:
    views = _tta_views()(tta, scales, augment_views, "light", 16, 0)
    assert tta_view_count(tta, scales, augment_views) == len(views)


def test_meta_cost_reads_the_recorded_cost_else_folds_times_views(tmp_path: Path) -> None:
    cfg = {"tta": "hflip", "tta_scales": [1.15], "tta_augment": 0}
    assert meta_cost({"folds": 5, "config": cfg}) == Cost(15, None)  # no ms measured: None
    assert meta_cost({"folds": 5, "config": cfg, "passes_per_image": 4,
                      "ms_per_image": 2.5}) == Cost(4, 2.5)
    assert meta_cost({"config": {}}, n_folds=3) == Cost(3, None)
    # an older stack without the keys: the sum of its inputs' meta.json, where still on disk
    for name, meta in (("a", {"folds": 3, "config": cfg}), ("b", {"passes_per_image": 2,
                                                                  "ms_per_image": 1.0})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(json.dumps(meta))
    stack = {"level": 2, "inputs": [{"path": str(tmp_path / "a")}, {"path": str(tmp_path / "b")}]}
    assert meta_cost(stack) == Cost(3 * 3 + 2, None)
    assert meta_cost({**stack, "inputs": [{"path": str(tmp_path / "gone")}]}) == Cost(None, None)


# ------------------------------------------------------------------------------ budget search


def _run(name: str, oof: np.ndarray, y: np.ndarray, folds: np.ndarray) -> Run:
    return Run(Path(name), name, [str(c) for c in range(oof.shape[1])], np.arange(len(y)),
               y.astype(str), y, folds, oof, np.arange(2), oof[:2], "fp", {})


@st.composite
def _budget_case(draw: st.DrawFn):
    r = draw(st.integers(1, 5))
    n, c = 45, 3
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    folds = rng.permutation(np.arange(n) % 3)
    cands = []
    for i in range(r):
        z = rng.normal(size=(n, c))
        z[np.arange(n), y] += rng.uniform(0, 3)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        passes = draw(st.integers(1, 12))
        ms = draw(st.floats(0.5, 20.0))
        cands.append(Candidate(_run(f"r{i}", p, y, folds), Cost(passes, ms)))
    total = sum(c.cost.passes for c in cands)
    budget = Budget(draw(st.integers(min(c.cost.passes for c in cands), total)),
                    draw(st.none() | st.floats(20.0, 100.0)))
    metric = draw(st.sampled_from(["log_loss", "accuracy"]))
    return cands, y, folds, budget, metric


def _brute_force(cands, y, folds, budget, metric):
    """Every subset within the budget (one candidate per run at most) scored by the mean
    blend's level-2 CV; the best."""
    best = None
    for size in range(1, len(cands) + 1):
        for m in itertools.combinations(range(len(cands)), size):
            if len({cands[i].run.name for i in m}) < len(m):
                continue  # two ways of serving one run
            passes = sum(cands[i].cost.passes for i in m)
            ms = sum(cands[i].cost.ms_per_image for i in m)
            if passes > budget.passes or (budget.ms is not None and ms > budget.ms):
                continue
            X = np.hstack([cands[i].oof for i in m])
            s = cross_val_level2("mean", make_stacker("mean"), X, y, folds, 3).scores
            key = (-s[metric] if metric == "accuracy" else s[metric], s["log_loss"], passes)
            if best is None or key < best[0]:
                best = (key, m)
    return best


@given(_budget_case())
@FAST
def test_budget_search_stays_within_budget_and_equals_brute_force(case) -> None:
    cands, y, folds, budget, metric = case
    expect = _brute_force(cands, y, folds, budget, metric)
    score = cv_scorer(cands, y, folds, "mean", {})
    if expect is None:  # nothing fits the ms limit
        with pytest.raises(ConfigError, match="no run fits"):
            search(cands, score, metric, budget)
        return
    found = search(cands, score, metric, budget)
    assert found.exact and len(found.points) == 2 ** len(cands) - 1
    assert found.chosen.members == expect[1]
    assert found.chosen.cost.passes <= budget.passes
    greedy = search(cands, score, metric, budget, exact_max=0)  # the fallback for many runs
    assert not greedy.exact
    assert all(budget.allows(p.cost) for p in greedy.points if len(p.members) > 1)
    assert budget.allows(greedy.chosen.cost)
    # the front: each point strictly better than every cheaper point; the chosen one is on it
    front = found.front(metric)
    sign = -1 if metric == "accuracy" else 1
    for p in front:
        cheaper = [q for q in found.points if q.cost.passes < p.cost.passes]
        assert all((sign * p.scores[metric], p.scores["log_loss"])
                   < (sign * q.scores[metric], q.scores["log_loss"]) for q in cheaper)
    assert [p.cost.passes for p in front] == sorted({p.cost.passes for p in front})
    if budget.ms is None:
        assert found.chosen in front


@st.composite
def _variant_case(draw: st.DrawFn):
    """1-3 runs, each served 1-3 ways (fold models, refit, a view subset), each its own OOF
    and cost (a refit's OOF is its run's: the same rows, fewer passes)."""
    n, c = 45, 3
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    y = np.arange(n) % c
    folds = rng.permutation(np.arange(n) % 3)
    ways = [Variant(), Variant("refit"), Variant("folds", ("identity",))]
    cands = []
    for i in range(draw(st.integers(1, 3))):
        z = rng.normal(size=(n, c))
        z[np.arange(n), y] += rng.uniform(0, 3)
        base = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        for v in ways[:draw(st.integers(1, 3))]:
            p = base
            if v.views is not None:  # another view: other rows
                z2 = z + rng.normal(size=(n, c))
                p = np.exp(z2) / np.exp(z2).sum(1, keepdims=True)
            cands.append(Candidate(_run(f"r{i}", p, y, folds),
                                   Cost(draw(st.integers(1, 12)), draw(st.floats(0.5, 20.0))),
                                   v))
    budget = Budget(draw(st.integers(min(c.cost.passes for c in cands),
                                     sum(c.cost.passes for c in cands))),
                    draw(st.none() | st.floats(10.0, 60.0)))
    return cands, y, folds, budget, draw(st.sampled_from(["log_loss", "accuracy"]))


@given(_variant_case())
@FAST
def test_budget_search_with_variants_keeps_one_per_run_and_equals_brute_force(case) -> None:
    cands, y, folds, budget, metric = case
    expect = _brute_force(cands, y, folds, budget, metric)
    score = cv_scorer(cands, y, folds, "mean", {})
    if expect is None:
        with pytest.raises(ConfigError, match="no run fits"):
            search(cands, score, metric, budget)
        return
    found = search(cands, score, metric, budget)
    per_run = [sum(c.run.name == f"r{i}" for c in cands) for i in range(3)]
    assert found.exact and len(found.points) == np.prod([k + 1 for k in per_run]) - 1
    assert all(len({cands[i].run.name for i in p.members}) == len(p.members)
               for p in found.points)
    assert found.chosen.members == expect[1] and budget.allows(found.chosen.cost)
    greedy = search(cands, score, metric, budget, exact_max=0)
    assert budget.allows(greedy.chosen.cost)
    assert all(len({cands[i].run.name for i in p.members}) == len(p.members)
               for p in greedy.points)


def test_variant_cost_is_the_refit_or_the_share_of_views_kept() -> None:
    meta = {"folds": 3, "config": {"tta": "flips"}, "passes_per_image": 12, "ms_per_image": 6.0,
            "refit": {"passes_per_image": 4, "ms_per_image": 2.0}}
    assert variant_cost(meta, Variant()) == Cost(12, 6.0)
    assert variant_cost(meta, Variant("refit")) == Cost(4, 2.0)
    assert variant_cost(meta, Variant("folds", ("identity",))) == Cost(3, 1.5)
    assert variant_cost(meta, Variant("refit", ("identity", "hflip"))) == Cost(2, 1.0)
    assert variant_cost({**meta, "refit": None}, Variant("refit")) == Cost(None, None)
    for v in (Variant(), Variant("refit"), Variant("folds", ("hflip", "vflip"))):
        assert Variant.from_dict(v.to_dict()) == v
    assert Variant.from_dict(None) == Variant()  # stacks saved before variants
    with pytest.raises(ValueError, match="'folds' or 'refit'"):
        Variant.from_dict({"models": "student"})


@pytest.mark.parametrize("method", ["mean", "geo"])
def test_label_free_fast_path_is_the_level2_cv(method: str) -> None:
    """The search scores mean/geo subsets in one pass: the same numbers as their CV."""
    from ensemble.stackers import label_free_proba

    rng = np.random.default_rng(2)
    n, c = 90, 4
    y = np.arange(n) % c
    folds = rng.permutation(np.arange(n) % 3)
    X = np.hstack([rng.dirichlet(np.ones(c), n) for _ in range(3)])
    cv = cross_val_level2(method, make_stacker(method), X, y, folds, c)
    np.testing.assert_array_equal(label_free_proba(method, X, c), cv.oof)
    cands = [Candidate(_run(f"r{i}", X[:, i * c:(i + 1) * c], y, folds), Cost(1, None))
             for i in range(3)]
    assert cv_scorer(cands, y, folds, method, {})((0, 1, 2)) == {**cv.scores,
                                                                 "ece": ece(y, cv.oof)}


def test_front_keeps_only_points_better_than_every_cheaper_one() -> None:
    from ensemble.budget import Point

    def pt(passes: int, ll: float) -> Point:
        return Point((passes,), Cost(passes, None), {"log_loss": ll, "accuracy": 0.5})
    pts = [pt(3, 0.50), pt(6, 0.55), pt(6, 0.45), pt(9, 0.47), pt(12, 0.40)]
    assert [(p.cost.passes, p.scores["log_loss"]) for p in cost_front(pts, "log_loss")] == [
        (3, 0.50), (6, 0.45), (12, 0.40)]


def test_nested_cv_chooses_on_k_minus_1_folds_and_scores_the_kth() -> None:
    rng = np.random.default_rng(4)
    n, c = 60, 3
    y = np.arange(n) % c
    folds = rng.permutation(np.arange(n) % 3)
    cands = []
    for i, skill in enumerate((2.5, 1.0, 0.2, 1.8)):
        z = rng.normal(size=(n, c))
        z[np.arange(n), y] += skill
        cands.append(Candidate(_run(f"r{i}", np.exp(z) / np.exp(z).sum(1, keepdims=True), y,
                                    folds), Cost(3 + i, None)))
    budget = Budget(9)
    got = nested_cv(cands, y, folds, "mean", {}, "log_loss", budget)
    by_hand = np.full((n, c), np.nan)
    for k in range(3):
        fit, held = folds != k, folds == k
        best = _brute_force([Candidate(_run(x.name, x.oof[fit], y[fit], folds[fit]),
                                       Cost(x.cost.passes, 0.0)) for x in cands],
                            y[fit], folds[fit], budget, "log_loss")[1]
        assert got.per_fold[k]["chosen"] == [cands[i].name for i in best]
        est = make_stacker("mean").fit(np.hstack([cands[i].oof[fit] for i in best]), y[fit])
        by_hand[held] = full_proba(est, np.hstack([cands[i].oof[held] for i in best]), c)
    np.testing.assert_allclose(got.oof, by_hand)
    assert got.scores["log_loss"] == pytest.approx(log_loss(y, by_hand))
    assert nested_cv(cands, y, folds % 2, "mean", {}, "log_loss", budget) is None  # 2 folds


def test_nested_cv_never_lets_the_scored_fold_choose() -> None:
    """'special' is near-perfect on fold 0 only: over all rows it beats 'steady' (log loss 0.46
    against 0.51), without fold 0 it loses (0.69). Fold 0's subset must be chosen without it."""
    n, c = 60, 3
    y = np.arange(n) % c
    folds = np.repeat([0, 1, 2], n // 3)

    def sure(p_true: np.ndarray) -> np.ndarray:
        p = np.repeat(((1 - p_true) / (c - 1))[:, None], c, axis=1)
        p[np.arange(n), y] = p_true
        return p
    steady = sure(np.full(n, 0.6))
    special = sure(np.where(folds == 0, 0.999, 0.5))
    cands = [Candidate(_run("steady", steady, y, folds), Cost(3, None)),
             Candidate(_run("special", special, y, folds), Cost(3, None))]
    budget = Budget(3)  # one run
    whole = search(cands, cv_scorer(cands, y, folds, "mean", {}), "log_loss", budget)
    assert [cands[i].name for i in whole.chosen.members] == ["special"]
    got = nested_cv(cands, y, folds, "mean", {}, "log_loss", budget)
    assert [f["chosen"] for f in got.per_fold] == [["steady"], ["special"], ["special"]]
    np.testing.assert_allclose(got.oof[folds == 0], steady[folds == 0])
    assert got.scores["log_loss"] > whole.chosen.scores["log_loss"]  # the honest score is worse


# ------------------------------------------------------------------------------ stack.py


def _labels(project: Project) -> None:
    truth = project.runs[0].meta["y_test_truth"]
    classes = project.runs[0].classes
    pd.DataFrame({"Id": [f"test_{i:04d}.png" for i in range(N_TEST)],
                  "Category": [classes[t] for t in truth]}).to_csv(
        project.data / "test_labels.csv", index=False)


def test_budgeted_stack_serves_the_chosen_runs_and_shows_cost_and_front(tmp_path: Path) -> None:
    project = Project(tmp_path)
    synthetic_run(project.root, "tta", project.folds, 0.65, 7, N_TEST,
                  meta_extra={"config": {"tta": "hflip"}, "ms_per_image": 4.0})
    _labels(project)
    res = stack_runs(project.cfg(method="mean", compare=False, budget=6, name="cheap"))
    info = json.loads((res.out_dir / "stacker.json").read_text())
    kept = [r["run"] for r in info["runs"]]
    runs = {r.name: load_run(project.root / r.name) for r in project.runs}
    runs["tta"] = load_run(project.root / "tta")
    assert {n: run_cost(r).passes for n, r in runs.items()} == {"good": 3, "weak": 3,
                                                                "noise": 3, "tta": 6}
    assert sum(run_cost(runs[n]).passes for n in kept) <= 6 and "noise" not in kept
    rows = {r["model"]: r for r in res.rows}
    assert rows["tta"]["passes"] == 6 and rows["tta"]["ms_per_image"] == 4.0
    assert rows["good"]["ms_per_image"] is None  # not measured: blank, not 0
    assert rows["stack-mean"]["passes"] == sum(run_cost(runs[n]).passes for n in kept)
    assert "left out by the budget" in rows["noise"]["note"]
    # the submission is the chosen runs' stack
    X, X_test = level1_matrix([runs[n] for n in kept])
    saved = load_stacker(res.out_dir)
    sub = pd.read_csv(res.out_dir / "submission_proba.csv", dtype={"Id": str})
    pos = {i: n for n, i in enumerate(runs["good"].test_ids)}
    np.testing.assert_allclose(saved.predict_proba(X_test)[[pos[i] for i in sub["Id"]]],
                               sub[runs["good"].classes].to_numpy(float), atol=1e-9)
    # the budget row: nested CV; the front with held-out scores; the PNG
    budget_row = rows["budget (mean, nested CV)"]
    assert budget_row["passes"] <= 6 and "scored on the K-th" in budget_row["note"]
    front = res.report["front"]
    assert [p["passes"] for p in front] == sorted(p["passes"] for p in front)
    assert [p["chosen"] for p in front].count("* (optimistic)") == 1
    assert all(p["held_out_accuracy"] is not None for p in front)
    # each point's ECE beside its chance floor, from the same level-2 OOF the search scored
    [top] = [p for p in front if p["chosen"]]
    assert top["ece"] == pytest.approx(res.report["budget"]["chosen_cv_scores"]["ece"], abs=1e-12)
    assert all(p["ece_floor"] > 0 and 0 <= p["calibration_p"] <= 1 for p in front)
    held = {r["model"]: r for r in res.held_out}
    assert held["tta"]["passes"] == 6 and "held_out_ece" in held["good"]
    good = held["good"]
    assert good["held_out_ece_floor"] > 0 and 0 <= good["held_out_calibration_p"] <= 1
    assert (res.out_dir / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (res.out_dir / "report.md").read_text()
    assert "front.png" in md and "nested CV" in md and "ms_per_image" in md
    assert load_run(res.level2_run).meta["passes_per_image"] == rows["stack-mean"]["passes"]
    # a stack over it costs what it serves
    assert run_cost(load_run(res.level2_run)).passes == rows["stack-mean"]["passes"]


def test_budget_refusals_name_the_problem(tmp_path: Path) -> None:
    project = Project(tmp_path)
    before = project.files()
    with pytest.raises(ConfigError, match=r"budget of 2 passes.*no run fits.*'passes': 3"):
        stack_runs(project.cfg(method="mean", compare=False, budget=2))
    with pytest.raises(ConfigError, match=r"--budget-ms 50: no measured ms_per_image.*good"):
        stack_runs(project.cfg(method="mean", compare=False, budget_ms=50))
    assert project.files() == before


def test_temperature_is_applied_when_it_lowers_cv_log_loss_and_served(tmp_path: Path) -> None:
    """An overconfident run (logits x 1/0.3): T > 1 lowers the mean's CV log loss, so it is
    applied; the saved stacker carries it and reproduces the submission; off writes no T."""
    project = Project(tmp_path)
    synthetic_run(project.root, "sharp", project.folds, 0.4, 11, N_TEST, temperature=0.3)
    res = stack_runs(project.cfg(method="mean", compare=False, temperature="auto",
                                 runs=["sharp"], name="calibrated"))
    rows = {r["model"]: r for r in res.rows}
    t = res.report["temperature"]
    assert t["applied"] and t["temperature"] > 1.5
    assert rows["stack-mean+T"]["chosen"] == "*" and rows["stack-mean"]["chosen"] == ""
    assert rows["stack-mean+T"]["log_loss"] < rows["stack-mean"]["log_loss"]
    assert rows["stack-mean+T"]["ece"] < rows["stack-mean"]["ece"]
    assert "applied" in rows["stack-mean+T"]["note"]
    # every ECE has its chance floor beside it: this overconfidence is real, not chance
    sharp = load_run(project.root / "sharp")
    assert (rows["sharp"]["ece_floor"], rows["sharp"]["calibration_p"]) == ece_floor(sharp.y,
                                                                                     sharp.oof)
    assert rows["stack-mean"]["calibration_p"] < 0.001 < rows["stack-mean"]["ece_floor"]
    assert "`ece_floor`: the ECE that exactly" in (res.out_dir / "report.md").read_text()
    saved = load_stacker(res.out_dir)
    assert saved.info["temperature"] == pytest.approx(t["temperature"])
    runs = [load_run(project.root / "sharp")]
    X, X_test = level1_matrix(runs)
    plain = make_stacker("mean").fit(X, runs[0].y).predict_proba(X_test)
    np.testing.assert_allclose(saved.predict_proba(X_test),
                               apply_temperature(plain, t["temperature"]), atol=1e-12)
    sub = pd.read_csv(res.out_dir / "submission_proba.csv", dtype={"Id": str})
    pos = {i: n for n, i in enumerate(runs[0].test_ids)}
    np.testing.assert_allclose(saved.predict_proba(X_test)[[pos[i] for i in sub["Id"]]],
                               sub[runs[0].classes].to_numpy(float), atol=1e-9)
    assert "T = " in (res.out_dir / "report.md").read_text()
    # a --subset of a stack made with --temperature refits T on the kept runs by the same rule
    from ensemble.saved import fit_subset

    both = stack_runs(project.cfg(method="mean", compare=False, temperature="auto",
                                  runs=["sharp", "good"], name="both"))
    sub_fit = fit_subset(both.out_dir, ["sharp"])
    assert isinstance(sub_fit.stacker, TemperatureScaled)
    assert sub_fit.stacker.temperature == pytest.approx(t["temperature"])  # same OOF, same T
    assert sub_fit.level2_scores == pytest.approx(t["cv_scores"])
    assert sub_fit.cost == {"passes": 3, "ms_per_image": None}
    assert sub_fit.full_cost["passes"] == 6
    # off (the default): no row, no T in the saved stacker
    off = stack_runs(project.cfg(method="mean", compare=False, runs=["sharp"],
                                 name="uncalibrated"))
    assert off.report["temperature"] is None and "stack-mean+T" not in [
        r["model"] for r in off.rows]
    assert load_stacker(off.out_dir).info["temperature"] is None
