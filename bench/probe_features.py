"""The probe family's feature store: one extractor pass per image and view, not one per fold.

Three ``run_folds`` runs of the same probe (library calls, one process, fixed seed and threads),
each in a fresh run root so nothing is shared by accident:

- ``per fold``: ``--probe-feature-store false``, every fold extracts its training, held-out and
  test features (the baseline: K x (train + test) image passes);
- ``store, cold``: the store is empty, the first fold fills it (train + test images once);
- ``store, warm``: a second probe run (another run name, as a run of another head or TTA
  subset would be) on the same run root, reading every feature from the store.

Printed per run: extractor passes (forward calls, summed over the folds), seconds, the ratio to
the baseline, and whether its OOF and test probabilities equal the baseline's bit for bit.

Usage: python -m bench.probe_features [--data demo-fashion] [--backbone probe/resnet18]
           [--img-size 48] [--folds 5] [--tta hflip] [--head lda] [--pretrained FILE]
           [--work DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def probe_run(root: Path, args: argparse.Namespace, name: str, store: bool) -> dict[str, Any]:
    """One run of the probe; its passes, seconds and probabilities."""
    from oof.config import RunConfig, parse_config
    from oof.rundir import load_run
    from runner.run import run_folds

    argv = ["--data", args.data, "--out", str(root), "--backbone", args.backbone,
            "--img-size", str(args.img_size), "--folds", str(args.folds), "--seed", "42",
            "--tta", args.tta, "--probe-head", args.head, "--run-name", name,
            "--probe-feature-store", str(store).lower(), "--progress", "false",
            "--threads", str(args.threads),
            *(["--pretrained", args.pretrained] if args.pretrained else [])]
    t0 = time.perf_counter()
    summary = run_folds(parse_config(RunConfig, argv, "run_folds.py", ""))
    seconds = time.perf_counter() - t0
    run = load_run(summary.run_dir)
    info = run.meta["fold_info"]
    return {"seconds": seconds, "oof": run.oof, "test": run.test,
            "passes": sum(info[str(k)]["feature_passes"] for k in range(args.folds)),
            "accuracy": run.scores()["accuracy"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="demo-fashion")
    parser.add_argument("--backbone", default="probe/resnet18")
    parser.add_argument("--img-size", type=int, default=48)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--tta", default="hflip")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--head", default="lda", choices=("lda", "logreg"))
    parser.add_argument("--pretrained", default="")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="probe_features_"))
    shutil.rmtree(work, ignore_errors=True)

    base = probe_run(work / "per_fold", args, "probe", store=False)
    cold = probe_run(work / "store", args, "probe", store=True)
    warm = probe_run(work / "store", args, "probe-again", store=True)
    rows = [("per fold", base), ("store, cold", cold), ("store, warm", warm)]
    print(f"{args.backbone} at {args.img_size}px, {args.folds} folds, --tta {args.tta}, "
          f"{args.threads} threads, --probe-head {args.head}, data {args.data}")
    print("| run | extractor passes | seconds | x per-fold seconds | OOF accuracy | "
          "OOF and test equal per fold's |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        same = bool(np.array_equal(r["oof"], base["oof"]) and np.array_equal(r["test"],
                                                                           base["test"]))
        print(f"| {name} | {r['passes']} | {r['seconds']:.1f} | "
              f"{base['seconds'] / r['seconds']:.2f} | {r['accuracy']:.4f} | "
              f"{'bit for bit' if same else 'DIFFERENT'} |")


if __name__ == "__main__":
    main()
