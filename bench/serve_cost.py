#!/usr/bin/env python
"""What the ensemble costs to serve and what it keeps (issue 30 item 6), on the demo.

For the full stack, each point of the budget front and a distilled student (a run whose meta.json
says ``student: true``, if the run root holds one): held-out accuracy, log loss and ECE (15 bins,
beside the ECE a calibrated predictor scores by chance on these images and its p: see
``oof.metrics.ece_floor``) on the demo's held-out labels, forward passes per image, the
recorded ms per image, and measured images/s of predict.py's library in-process
(``Ensemble.predict_proba`` on encoded files) and of the service (serve.py under waitress on
127.0.0.1, one client POSTing the same batches).

It trains nothing. The run root is copied to --work first (the original is never written);
the front points and the student are stacked there with stack.py (``--budget P``; the student
alone, served by its refit model when it has one; ``--temperature auto``, so a point's output is
temperature-scaled where that lowers its CV log loss, marked ``+T``). What the copy lacks is
printed with the command that makes it:

- refit models and per-view rows (for refit/view points on the front): train the runs with
  ``run_folds.py --config configs/demo/<config>.yaml --out runs --refit-full --tta-save-views``
  (the demo configs use no TTA, so only the refit adds candidates);
- a student: ``run_folds.py --config configs/demo/resnet10t_28px.yaml --out runs
  --run-name student-e24 --distill-from runs/demo-fashion/stack-logreg --refit-full
  --epochs 24`` (3x the runs' epochs: a student of fixed soft targets keeps improving where a
  run on one-hot labels stops; docs/benchmarks.md);
- measured ms per image: runs trained before issue 30 record none (blank).

    .venv/bin/python bench/serve_cost.py [--root runs/demo-fashion] [--stack stack-logreg]
        [--work /tmp/serve_cost] [--batch 16] [--batches 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ensemble.cost import Cost  # noqa: E402
from ensemble.saved import read_stacker_info  # noqa: E402
from ensemble.variants import load_variant_run  # noqa: E402
from oof.metrics import accuracy, calibration, log_loss  # noqa: E402
from oof.rundir import find_runs, load_run  # noqa: E402


def copy_root(root: Path, work: Path) -> Path:
    """The run root copied to ``work/<name>`` (no image cache); stack records point at it."""
    dest = work / root.name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns("cache"))
    for info_path in dest.glob("*/stacker.json"):
        info = json.loads(info_path.read_text())
        for r in info["runs"]:
            r["path"] = str(dest / Path(r["path"]).name)
        info_path.write_text(json.dumps(info, indent=2))
    return dest


def stack(work: Path, data: str, name: str, runs: list[str], method: str, temperature: str,
          *flags: str) -> Path:
    """stack.py into the copy (its own process: it prints the table and the front)."""
    cmd = [sys.executable, str(ROOT / "stack.py"), "--data", data, "--out", str(work),
           "--runs", *runs, "--method", method, "--compare", "false", "--name", name,
           "--temperature", temperature, *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return work / Path(data).name / name


def held_out(stack_dir: Path, data_root: Path) -> dict[str, float]:
    """The stack's submission probabilities scored on the demo's held-out labels."""
    truth = pd.read_csv(data_root / "test_labels.csv", dtype=str)
    sub = pd.read_csv(stack_dir / "submission_proba.csv", dtype={"Id": str}).set_index("Id")
    classes = list(sub.columns)
    p = sub.loc[truth["Id"], classes].to_numpy(float)
    y = np.array([classes.index(c) for c in truth["Category"]])
    return {"accuracy": accuracy(y, p), "log_loss": log_loss(y, p), **calibration(y, p)}


def served_cost(stack_dir: Path) -> tuple[Cost, list[str]]:
    """Passes and ms per image of the runs the stack serves, as it serves them."""
    from ensemble.cost import run_cost

    total, names = Cost(0, 0.0), []
    for r in read_stacker_info(stack_dir)["runs"]:
        run = load_variant_run(r)
        total = total + run_cost(run)
        label = getattr(run, "variant", None)
        names.append(run.name if label is None else f"{run.name}[{label.label}]")
    return total, names


def speed(stack_dir: Path, blobs: list[bytes], batch: int, batches: int) -> tuple[float, float]:
    """images/s in-process and through the service (bench/serve_load.py's measurements)."""
    from serve_load import library, service

    chunks = [[blobs[(b * batch + i) % len(blobs)] for i in range(batch)]
              for b in range(batches)]
    lib = library(str(stack_dir), chunks, 2)
    svc = service(str(stack_dir), chunks, [1], 2)[0]
    return lib["images/s"], svc["images/s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="runs/demo-fashion", help="run root (copied, not written)")
    ap.add_argument("--data", default="demo-fashion")
    ap.add_argument("--stack", default="stack-logreg", help="the full stack's folder name")
    ap.add_argument("--work", default="/tmp/serve_cost")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="every model is timed once per round, "
                    "rounds interleaved, and its fastest round is the figure: a slow spell of a "
                    "shared machine then cannot land on one model only")
    ap.add_argument("--temperature", default="auto", choices=("off", "auto", "always"),
                    help="stack.py --temperature of the stacks made here (front points, "
                         "students); the full stack is served as --stack was made")
    args = ap.parse_args()
    from oof.datasets import load_dataset

    data_root = load_dataset(args.data).root
    work = Path(args.work)
    root = copy_root(Path(args.root), work)
    level1 = [load_run(p) for p in find_runs(root)]
    level1 = [r for r in level1 if int(r.meta.get("level", 1)) == 1]
    students = [r.name for r in level1 if r.meta.get("student")]
    teachers = [r.name for r in level1 if r.name not in students]
    full = root / args.stack
    method = read_stacker_info(full)["method"]
    full_cost, _ = served_cost(full)
    missing = []
    if not any(r.meta.get("refit") for r in level1):
        missing.append("no refit model in any run: run_folds.py --config configs/demo/<config>"
                       ".yaml --out runs --refit-full --tta-save-views")
    if not students:
        missing.append(f"no student: run_folds.py --config configs/demo/resnet10t_28px.yaml "
                       f"--out runs --run-name student-e24 --distill-from "
                       f"{args.root}/{args.stack} --refit-full --epochs 24")
    if full_cost.ms_per_image is None:
        missing.append("ms_per_image not recorded by these runs (trained before issue 30)")

    entries: list[tuple[str, Path]] = [(f"full stack ({args.stack})", full)]
    front_stack = stack(work, args.data, "serve-cost-front", teachers, method, args.temperature,
                        "--budget", str(full_cost.passes))
    front = json.loads((front_stack / "report.json").read_text())["front"]
    for point in front:
        if point["passes"] < full_cost.passes:
            name = f"serve-cost-b{point['passes']}"
            entries.append((f"front {point['passes']} passes",
                            stack(work, args.data, name, teachers, method,
                                  args.temperature, "--budget", str(point["passes"]))))
    for s in students:
        run = next(r for r in level1 if r.name == s)
        flags = ["--budget", str(run.meta["refit"]["passes_per_image"])] if run.meta.get(
            "refit") else []
        entries.append((f"student {s}", stack(work, args.data, f"serve-cost-{s}", [s], "mean",
                                              args.temperature, *flags)))

    files = sorted((data_root / "test_upload").iterdir())
    blobs = [p.read_bytes() for p in files[:args.batch * args.batches]]
    rows: list[dict[str, Any]] = []
    for label, stack_dir in entries:
        cost, served = served_cost(stack_dir)
        t = json.loads((stack_dir / "report.json").read_text()).get("temperature")
        if t and t["applied"]:  # the served output is divided by T (ensemble.calibrate)
            label += f" +T {t['temperature']:.3f}"
        rows.append({"model": label, "runs": "+".join(served), **held_out(stack_dir, data_root),
                     **cost.row(), "predict_img_s": 0.0, "service_img_s": 0.0})
    for k in range(args.rounds):
        for row, (label, stack_dir) in zip(rows, entries):
            lib, svc = speed(stack_dir, blobs, args.batch, args.batches)
            row["predict_img_s"] = max(row["predict_img_s"], lib)
            row["service_img_s"] = max(row["service_img_s"], svc)
            print(f"round {k + 1}/{args.rounds}: {label} {lib:.1f} / {svc:.1f} img/s",
                  file=sys.stderr)
    print(f"demo {args.data}: {len(pd.read_csv(data_root / 'test_labels.csv'))} held-out images;"
          f" {args.batches} batches of {args.batch} images, {os.cpu_count()} CPU cores; "
          f"stacker {method}; img/s the fastest of {args.rounds} interleaved rounds; x stack: "
          "against the full stack's in the same run")
    print("| model | runs served | held-out acc | log loss | ECE | ECE floor | calibration p | "
          "passes | ms/image | predict.py img/s | x stack | service img/s | x stack |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = rows[0]
    for r in rows:
        ms = "" if r["ms_per_image"] is None else f"{r['ms_per_image']:.2f}"
        print(f"| {r['model']} | {r['runs']} | {r['accuracy']:.4f} | {r['log_loss']:.4f} | "
              f"{r['ece']:.4f} | {r['ece_floor']:.4f} | {r['calibration_p']:.2f} | "
              f"{r['passes']} | {ms} | {r['predict_img_s']:.1f} | "
              f"{r['predict_img_s'] / base['predict_img_s']:.2f} | {r['service_img_s']:.1f} | "
              f"{r['service_img_s'] / base['service_img_s']:.2f} |")
    for m in missing:
        print(f"missing: {m}")


if __name__ == "__main__":
    main()
