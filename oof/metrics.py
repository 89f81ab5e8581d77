"""The metrics every table in foldstack reports, computed one way everywhere.

Accuracy and log loss (Kaggle's), plus macro F1 (every class counts the same, whatever its size)
and top-3 accuracy (the label among the 3 most probable classes). Rows with a NaN are skipped:
no fold predicted them.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-15
TOP_K = 3
# name -> True when larger is better; the vocabulary of --metric
METRICS: dict[str, bool] = {"log_loss": False, "accuracy": True, "macro_f1": True, "top3": True}


def _scored(y: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows without NaN (no copy when that is all of them: OOF can have millions)."""
    y = np.asarray(y)
    ok = ~np.isnan(proba).any(axis=1)
    return (y, proba) if ok.all() else (y[ok], proba[ok])


def accuracy(y: np.ndarray, proba: np.ndarray) -> float:
    """Share of rows whose arg-max class is the label (rows with NaN are skipped)."""
    y, proba = _scored(y, proba)
    if not len(y):
        return float("nan")
    return float((proba.argmax(axis=1) == y).mean())


def log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    """Multiclass log loss of the true class, probabilities clipped at 1e-15 as Kaggle does."""
    y, proba = _scored(y, proba)
    if not len(y):
        return float("nan")
    p = np.clip(proba[np.arange(len(y)), y], EPS, 1.0)
    return float(-np.log(p).mean())


def macro_f1(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean over classes of F1 of the arg-max; a class never predicted nor present is left out
    (as scikit-learn's ``f1_score(average='macro')`` over the labels present in either)."""
    true, proba = _scored(y, proba)
    if not len(true):
        return float("nan")
    c = proba.shape[1]
    pred = proba.argmax(axis=1)
    tp = np.bincount(true[true == pred], minlength=c).astype(np.float64)
    n_true, n_pred = np.bincount(true, minlength=c), np.bincount(pred, minlength=c)
    seen = (n_true + n_pred) > 0
    return float((2 * tp[seen] / (n_true + n_pred)[seen]).mean())


def top_k_accuracy(y: np.ndarray, proba: np.ndarray, k: int = TOP_K) -> float:
    """Share of rows whose label is among the k most probable classes (ties count against)."""
    y, p = _scored(y, proba)
    if not len(y):
        return float("nan")
    p_true = p[np.arange(len(p)), y]
    return float(((p > p_true[:, None]).sum(axis=1) < k).mean())


ECE_BINS = 15


def _ece_bins(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin b of each confidence: (b/n, (b+1)/n], a confidence of 0 in bin 0."""
    return np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def ece(y: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-label confidence (max probability of a row).

    ``n_bins`` equal-width bins on [0, 1], bin b holding confidences in (b/n, (b+1)/n] (a
    confidence of 0 goes to bin 0); ECE = sum over bins of (rows in bin / rows) x |accuracy -
    mean confidence| of the bin. Rows with a NaN are skipped.
    """
    y, proba = _scored(y, proba)
    if not len(y):
        return float("nan")
    conf = proba.max(axis=1).astype(np.float64)
    correct = (proba.argmax(axis=1) == y).astype(np.float64)
    b = _ece_bins(conf, n_bins)
    count = np.bincount(b, minlength=n_bins)
    gap = np.abs(np.bincount(b, weights=correct, minlength=n_bins)
                 - np.bincount(b, weights=conf, minlength=n_bins))
    return float(gap[count > 0].sum() / len(y))


ECE_FLOOR_DRAWS = 1000
# rows x draws per call at most (about 0.3 s): above 50,000 rows fewer draws (100 at least), as
# the floor shrinks like 1/sqrt(rows) and a table computes it for every row it shows
ECE_FLOOR_WORK = 50_000_000


def ece_floor(y: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS,
              draws: int | None = None, seed: int = 0,
              observed: float | None = None) -> tuple[float, float]:
    """(floor, p): the ECE that exactly calibrated probabilities score on these rows by chance,
    and the share of such chance scores at least the observed ECE.

    ECE is biased upward on a finite sample: a predictor whose confidence is exactly its chance
    of being right still scores about sum over bins of sqrt(2 p (1 - p) / (pi n_bin)) x n_bin /
    n, 0.018 on 2,000 rows at 86 % accuracy. Each draw keeps the rows' confidences and bins and
    draws each row's correctness from its own confidence (consistency resampling, Broecker and
    Smith 2007); ``floor`` is the draws' mean ECE. A small ``p`` says the miscalibration is real;
    a large one that the observed ECE is what chance gives a calibrated predictor on this many
    rows. Seeded, so a table shows the same figures each time. ``draws``: default 1,000, fewer
    above 50,000 rows (``ECE_FLOOR_WORK``), 100 at least. ``observed``: the ECE of these rows
    when the caller has it already (else computed here).
    """
    y, proba = _scored(y, proba)
    if not len(y):
        return float("nan"), float("nan")
    if draws is None:
        draws = min(ECE_FLOOR_DRAWS, max(100, ECE_FLOOR_WORK // len(y)))
    if observed is None:
        observed = ece(y, proba, n_bins)
    conf = proba.max(axis=1).astype(np.float64)
    b = _ece_bins(conf, n_bins)
    conf_sum = np.bincount(b, weights=conf, minlength=n_bins)
    rng = np.random.default_rng(seed)
    chance = np.empty(draws)
    chunk = max(1, 2_000_000 // len(y))  # draws per batch: a few MB whatever the row count
    for start in range(0, draws, chunk):
        d = min(chunk, draws - start)
        right = rng.random((d, len(y))) < conf  # row i right with probability conf[i]
        hits = np.stack([np.bincount(b, weights=r, minlength=n_bins) for r in right])
        chance[start:start + d] = np.abs(hits - conf_sum).sum(axis=1) / len(y)
    return float(chance.mean()), float((chance >= observed - 1e-12).mean())


def calibration(y: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, float]:
    """``ece`` beside ``ece_floor`` and ``calibration_p``: an ECE means little without what
    chance gives a calibrated predictor on the same rows (see ``ece_floor``)."""
    observed = ece(y, proba, n_bins)
    floor, calibration_p = ece_floor(y, proba, n_bins, observed=observed)
    return {"ece": observed, "ece_floor": floor, "calibration_p": calibration_p}


def scores(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    return {"accuracy": accuracy(y, proba), "log_loss": log_loss(y, proba),
            "macro_f1": macro_f1(y, proba), "top3": top_k_accuracy(y, proba)}
