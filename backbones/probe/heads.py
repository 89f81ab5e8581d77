"""The probe's fold heads: a scikit-learn classifier fitted on frozen features, kept as arrays.

Every head is linear (standardise, then ``x @ coef.T + intercept``, then softmax, or a sigmoid
for two classes, exactly as scikit-learn's ``predict_proba`` does), so a fitted head is a handful
of arrays: it is saved as ``.npz`` with its JSON metadata as a string array and loaded with
``np.load(allow_pickle=False)``. Loading runs no code, unlike a pickled estimator, and does not
depend on the scikit-learn version. The OOF and test rows are computed by ``LinearHead`` from
those same arrays, so a loaded head reproduces them exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oof.atomic import atomic_path
from oof.config import PROBE_HEADS as HEADS  # --probe-head: logreg | lda
from oof.errors import DataError

#: the inverse regularisation strengths the inner CV tries (half-decade steps)
LOGREG_CS = tuple(float(c) for c in np.logspace(-4, 1, 11))
INNER_FOLDS = 5
#: the temperatures lda's inner CV tries (its raw scores are far too confident)
LDA_TEMPERATURES = tuple(float(t) for t in np.logspace(-1, 3, 41))
FORMAT = "foldstack-probe-head/1"
ARRAYS = ("mean", "scale", "coef", "intercept", "classes")


@dataclass
class LinearHead:
    """A fitted head: standardisation, linear scores, probabilities over all ``n_classes``.

    ``classes``: the run's class index of each score column (a class the fold's training rows
    lack gets probability 0). ``info``: how it was fitted (head, chosen C, inner CV scores).
    """

    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    coef: np.ndarray  # (1 or C', D)
    intercept: np.ndarray  # (1 or C',)
    classes: np.ndarray  # (C',) int64
    n_classes: int
    info: dict[str, Any]

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(N, n_classes) float64 probabilities, as scikit-learn's ``predict_proba``."""
        x = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        z = x @ self.coef.T + self.intercept
        if self.coef.shape[0] == 1:  # two classes: scikit-learn's binary (sigmoid) form
            p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
            p = np.stack([1.0 - p1, p1], axis=1)
        else:
            z = z - z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
        out = np.zeros((len(x), self.n_classes), dtype=np.float64)
        out[:, self.classes] = p
        return out


