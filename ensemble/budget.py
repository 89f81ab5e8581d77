"""Stacks under a budget: which candidates enter the stack, by level-2 CV, within a cost limit.

A candidate is a run served one way (``variant``, ``ensemble.variants``) with its own cost and
OOF: each run's K fold models ("folds"), its refit model when it has one ("refit": no OOF of its
own, chosen by its run's OOF) and each subset of its stored TTA views, of either; at most one
candidate per run enters a stack. Every subset is scored by the level-2 CV over the stored folds
of one method (exact search over all valid subsets while they number at most 2^``EXACT_MAX`` - 1,
as many as ``EXACT_MAX`` runs served one way each give; a greedy cost-aware forward selection
beyond); the chosen subset is the best score within the budget, and the front is every point
better than all cheaper ones.

Choosing among many subsets by the same CV that scores them flatters the winner, so
``nested_cv`` scores the rule itself: for each fold k the subset is chosen by CV over the other
folds only, fitted on them, and scores fold k.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ensemble.cost import Cost, Variant, run_cost
from ensemble.evaluate import cross_val_level2, full_proba
from ensemble.stackers import label_free_proba, make_stacker
from oof.errors import ConfigError
from oof.metrics import METRICS, ece, scores
from oof.rundir import Run

log = logging.getLogger(__name__)

EXACT_MAX = 12  # candidates up to which every subset is scored (2^12 - 1 = 4095 subsets)
EXACT_MAX_LEARNED = 6  # the same for a method fitted K times per subset (logreg: seconds each)
# Methods that learn nothing from the rows they are fitted on (fit only reads the class set):
# their level-2 CV OOF is the fitted method's prediction of every row, computed in one pass.
LABEL_FREE = ("mean", "geo")


def exact_limit(method: str) -> int:
    """Candidates up to which ``search`` scores every subset with ``method``."""
    return EXACT_MAX if method in LABEL_FREE else EXACT_MAX_LEARNED


@dataclass(frozen=True)
class Candidate:
    """One way to serve one run: its cost and the OOF / fold-mean test it would give."""

    run: Run  # as the variant serves it (ensemble.variants.variant_run)
    cost: Cost
    variant: Variant = Variant()  # the run's K fold models on all its views, as trained

    @property
    def name(self) -> str:
        return self.run.name if self.variant == Variant() else \
            f"{self.run.name}[{self.variant.label}]"

    @property
    def oof(self) -> np.ndarray:
        return self.run.oof

    @property
    def test(self) -> np.ndarray:
        return self.run.test


def candidates(runs: list[Run], variants: bool = True) -> list[Candidate]:
    """Each run as trained and, with ``variants``, every other way it can be served (refit
    model, TTA view subsets: ``ensemble.variants.run_variants``), a run's candidates in a row."""
    from ensemble.variants import run_variants, variant_run

    out = []
    for r in runs:
        for v in run_variants(r) if variants else [Variant()]:
            vr = variant_run(r, v)
            out.append(Candidate(vr, run_cost(vr), v))
    return out


@dataclass(frozen=True)
class Budget:
    """Limits on passes per image and on milliseconds per image (None: no limit)."""

    passes: float | None = None
    ms: float | None = None

    def allows(self, cost: Cost) -> bool:
        return ((self.passes is None or (cost.passes is not None and cost.passes <= self.passes))
                and (self.ms is None or (cost.ms_per_image is not None
                                         and cost.ms_per_image <= self.ms)))

    def describe(self) -> str:
        parts = ([f"{self.passes:g} passes"] if self.passes is not None else []) + (
            [f"{self.ms:g} ms"] if self.ms is not None else [])
        return " and ".join(parts) + " per image"


@dataclass
class Point:
    """One scored subset of candidates."""

    members: tuple[int, ...]  # candidate indices, ascending
    cost: Cost
    scores: dict[str, float]


def subset_cost(cands: list[Candidate], members: tuple[int, ...]) -> Cost:
    out = Cost(0, 0.0)
    for i in members:
        out = out + cands[i].cost
    return out


