#!/usr/bin/env python
"""Keras training overhead: ``model.fit`` on the real pipeline vs a bare ``train_on_batch`` loop.

Both sides use the same compiled model, batch and image size in one process, so the ratio
(fit images/s over bare images/s) isolates what the pipeline and ``fit`` add: the shuffle,
the albumentations preset in ``tf.numpy_function``, prefetching and Keras' epoch machinery.
The bare loop feeds one random uint8 batch that already sits in TensorFlow. The real pipeline
reads the decoded demo images (``oof.images`` cache), exactly what ``run_folds.py`` trains on.
Runs in its own process (``bench/train_overhead.py`` calls it as a subprocess): TensorFlow and
torch never share one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger(__name__)


def demo_images(img_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The demo's training images decoded as ``run_folds.py`` decodes them, with labels."""
    from oof.datasets import load_dataset
    from oof.demo import cache_root
    from oof.images import cached_images

    data = load_dataset("demo", "auto", None)
    x = cached_images(list(data.train["path"]), img_size, cache_root() / "bench_cache")
    y = np.array([data.class_index[c] for c in data.train["label"]], dtype=np.int64)
    return np.asarray(x), y, list(data.classes)


def measure(steps: int = 60, backbone: str = "keras/MobileNetV3Small", img_size: int = 32,
            batch_size: int = 64, augment: str = "light", rounds: int = 5) -> dict[str, Any]:
    """Images/s of ``fit`` (real pipeline) and of bare ``train_on_batch``, and their ratio.

    After one untimed pass that traces both steps, ``rounds`` rounds of bare / fit / bare runs
    (``steps`` steps each, whole epochs; ``interleaved_rounds``, as for timm) and the median
    round's ratio. Best-of-N per side, measured minutes apart, swung by +-0.04 between runs.
    """
    import statistics

    import tensorflow as tf

    from backbones.base import FoldJob
    from backbones.keras import compiled as kc
    from backbones.keras import data as kd
    from backbones.keras import model as km
    from backbones.keras import runtime as kr
    from bench.train_overhead import interleaved_rounds
    from oof.config import RunConfig

    cfg = RunConfig(backbone=backbone, img_size=img_size, batch_size=batch_size,
                    augment=augment, epochs=1, progress=False)
    spec = km.resolve_spec(backbone.partition("/")[2], cfg)
    x, y, classes = demo_images(img_size)
    device, policy = kr.configure_runtime(cfg)
    dataset, steps_per_epoch, batches = kd.make_train_dataset(x, y, len(classes), cfg, seed=0)
    job = FoldJob(spec=spec, cfg=cfg, fold=0, classes=classes, x_train=x, y_train=y,
                  x_val=x[:0], y_val=y[:0], x_test=x[:0], checkpoint_path=Path("unused"),
                  work_dir=Path("unused"), history_path=Path("unused"), seed=0)
    t0 = time.perf_counter()
    model = kc.compiled_model(job, steps_per_epoch, km.DEFAULT_BN_MOMENTUM)[0]
    epochs = max(1, round(steps / steps_per_epoch))
    timed_steps = epochs * steps_per_epoch
    model.fit(dataset, epochs=1, verbose=0, shuffle=False, callbacks=[batches])  # traces
    startup = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    xb = tf.constant(rng.integers(0, 256, (batch_size, img_size, img_size, 3), dtype=np.uint8))
    yb = tf.constant(np.eye(len(classes), dtype=np.float32)[rng.integers(0, len(classes),
                                                                          batch_size)])
    for _ in range(3):
        model.train_on_batch(xb, yb)  # warm-up (traces the single-batch path)
    images = timed_steps * batch_size

    def bare_run() -> float:
        t = time.perf_counter()
        for _ in range(timed_steps):
            model.train_on_batch(xb, yb)
        return images / (time.perf_counter() - t)

    def fit_run() -> float:
        t = time.perf_counter()
        model.fit(dataset, epochs=epochs, verbose=0, shuffle=False, callbacks=[batches])
        return images / (time.perf_counter() - t)

    fit_ips, bare_ips, ratios = interleaved_rounds(bare_run, lambda _: fit_run(), rounds)
    return {
        "framework": "tensorflow", "backbone": backbone, "img_size": img_size,
        "batch_size": batch_size, "augment": augment, "device": device, "policy": policy,
        "steps": timed_steps, "steps_per_execution": model.steps_per_execution,
        "fit_images_per_s": statistics.median(fit_ips),
        "bare_images_per_s": statistics.median(bare_ips), "ratio": statistics.median(ratios),
        "ratios": [round(v, 3) for v in ratios], "rounds": rounds,
        "startup_seconds": startup, "cpu_count": os.cpu_count(), "load_1min": os.getloadavg()[0],
        "versions": kr.versions(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--backbone", default="keras/MobileNetV3Small")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--augment", default="light", choices=("none", "light", "flip"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    r = measure(args.steps, args.backbone, args.img_size, args.batch_size, args.augment,
                args.rounds)
    print(f"{r['backbone']} {r['img_size']}px batch {r['batch_size']} ({r['device']}, "
          f"load {r['load_1min']:.1f} on {r['cpu_count']} cores): fit {r['fit_images_per_s']:.0f}"
          f" img/s, bare train_on_batch {r['bare_images_per_s']:.0f} img/s, ratio "
          f"{r['ratio']:.3f} (median of rounds {r['ratios']}); start-up "
          f"{r['startup_seconds']:.1f}s")
    print(json.dumps(r))  # last line: machine-readable for bench/train_overhead.py
    return 0


if __name__ == "__main__":
    sys.exit(main())
