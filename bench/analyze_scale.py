#!/usr/bin/env python
"""Time the OOF analysis at car scale: 15,561 OOF rows x 10 runs x 10 classes, K=5.

Builds synthetic runs through the real contract (``write_run``) plus per-fold histories, and,
unless --no-images, a competition-layout dataset of 15,561 tiny PNGs the runs point at, so the
timing includes reloading the dataset and reading the thumbnails of the hardest images. The
build is cached in --work and not timed; the analysis (load + check + analyse + write the three
report files) is, and its seconds are printed. Target: under 30 s on 2 cores.

    python bench/analyze_scale.py [--rows 15561] [--runs 10] [--classes 10] [--no-images]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oof.folds import load_folds, make_folds, write_folds  # noqa: E402
from oof.rundir import find_runs, write_run  # noqa: E402


def _proba(y: np.ndarray, n_classes: int, skill: float, rng: np.random.Generator,
           shared: np.ndarray | None = None) -> np.ndarray:
    """Like tests/synthetic.py, plus noise ``shared`` by all runs (real backbones err together)."""
    logits = rng.normal(size=(len(y), n_classes))
    if shared is not None:
        logits = 0.6 * logits + 0.8 * shared
    logits[np.arange(len(y)), y] += 4.0 * skill
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def _write_images(data: Path, ids: list[str], labels: list[str], classes: list[str]) -> None:
    """Competition layout: train.csv + train/<class>/<id> PNGs, and a small test set."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (data / "train" / c).mkdir(parents=True, exist_ok=True)
    for i, (image_id, lab) in enumerate(zip(ids, labels, strict=True)):
        px = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        px[:, :, i % 3] = 40 * (classes.index(lab) % 6)
        Image.fromarray(px).save(data / "train" / lab / image_id)
    pd.DataFrame({"Id": ids, "Category": labels}).to_csv(data / "train.csv", index=False)
    (data / "test_upload").mkdir(exist_ok=True)
    test_ids = [f"test_{i:04d}.png" for i in range(20)]
    for t in test_ids:
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
            data / "test_upload" / t)
    pd.DataFrame({"Id": test_ids, "Category": classes[0]}).to_csv(
        data / "sample-submission.csv", index=False)


def build(work: Path, n_rows: int, n_runs: int, n_classes: int, images: bool) -> Path:
    """Write (once) the dataset, folds and runs; return the run root."""
    tag = f"v2_{n_rows}x{n_runs}x{n_classes}{'_img' if images else ''}"
    root, data = work / f"runs_{tag}", work / f"data_{n_rows}x{n_classes}"
    if len(find_runs(root)) == n_runs:
        return root
    rng = np.random.default_rng(0)
    classes = [f"model_{c:03d}" for c in range(n_classes)]
    ids = [f"car_{i:05d}.png" for i in range(n_rows)]
    labels = [classes[c] for c in rng.permutation(np.arange(n_rows) % n_classes)]
    if images and not (data / "train.csv").exists():
        t = time.perf_counter()
        _write_images(data, ids, labels, classes)
        print(f"wrote {n_rows} PNGs in {time.perf_counter() - t:.1f}s (not timed)")
    folds = load_folds(root) or make_folds(ids, labels, 5, 42)
    write_folds(root, folds)
    y = np.array([classes.index(lab) for lab in folds.labels])
    n_test = 500
    shared = rng.normal(size=(n_rows, n_classes))
    for r in range(n_runs):
        name = f"backbone{r:02d}"
        oof = _proba(y, n_classes, 0.4 + 0.05 * r, rng, shared)
        test = np.stack([_proba(rng.integers(0, n_classes, n_test), n_classes, 0.5, rng)
                         for _ in range(folds.k)])
        meta = {"level": 1, "backbone": {"name": f"synthetic/{name}"},
                "config": {"data": str(data), "layout": "competition"}}
        if images:
            meta["data"] = {"root": str(data), "layout": "competition"}
        run = write_run(root / name, name, classes, folds, oof,
                        np.array([f"test_{i:04d}.png" for i in range(n_test)], dtype=object),
                        test, meta)
        hist = pd.DataFrame([{"fold": f, "epoch": e, "loss": 2 / (e + 1), "accuracy": 0.5,
                              "lr": 1e-3, "val_loss": 2.1 / (e + 1), "val_accuracy": 0.5,
                              "seconds": 60.0} for f in range(folds.k) for e in range(10)])
        hist.to_csv(run.path / "history.csv", index=False)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=15561)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--work", default="/tmp/foldstack_bench_analyze")
    ap.add_argument("--no-images", action="store_true", help="skip the PNG dataset/thumbnails")
    args = ap.parse_args()

    t = time.perf_counter()
    root = build(Path(args.work), args.rows, args.runs, args.classes, not args.no_images)
    print(f"build: {time.perf_counter() - t:.1f}s (not timed) -> {root}")

    from oof.analysis import analyze, load_runs
    from oof.report import write_report

    t0 = time.perf_counter()
    runs = load_runs(root)
    t1 = time.perf_counter()
    analysis = analyze(runs, find_images=not args.no_images)
    t2 = time.perf_counter()
    paths = write_report(analysis, root / "analysis", with_thumbnails=not args.no_images)
    t3 = time.perf_counter()
    print(f"load+check {t1 - t0:.2f}s  analyse {t2 - t1:.2f}s  report {t3 - t2:.2f}s")
    print(f"analysed {len(runs[0].ids)} rows x {len(runs)} runs x {len(runs[0].classes)} classes "
          f"in {t3 - t0:.2f} s ({len(analysis.image_paths)} thumbnails) -> {paths['html']}")


if __name__ == "__main__":
    main()
