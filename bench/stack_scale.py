#!/usr/bin/env python
"""How level-2 cost grows with rows: seconds and peak memory of every stacking method.

Synthetic OOF of R runs x C classes (default 5 x 10) at 15,561 / 155,610 / 1,556,100 rows (the
demo-sized case x 1, 10, 100), with a stratified fold column of K=5. Each (size, method) runs in
its own subprocess, so its peak RSS (``ru_maxrss``) is its own; time covers what ``stack.py``
does per method: level-2 CV over the K stored folds (K fits + predictions) and the final fit on
all rows. Prints a table, then the time ratio between consecutive sizes (10x rows: a ratio <= 10
is linear or better).

    .venv/bin/python bench/stack_scale.py                      # all three sizes
    .venv/bin/python bench/stack_scale.py --sizes 15561 155610 --methods greedy logreg
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")  # as stack.py does (see there)

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = (15_561, 155_610, 1_556_100)
METHODS = ("mean", "geo", "rank", "blend", "greedy", "logreg", "lightgbm")  # = ensemble.STACKERS


def synthetic_oof(n: int, n_runs: int, n_classes: int, k: int, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X (n, R*C) float64, y, stratified folds); runs differ in skill and calibration."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    folds = np.empty(n, dtype=np.int64)
    folds[np.argsort(y, kind="stable")] = np.arange(n) % k
    skill = np.linspace(1.5, 3.5, n_runs)
    temperature = np.linspace(0.8, 1.5, n_runs)
    X = np.empty((n, n_runs * n_classes))
    for lo in range(0, n, 100_000):  # chunks: generation must not set the memory peak
        hi = min(n, lo + 100_000)
        z = rng.normal(size=(hi - lo, n_runs, n_classes))
        z[np.arange(hi - lo), :, y[lo:hi]] += skill
        z /= temperature[:, None]
        p = np.exp(z - z.max(axis=2, keepdims=True))
        p /= p.sum(axis=2, keepdims=True)
        X[lo:hi] = p.reshape(hi - lo, -1)
    return X, y, folds


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_s() -> tuple[float, float]:
    """(user, system) CPU seconds of this process, all threads: the work apart from the load.

    They are apart because system time here is mostly the kernel's first touch of fresh pages
    (zeroing, and on a VM the host backing them): at 1.5M rows the buffers are mapped fresh,
    at 155k rows they come from malloc's heap, so it grows by a step, not with the algorithm.
    """
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


def one(n: int, method: str, n_runs: int, n_classes: int, k: int) -> dict:
    """Measure one method at one size in this process (called in a subprocess)."""
    from ensemble.evaluate import cross_val_level2
    from ensemble.stackers import make_stacker

    X, y, folds = synthetic_oof(n, n_runs, n_classes, k)
    data_mb = rss_mb()
    user0, sys0 = cpu_s()
    t0 = time.perf_counter()
    res = cross_val_level2(method, make_stacker(method), X, y, folds, n_classes)
    cv_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    make_stacker(method).fit(X, y)
    fit_s = time.perf_counter() - t1
    peak = rss_mb()
    user1, sys1 = cpu_s()
    return {"rows": n, "method": method, "cv_s": round(cv_s, 2), "final_fit_s": round(fit_s, 2),
            "total_s": round(cv_s + fit_s, 2), "user_s": round(user1 - user0, 2),
            "sys_s": round(sys1 - sys0, 2),
            "data_mb": round(data_mb), "peak_mb": round(peak),
            "extra_mb": round(peak - data_mb),
            # lightgbm's work is rows x rounds, and early stopping keeps more rounds on more rows
            "boost_rounds": round(float(np.mean([f.get("boosting_rounds", 0) for f in res.folds])),
                                  1),
            **{key: round(v, 4) for key, v in res.scores.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--one", nargs=2, metavar=("ROWS", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], args.runs, args.classes, args.folds)))
        return 0

    from oof.cli import format_table

    rows = []
    for n in args.sizes:
        for m in args.methods:
            cmd = [sys.executable, __file__, "--one", str(n), m, "--runs", str(args.runs),
                   "--classes", str(args.classes), "--folds", str(args.folds)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    cols = ["rows", "method", "cv_s", "final_fit_s", "total_s", "user_s", "sys_s", "data_mb",
            "peak_mb", "extra_mb", "boost_rounds", "accuracy", "log_loss", "macro_f1", "top3"]
    print(f"{args.runs} runs x {args.classes} classes, K={args.folds}; seconds = level-2 CV + "
          "final fit (wall; user_s / sys_s = CPU seconds of the process, all threads); "
          "peak_mb = peak RSS of the subprocess, extra_mb = above the data")
    totals = {n: round(sum(r["total_s"] for r in rows if r["rows"] == n), 2) for n in args.sizes}
    print(f"all methods together, wall seconds per size: {totals}")
    slow = [f"{r['method']}@{r['rows']}" for r in rows if r["rows"] <= 15_561
            and r["total_s"] > 20]
    print("car-sized (15,561 rows) target: every method under 20 s: "
          + ("MISSED by " + ", ".join(slow) if slow else "met"))
    print(format_table(rows, cols, floats="{:.4g}"))
    by = {(r["rows"], r["method"]): r for r in rows}
    sizes = sorted(args.sizes)
    ratios = []
    for m in args.methods:
        for a, b in zip(sizes, sizes[1:]):
            ra, rb = by[(a, m)], by[(b, m)]
            ratios.append({"method": m, "rows": f"{a} -> {b}", "rows_x": round(b / a, 1),
                           "time_x": round(rb["total_s"] / max(ra["total_s"], 1e-3), 1),
                           "user_x": round(rb["user_s"] / max(ra["user_s"], 1e-3), 1),
                           "extra_mem_x": round(rb["extra_mb"] / max(ra["extra_mb"], 1), 1)})
    if ratios:
        print("\ngrowth (time_x <= rows_x means linear or better; user_x = the same for user CPU "
              "seconds, without the kernel's page zeroing):")
        print(format_table(ratios, ["method", "rows", "rows_x", "time_x", "user_x",
                                    "extra_mem_x"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