def better_key(metric: str) -> Callable[[Point], tuple[float, float, float]]:
    """Sort key, best first: the metric, then log loss, then fewer passes."""
    sign = -1.0 if METRICS[metric] else 1.0

    def key(p: Point) -> tuple[float, float, float]:
        return (sign * p.scores[metric], p.scores["log_loss"],
                float(p.cost.passes if p.cost.passes is not None else np.inf))
    return key


def run_groups(cands: list[Candidate]) -> list[list[int]]:
    """Candidate indices grouped by run, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(cands):
        groups.setdefault(c.run.name, []).append(i)
    return list(groups.values())


def valid_subsets(cands: list[Candidate]) -> list[tuple[int, ...]]:
    """Every subset with at most one candidate per run: by size, then in ascending index order
    (``itertools.combinations``' order, without enumerating the invalid ones)."""
    groups = run_groups(cands)
    out: list[tuple[int, ...]] = []
    for size in range(1, len(groups) + 1):
        out += sorted(tuple(sorted(pick)) for chosen in itertools.combinations(groups, size)
                      for pick in itertools.product(*chosen))
    return out


def subset_count(cands: list[Candidate]) -> int:
    """How many subsets ``valid_subsets`` gives: one candidate or none of each run, not none."""
    return int(np.prod([len(g) + 1 for g in run_groups(cands)])) - 1


def valid_subset(cands: list[Candidate], members: tuple[int, ...]) -> bool:
    """At most one candidate of each run (its fold models, or its refit model, ...)."""
    names = [cands[i].run.name for i in members]
    return len(set(names)) == len(names)


Scorer = Callable[[tuple[int, ...]], dict[str, float]]


def level2_oof(cands: list[Candidate], members: tuple[int, ...], y: np.ndarray,
               folds: np.ndarray, method: str, params: dict[str, Any],
               rows: np.ndarray | None = None) -> np.ndarray:
    """The level-2 CV OOF of ``method`` on a subset, over the stored folds of ``rows`` (all
    rows by default)."""
    n_classes = cands[0].oof.shape[1]
    X = np.hstack([cands[i].oof if rows is None else cands[i].oof[rows] for i in members])
    y_rows, folds_rows = (y, folds) if rows is None else (y[rows], folds[rows])
    if method in LABEL_FREE and not params and len(np.unique(y_rows)) == n_classes:
        return label_free_proba(method, X, n_classes)
    return cross_val_level2(method, make_stacker(method, **params), X, y_rows, folds_rows,
                            n_classes).oof


def cv_scorer(cands: list[Candidate], y: np.ndarray, folds: np.ndarray, method: str,
              params: dict[str, Any], rows: np.ndarray | None = None) -> Scorer:
    """Level-2 CV score of ``method`` on a subset, over the stored folds of ``rows`` (all rows
    by default; the other folds' rows in nested CV), cached per subset."""
    cache: dict[tuple[int, ...], dict[str, float]] = {}
    y_rows = y if rows is None else y[rows]

    def score(members: tuple[int, ...]) -> dict[str, float]:
        if members not in cache:
            oof = level2_oof(cands, members, y, folds, method, params, rows)
            cache[members] = {**scores(y_rows, oof), "ece": ece(y_rows, oof)}
        return cache[members]
    return score


@dataclass
class Search:
    """Every subset scored, the chosen one, and the front."""

    points: list[Point]
    chosen: Point
    exact: bool

    def front(self, metric: str) -> list[Point]:
        return cost_front(self.points, metric)


def cost_front(points: list[Point], metric: str) -> list[Point]:
    """Points better (by ``metric``, then log loss) than every cheaper point, by passes."""
    key = better_key(metric)
    priced = sorted((p for p in points if p.cost.passes is not None),
                    key=lambda p: (p.cost.passes, key(p)))
    out: list[Point] = []
    for p in priced:
        if out and p.cost.passes == out[-1].cost.passes:
            continue  # the best of this price is already in (sorted best first)
        if not out or key(p)[:2] < key(out[-1])[:2]:
            out.append(p)
    return out


def search(cands: list[Candidate], score: Scorer, metric: str, budget: Budget,
           exact_max: int = EXACT_MAX) -> Search:
    """The best-scoring subset within ``budget``: exact over all valid subsets while they are
    at most 2^``exact_max`` - 1, else greedy forward selection by gain per added pass."""
    if not any(budget.allows(c.cost) for c in cands):
        cheapest = min(cands, key=lambda c: (c.cost.passes or 0, c.cost.ms_per_image or 0))
        raise ConfigError(f"budget of {budget.describe()}: no run fits; the cheapest is "
                          f"{cheapest.name} ({cheapest.cost.row()})")
    key = better_key(metric)
    if subset_count(cands) <= 2 ** exact_max - 1:
        points = [Point(m, subset_cost(cands, m), score(m)) for m in valid_subsets(cands)]
        exact = True
    else:
        points = _greedy(cands, score, metric, budget)
        exact = False
    inside = [p for p in points if budget.allows(p.cost)]
    return Search(points, min(inside, key=key), exact)


def _greedy(cands: list[Candidate], score: Scorer, metric: str, budget: Budget) -> list[Point]:
    """Forward selection: start from the best single candidate within the budget, then add the
    one with the best gain in the metric per added pass while one fits and helps."""
    key = better_key(metric)
    seen: dict[tuple[int, ...], Point] = {}

    def point(m: tuple[int, ...]) -> Point:
        if m not in seen:
            seen[m] = Point(m, subset_cost(cands, m), score(m))
        return seen[m]

    singles = [point((i,)) for i in range(len(cands))]
    current = min((p for p in singles if budget.allows(p.cost)), key=key)
    while True:
        grown = [tuple(sorted((*current.members, i))) for i in range(len(cands))
                 if i not in current.members and valid_subset(cands, (*current.members, i))]
        trials = [point(m) for m in grown if budget.allows(subset_cost(cands, m))]

        def gain(p: Point, base: Point = current) -> float:
            extra = max(1, (p.cost.passes or 0) - (base.cost.passes or 0))
            return (key(base)[0] - key(p)[0]) / extra
        better = [p for p in trials if key(p)[:2] < key(current)[:2]]
        if not better:
            return list(seen.values())
        current = max(better, key=gain)


@dataclass
class Nested:
    """The budget rule scored by nested CV: per outer fold, the subset chosen on the others."""

    oof: np.ndarray
    scores: dict[str, float]
    per_fold: list[dict[str, Any]] = field(default_factory=list)


def nested_cv(cands: list[Candidate], y: np.ndarray, folds: np.ndarray, method: str,
              params: dict[str, Any], metric: str, budget: Budget,
              exact_max: int = EXACT_MAX) -> Nested | None:
    """For each fold k: choose the subset by level-2 CV over the other folds' rows (their own
    stored folds), fit ``method`` on those rows, predict fold k. None with fewer than 3 folds
    (the inner CV needs 2)."""
    ks = np.unique(folds)
    if len(ks) < 3:
        return None
    n_classes = cands[0].oof.shape[1]
    out = np.full((len(y), n_classes), np.nan)
    info = []
    for k in ks:
        fit = np.flatnonzero(folds != k)
        held = np.flatnonzero(folds == k)
        inner = search(cands, cv_scorer(cands, y, folds, method, params, fit), metric, budget,
                       exact_max)
        m = inner.chosen.members
        est = make_stacker(method, **params).fit(np.hstack([cands[i].oof[fit] for i in m]),
                                                 y[fit])
        out[held] = full_proba(est, np.hstack([cands[i].oof[held] for i in m]), n_classes)
        info.append({"fold": int(k), "chosen": [cands[i].name for i in m],
                     **inner.chosen.cost.row()})
    return Nested(out, scores(y, out), info)


def fit_predict(cands: list[Candidate], members: tuple[int, ...], y: np.ndarray, method: str,
                params: dict[str, Any]) -> np.ndarray:
    """``method`` fitted on all OOF rows of a subset, applied to its fold-mean test rows."""
    est = make_stacker(method, **params).fit(np.hstack([cands[i].oof for i in members]), y)
    return full_proba(est, np.hstack([cands[i].test for i in members]), cands[0].oof.shape[1])
