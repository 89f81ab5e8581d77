#!/usr/bin/env python
"""A distilled student against the same run on hard labels, on held-out labels (issue 30 item 4).

The student is ``run_folds.py --distill-from STACK --distill-alpha A --distill-temperature T``;
its twin is the same run (backbone, size, epochs, folds, seed) without ``--distill-from``. Both
are scored on the demo's held-out test labels (``test_labels.csv``, read by
``oof.demo.held_out_labels`` as ``stack.py``'s held-out table reads them): accuracy, log loss and
ECE (15 bins) of the run's test prediction (the mean of its K fold models). Their OOF scores are
printed too, the student's marked optimistic (its targets came from models that saw its held-out
rows), which is why the held-out columns are the comparison.

Without ``--teacher`` a teacher stack is trained first: ``--teacher-sizes`` runs of the student's
backbone at other image sizes, stacked by ``--method`` (run_folds and stack_runs library calls,
the ones run_folds.py and stack.py make). The default is a small subset of the demo (2,000
training images, all 2,000 held-out images, 20 px, 3 folds, 3 epochs, one seed) that runs in a few
minutes on 2 cores; ``--train-images 0 --img-size 28 --epochs 8`` is the full demo recipe.

    .venv/bin/python bench/distill.py [--train-images 2000] [--seeds 0 1] [--teacher DIR]
        [--alpha 0.5] [--temperature 2] [--out /tmp/distill_bench]
    .venv/bin/python bench/distill.py --data DATASET --score RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oof.demo import ensure_fashion_demo, held_out_labels  # noqa: E402
from oof.metrics import accuracy, ece, log_loss  # noqa: E402
from oof.rundir import Run, load_run  # noqa: E402


def subset_demo(demo: Path, dest: Path, n_train: int, n_test: int, seed: int) -> Path:
    """The demo with ``n_train`` training images (stratified, seeded; 0 = all) and its first
    ``n_test`` held-out images (0 = all), in the demo's own layout, labels included."""
    if dest.exists():
        return dest
    train = pd.read_csv(demo / "train.csv", dtype=str)
    if n_train and n_train < len(train):
        rng = np.random.default_rng(seed)
        keep = np.concatenate([rng.permutation(idx)[:round(n_train * len(idx) / len(train))]
                               for idx in train.groupby("Category").indices.values()])
        train = train.iloc[np.sort(keep)].reset_index(drop=True)
    sample = pd.read_csv(demo / "sample-submission.csv", dtype=str)
    labels = pd.read_csv(demo / "test_labels.csv", dtype=str)
    if n_test:
        sample, labels = sample.head(n_test), labels.head(n_test)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for image_id, cat in zip(train["Id"], train["Category"]):
        (tmp / "train" / cat).mkdir(parents=True, exist_ok=True)
        shutil.copy(demo / "train" / cat / image_id, tmp / "train" / cat / image_id)
    (tmp / "test_upload").mkdir(parents=True)
    for image_id in sample["Id"]:
        shutil.copy(demo / "test_upload" / image_id, tmp / "test_upload" / image_id)
    train.to_csv(tmp / "train.csv", index=False)
    sample.to_csv(tmp / "sample-submission.csv", index=False)
    labels.to_csv(tmp / "test_labels.csv", index=False)
    tmp.rename(dest)
    return dest


def train_run(data: Path, out: Path, name: str, backbone: str, img_size: int, folds: int,
              epochs: int, seed: int | None, threads: int, extra: list[str]) -> Path:
    """One run_folds run (the library call run_folds.py makes); returns its run folder."""
    from oof.config import RunConfig, parse_config
    from runner.run import run_folds

    argv = ["--data", str(data), "--out", str(out), "--backbone", backbone,
            "--img-size", str(img_size), "--folds", str(folds), "--epochs", str(epochs),
            "--batch-size", "64", "--lr", "0.002", "--augment", "flip", "--run-name", name,
            "--threads", str(threads), "--progress", "false",
            *(() if seed is None else ("--train-seed", str(seed))), *extra]
    return Path(run_folds(parse_config(RunConfig, argv, "run_folds.py", "")).run_dir)


def train_teacher(data: Path, out: Path, args: argparse.Namespace) -> Path:
    """A few small runs stacked by ``args.method`` (stack_runs, as stack.py); the stack folder."""
    from ensemble.stack import StackConfig, stack_runs
    from oof.config import parse_config

    names = []
    for size in args.teacher_sizes:
        name = f"teacher_{size}px"
        train_run(data, out, name, args.backbone, size, args.folds, args.epochs, None,
                  args.threads, [])
        names.append(name)
    argv = ["--data", str(data), "--out", str(out), "--runs", *names, "--method", args.method,
            "--compare", "false", "--name", f"stack-{args.method}"]
    return Path(stack_runs(parse_config(StackConfig, argv, "stack.py", "")).out_dir)


def held_out(run: Run, truth: pd.DataFrame) -> dict[str, float]:
    """Accuracy, log loss and ECE of the run's test rows on the held-out labels (by id)."""
    pos = {str(i): n for n, i in enumerate(run.test_ids)}
    rows = [pos[i] for i in truth["Id"]]
    y = np.array([run.classes.index(c) for c in truth["Category"]])
    proba = run.test[rows]
    return {"accuracy": accuracy(y, proba), "log_loss": log_loss(y, proba), "ece": ece(y, proba)}


