#!/usr/bin/env python
"""Overhead of foldstack's fold loop against a bare training loop, measured in one run.

timm: the real fold trainer (decoded-image cache, albumentations, DataLoader, LR schedule,
progress bar, per-step metrics) against a bare PyTorch loop (same model, batch and image size,
AdamW, random tensors already on the device). Keras: ``bench/overhead_keras.py`` (``fit`` on the
tf.data pipeline against ``train_on_batch`` on random tensors), run in its own process because
torch and TensorFlow never share one. Rounds alternate between the two loops so background load
hits both alike; the median of the rounds is reported.

    python bench/train_overhead.py [--framework timm|keras|all] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timm_overhead(backbone: str, img_size: int, batch_size: int, rounds: int) -> dict:
    import numpy as np
    import torch

    from backbones import resolve
    from backbones.base import FoldJob
    from backbones.timm_backend import build_trainer, create_model, make_loader
    from oof.config import RunConfig
    from oof.datasets import load_dataset
    from oof.demo import cache_root
    from oof.images import cached_images

    cfg = RunConfig(backbone=backbone, img_size=img_size, batch_size=batch_size, epochs=10,
                    progress=True)
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

    bare = create_model(spec, len(data.classes))
    opt = torch.optim.AdamW(bare.parameters(), lr=cfg.lr)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    xb = torch.randn(batch_size, 3, img_size, img_size)
    yb = torch.randint(0, len(data.classes), (batch_size,))

    def bare_epoch() -> None:
        bare.train()
        for _ in range(len(loader)):
            loss = loss_fn(bare(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()

    trainer.train_epoch(loader, 0)  # warm-up both (allocator, first-call costs)
    bare_epoch()
    fold_ips, bare_ips = [], []
    for r in range(rounds):
        t = time.perf_counter()
        trainer.train_epoch(loader, r)
        fold_ips.append(n / (time.perf_counter() - t))
        t = time.perf_counter()
        bare_epoch()
        bare_ips.append(n / (time.perf_counter() - t))
    fold, bare_m = statistics.median(fold_ips), statistics.median(bare_ips)
    return {"framework": "timm", "model": backbone, "img_size": img_size,
            "batch_size": batch_size, "threads": torch.get_num_threads(),
            "fold_loop_img_s": round(fold, 1), "bare_loop_img_s": round(bare_m, 1),
            "ratio": round(fold / bare_m, 3), "rounds": rounds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", choices=("timm", "keras", "all"), default="all")
    parser.add_argument("--backbone", default="timm/resnet10t")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.framework == "all":  # one process per framework
        rc = 0
        for fw in ("timm", "keras"):
            rc |= subprocess.call([sys.executable, __file__, "--framework", fw,
                                   "--rounds", str(args.rounds)])
        return rc
    if args.framework == "keras":
        return subprocess.call([sys.executable, str(ROOT / "bench" / "overhead_keras.py")])
    res = timm_overhead(args.backbone, args.img_size, args.batch_size, args.rounds)
    print(f"timm {res['model']} {res['img_size']}px batch {res['batch_size']}, "
          f"{res['threads']} threads, median of {res['rounds']} epochs:")
    print(f"  fold loop  {res['fold_loop_img_s']:8.1f} images/s")
    print(f"  bare loop  {res['bare_loop_img_s']:8.1f} images/s")
    print(f"  ratio      {res['ratio']:8.3f}  (target >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