def inner_cv(y: np.ndarray, seed: int, where: str) -> Any:
    """Stratified, shuffled, seeded inner folds over the fold's training rows only."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(y)
    present = counts[counts > 0]
    if len(present) < 2:
        raise DataError(f"{where}: the training rows hold a single class; a probe head "
                        "needs at least two")
    n = int(min(INNER_FOLDS, present.min()))
    if n < 2:
        rare = [int(c) for c in np.flatnonzero(counts == 1)]
        raise DataError(f"{where}: class index(es) {rare} have one training image; choosing "
                        "the probe's regularisation needs at least 2 per class (use fewer "
                        "folds or more images)")
    return StratifiedKFold(n_splits=n, shuffle=True, random_state=seed % 2**32)


def fit_head(head: str, features: np.ndarray, y: np.ndarray, n_classes: int, seed: int,
             threads: int | None = None, where: str = "probe") -> LinearHead:
    """Fit ``head`` on one fold's training features; any choice made by inner CV sees those
    rows only (the held-out fold and the test set are never looked at)."""
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    with threadpool_limits(limits=threads):
        scaler = StandardScaler().fit(x)
        xs = scaler.transform(x)
        if head == "logreg":
            clf, info = _fit_logreg(xs, y, seed, where)
        elif head == "lda":
            clf, info = _fit_lda(xs, y, seed, where)
        else:
            raise ValueError(f"unknown probe head {head!r}; known: {HEADS}")
    t = info.get("temperature", 1.0)  # scores / t: still a linear head
    return LinearHead(scaler.mean_.copy(), scaler.scale_.copy(),
                      np.asarray(clf.coef_, dtype=np.float64) / t,
                      np.asarray(clf.intercept_, dtype=np.float64).reshape(-1) / t,
                      np.asarray(clf.classes_, dtype=np.int64), int(n_classes),
                      {"head": head, **info})


def _fit_logreg(x: np.ndarray, y: np.ndarray, seed: int, where: str) -> tuple[Any, dict]:
    """L2 logistic regression (multinomial, lbfgs: deterministic), C picked by inner CV on
    log loss along a warm-started path of ``LOGREG_CS``, then refitted on all the fold's
    training rows."""
    from sklearn.linear_model import LogisticRegressionCV

    cv = inner_cv(y, seed, where)
    clf = LogisticRegressionCV(Cs=list(LOGREG_CS), cv=cv, scoring="neg_log_loss",
                               l1_ratios=(0.0,), use_legacy_attributes=False, max_iter=2000,
                               refit=True).fit(x, y)
    inner = -np.asarray(clf.scores_, dtype=np.float64).reshape(cv.get_n_splits(), -1).mean(0)
    return clf, {"C": float(clf.C_), "inner_folds": int(cv.get_n_splits()),
                 "inner_log_loss": {f"{c:.4g}": float(s) for c, s in zip(LOGREG_CS, inner)},
                 "n_iter": int(np.max(clf.n_iter_))}


def _fit_lda(x: np.ndarray, y: np.ndarray, seed: int, where: str) -> tuple[Any, dict]:
    """Linear discriminant analysis with Ledoit-Wolf shrinkage (a shared covariance that stays
    well-conditioned with fewer images than features), its scores divided by a temperature
    chosen by inner CV on log loss: with 1,280 features and 211 photos the raw LDA
    probabilities were nearly all 0 or 1 (OOF log loss 4.53 at 0.80 accuracy)."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from oof.metrics import log_loss

    def lda(rows: np.ndarray) -> Any:
        return LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x[rows], y[rows])

    cv = inner_cv(y, seed, where)
    n_classes, d = int(y.max()) + 1, x.shape[1]
    losses = np.zeros(len(LDA_TEMPERATURES))
    for tr, te in cv.split(x, y):
        clf = lda(tr)
        for i, t in enumerate(LDA_TEMPERATURES):
            head = LinearHead(np.zeros(d), np.ones(d), clf.coef_ / t, clf.intercept_ / t,
                              clf.classes_, n_classes, {})
            losses[i] += log_loss(y[te], head.predict_proba(x[te])) * len(te) / len(y)
    best = float(LDA_TEMPERATURES[int(np.argmin(losses))])
    return lda(np.arange(len(y))), {
        "shrinkage": "ledoit-wolf", "temperature": best, "inner_folds": int(cv.get_n_splits()),
        "inner_log_loss": {f"{t:.4g}": float(v) for t, v in zip(LDA_TEMPERATURES, losses)}}


def save_head(path: Path, head: LinearHead, meta: dict[str, Any]) -> None:
    """Arrays + JSON metadata in one ``.npz``, written atomically (no pickle anywhere)."""
    doc = {"format": FORMAT, "n_classes": head.n_classes, "info": head.info, **meta}
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, mean=head.mean, scale=head.scale, coef=head.coef,
                 intercept=head.intercept, classes=head.classes,
                 meta=np.array(json.dumps(doc, default=str)))


def read_head_meta(path: Path) -> dict[str, Any]:
    """The JSON metadata ``save_head`` stored beside the arrays."""
    return load_head(path)[1]


def load_head(path: Path) -> tuple[LinearHead, dict[str, Any]]:
    """A saved head and its metadata; a damaged or foreign file is a DataError naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in (*ARRAYS, "meta")}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not a readable probe head ({type(exc).__name__}: "
                        f"{str(exc)[:200]})") from exc
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} file (format {meta.get('format')!r})")
    head = LinearHead(**{k: np.asarray(arrays[k]) for k in ARRAYS},
                      n_classes=int(meta["n_classes"]), info=meta.get("info", {}))
    return head, meta