def oof_scores(run: Run) -> dict[str, float]:
    """The run's OOF accuracy and log loss (optimistic for a student)."""
    return {"accuracy": accuracy(run.y, run.oof), "log_loss": log_loss(run.y, run.oof)}


def row(label: str, run: Run, truth: pd.DataFrame, seed: Any, secs: float,
        refit: bool = False) -> dict[str, Any]:
    """A table row: OOF and held-out scores of the run's fold models' mean, or with ``refit``
    of its ``--refit-full`` model (estimated by the same OOF: it has none of its own)."""
    if refit:
        run = replace(run, test=run.refit_test())
    o, h = oof_scores(run), held_out(run, truth)
    return {"run": label + (" *" if run.meta.get("student") else ""), "seed": seed,
            "oof_acc": o["accuracy"], "oof_ll": o["log_loss"], "acc": h["accuracy"],
            "log_loss": h["log_loss"], "ece": h["ece"], "seconds": secs}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, default=None, help="demo-fashion folder (default: the "
                    "cached demo, built from Debian's package if missing)")
    ap.add_argument("--data", type=Path, default=None, help="a dataset with held-out labels "
                    "(test_labels.csv) to use as it is (default: the demo subset below)")
    ap.add_argument("--train-images", type=int, default=2000, help="0 = all 4,500")
    ap.add_argument("--test-images", type=int, default=0, help="held-out images; 0 = all 2,000")
    ap.add_argument("--subset-seed", type=int, default=0)
    ap.add_argument("--backbone", default="timm/resnet10t")
    ap.add_argument("--img-size", type=int, default=20, help="the student's (and its twin's)")
    ap.add_argument("--teacher-sizes", type=int, nargs="+", default=[16, 24])
    ap.add_argument("--method", default="logreg", help="the teacher stack's level-2 method")
    ap.add_argument("--teacher", type=Path, default=None, help="an existing stack folder over "
                    "the same data and folds (skips training a teacher)")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="--train-seed of the "
                    "student and its twin (one pair per seed; the folds stay fixed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/distill_bench"))
    ap.add_argument("--score", type=Path, nargs="+", default=None, metavar="RUN_DIR",
                    help="train nothing: score these finished run folders of --data (fold "
                    "models' mean, and the refit model where there is one)")
    args = ap.parse_args(argv)

    if args.score:
        if args.data is None:
            raise SystemExit("--score: pass --data, the dataset the runs were trained on")
        truth = held_out_labels(args.data)
        if truth is None:
            raise SystemExit(f"{args.data}: no held-out labels (test_labels.csv)")
        rows = []
        for path in args.score:
            run = load_run(path)
            rows.append(row(f"{run.name} (folds)", run, truth, run.meta.get("train_seed"), 0.0))
            if run.refit_test() is not None:
                rows.append(row(f"{run.name} (refit)", run, truth, run.meta.get("train_seed"),
                                0.0, refit=True))
        print(pd.DataFrame(rows).drop(columns="seconds").to_string(
            index=False, float_format=lambda v: f"{v:.4f}"))
        return
    if args.teacher is not None and args.data is None:
        raise SystemExit("--teacher: pass --data, the dataset its runs were trained on")
    if args.data is not None:
        data = args.data
    else:
        data = subset_demo(
            args.demo or ensure_fashion_demo(), args.out / f"demo-fashion-{args.train_images}-"
            f"{args.test_images}-{args.subset_seed}", args.train_images, args.test_images,
            args.subset_seed)
    truth = held_out_labels(data)
    if truth is None:
        raise SystemExit(f"{data}: no held-out labels (test_labels.csv)")
    runs_out = args.out / "runs"
    t0 = time.perf_counter()
    teacher = args.teacher or train_teacher(data, runs_out, args)
    t_teacher = time.perf_counter() - t0
    rows = [row(f"teacher {teacher.name}", load_run(teacher), truth, "-", t_teacher)]
    for seed in args.seeds:
        for kind, extra in (("hard labels", []),
                            ("student", ["--distill-from", str(teacher), "--distill-alpha",
                                         str(args.alpha), "--distill-temperature",
                                         str(args.temperature)])):
            t0 = time.perf_counter()
            name = (f"student_a{args.alpha:g}_t{args.temperature:g}" if extra else "hard") \
                + f"_{args.img_size}px_seed{seed}"  # a rerun reuses a finished twin
            path = train_run(data, runs_out, name, args.backbone, args.img_size, args.folds,
                             args.epochs, seed, args.threads, extra)
            rows.append(row(kind, load_run(path), truth, seed, time.perf_counter() - t0))
    table = pd.DataFrame(rows)
    print(f"\n{data.name}: {args.backbone} {args.img_size} px, K={args.folds}, {args.epochs} "
          f"epochs, alpha {args.alpha}, T {args.temperature}, teacher {teacher} "
          f"({len(truth)} held-out images)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for seed in args.seeds:
        hard = table[(table["seed"] == seed) & (table["run"] == "hard labels")].iloc[0]
        stud = table[(table["seed"] == seed) & table["run"].str.startswith("student")].iloc[0]
        d = {k: stud[k] - hard[k] for k in ("acc", "log_loss", "ece")}
        print(f"seed {seed}: student - hard labels, held-out accuracy {d['acc']:+.4f}, "
              f"log loss {d['log_loss']:+.4f}, ECE {d['ece']:+.4f}")
    print("* student: its OOF score is optimistic (its training targets came from models that "
          "saw its held-out rows); compare the held-out columns")


if __name__ == "__main__":
    main()
