#!/usr/bin/env python
"""Overhead of foldstack's fold loop against a bare training loop, measured in one run.

timm: the real fold trainer (decoded-image cache, albumentations, DataLoader, LR schedule,
progress bar, per-step metrics) against a bare PyTorch loop: forward, cross-entropy, backward and
an optimiser step on one batch prepared once, for the fold loop's own model and optimiser (two
instances of one architecture stepped up to 3 % apart in one process, which would be measured as
loop overhead) and in the layout the fold loop hands the model (channels-last strides, which CPU
convolutions run faster than NCHW: a contiguous NCHW bare loop flatters the fold loop). Keras:
``bench/overhead_keras.py`` (``fit`` on the tf.data pipeline against ``train_on_batch`` on random
tensors), run in its own process because torch and TensorFlow never share one. Rounds alternate
between the two loops so background load hits both alike; the median of the per-round ratios is
reported, at each --img-size.

    python bench/train_overhead.py [--framework timm|keras|all] [--rounds 9]
        [--epochs-per-round 3] [--img-size 32 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def interleaved_rounds(bare_run: Callable[[], float], loop_run: Callable[[int], float],
                       rounds: int) -> tuple[list[float], list[float], list[float]]:
    """(loop images/s, bare images/s, ratios) per round, for both frameworks' benches.

    Each round times a bare run, a loop run (given the round number) and a bare run again; the
    loop run is compared with the mean of the two bare runs around it, so a burst of background
    load hits both sides of a ratio alike (medians taken separately would mix rounds).
    """
    loop_ips, bare_ips, ratios = [], [], []
    for r in range(rounds):
        before = bare_run()
        loop_ips.append(loop_run(r))
        bare_ips.append((before + bare_run()) / 2)
        ratios.append(loop_ips[-1] / bare_ips[-1])
    return loop_ips, bare_ips, ratios


def timm_overhead(backbone: str, img_size: int, batch_size: int, rounds: int,
                  augment: str = "light", epochs_per_round: int = 3) -> dict:
    """Median over ``rounds`` of (fold loop images/s) / (bare loop images/s), each side timed
    over ``epochs_per_round`` epochs (``interleaved_rounds``): at 32 px one epoch of the demo
    takes about 2 s, and single-epoch rounds swung from 0.87 to 1.06 around the same median."""
    import numpy as np
    import torch

    from backbones import resolve
    from backbones.base import FoldJob
    from backbones.timm.data import make_loader
    from backbones.timm.train import build_trainer
    from oof.config import RunConfig
    from oof.datasets import load_dataset
    from oof.demo import cache_root
    from oof.images import cached_images

    cfg = RunConfig(backbone=backbone, img_size=img_size, batch_size=batch_size,
                    epochs=1 + rounds * epochs_per_round,
                    progress=True, augment=augment)
    data = load_dataset("demo")
    x = np.asarray(cached_images(list(data.train["path"]), img_size, cache_root() / "bench"))
    y = np.array(data.labels_as_int())
    n = (len(x) * 4 // 5) // batch_size * batch_size  # one fold's training rows, whole batches
    x, y = x[:n], y[:n]
    spec, _ = resolve(cfg)
    job = FoldJob(spec, cfg, 0, data.classes, x, y, x[:0], y[:0], x[:0], Path("/dev/null"),
                  Path("/tmp"), Path("/tmp/bench_history.csv"))
    loader = make_loader(x, y, cfg, 0, torch.device("cpu"))
    trainer = build_trainer(job, len(loader))

    bare, opt = trainer.model, trainer.optimizer  # the loop differs, nothing else
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    xb = trainer.to_input(torch.from_numpy(np.array(x[:batch_size])))  # the fold loop's layout
    yb = torch.from_numpy(y[:batch_size])

    def bare_epochs() -> float:
        t = time.perf_counter()
        bare.train()
        for _ in range(len(loader) * epochs_per_round):
            loss = loss_fn(bare(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()
        return n * epochs_per_round / (time.perf_counter() - t)

    def fold_epochs(first: int, count: int) -> float:
        t = time.perf_counter()
        for epoch in range(first, first + count):
            loader.sampler.set_epoch(epoch)
            trainer.train_epoch(loader, epoch)
        return n * count / (time.perf_counter() - t)

    fold_epochs(0, 1)  # warm-up both (allocator, first-call costs)
    bare_epochs()
    fold_ips, bare_ips, ratios = interleaved_rounds(
        bare_epochs, lambda r: fold_epochs(1 + r * epochs_per_round, epochs_per_round), rounds)
    return {"framework": "timm", "model": backbone, "img_size": img_size,
            "batch_size": batch_size, "threads": torch.get_num_threads(), "images": n,
            "fold_loop_img_s": round(statistics.median(fold_ips), 1),
            "bare_loop_img_s": round(statistics.median(bare_ips), 1),
            "ratio": round(statistics.median(ratios), 3),
            "mean_ratio": round(statistics.mean(ratios), 3),
            "ratios": [round(v, 3) for v in ratios], "rounds": rounds,
            "epochs_per_round": epochs_per_round,
            "load_1min": round(os.getloadavg()[0], 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", choices=("timm", "keras", "all"), default="all")
    parser.add_argument("--backbone", default="timm/resnet10t")
    parser.add_argument("--img-size", type=int, nargs="+", default=[32, 64],
                        help="one line per size: 32 px is the worst case (cheap compute per image)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--epochs-per-round", type=int, default=3,
                        help="timm: epochs each side trains per round (longer rounds, less noise)")
    parser.add_argument("--augment", default="light",
                        help="the fold loop's --augment (default: the default preset, light)")
    args = parser.parse_args()
    if args.framework == "all":  # one process per framework
        rc = 0
        for fw in ("timm", "keras"):
            rc |= subprocess.call([sys.executable, __file__, "--framework", fw,
                                   "--rounds", str(args.rounds), "--augment", args.augment,
                                   "--batch-size", str(args.batch_size)])
        return rc
    if args.framework == "keras":
        return subprocess.call([sys.executable, str(ROOT / "bench" / "overhead_keras.py"),
                                "--rounds", str(args.rounds), "--augment", args.augment,
                                "--batch-size", str(args.batch_size)])
    for size in args.img_size:
        res = timm_overhead(args.backbone, size, args.batch_size, args.rounds, args.augment,
                            args.epochs_per_round)
        print(f"timm {res['model']} {size}px batch {res['batch_size']}, augment {args.augment}, "
              f"{res['images']} images, {res['threads']} threads, {res['rounds']} rounds of "
              f"{res['epochs_per_round']} epochs, load {res['load_1min']}:")
        print(f"  fold loop  {res['fold_loop_img_s']:8.1f} images/s (median)")
        print(f"  bare loop  {res['bare_loop_img_s']:8.1f} images/s (median)")
        print(f"  ratio      {res['ratio']:8.3f}  median of per-round ratios {res['ratios']} "
              f"(mean {res['mean_ratio']:.3f}; target >= 0.95)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
