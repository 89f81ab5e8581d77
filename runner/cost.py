"""What a run costs to serve, measured where it was trained (issue 30 item 1).

A run predicts an image with each of its K fold models on each of its V TTA views: K x V forward
passes. The milliseconds are measured, not estimated: fold 0's checkpoint is loaded through its
family's ``load_predictor`` (as ``predict.py`` loads it, on the CPU, at the run's thread count)
and its ``predict_proba`` (batches of the family's prediction batch size, every view) is timed
on a fixed slice of the decoded test images after one warm-up call, best of ``COST_REPEATS``
calls (as ``timeit`` advises: the slower calls measure whatever else the machine was doing).
Every fold model of a run has the same architecture and input size, so K fold models cost K
times fold 0. ``run_folds.py --remeasure-cost`` times a finished run again.

Keys written into ``meta.json`` (``ensemble.cost.meta_cost`` reads the first two):
``passes_per_image`` (K x V; ``Family.passes_per_image``: the probe's K heads share one backbone
pass per view), ``ms_per_image`` (the whole run per image: ms_per_pass x passes,
what a stack adds up over its runs), ``ms_per_pass`` (one model, one view, per image: a refit
model costs V of them) and ``cost`` (how and where it was measured).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: images timed (the first of the test set; fewer when the set is smaller)
COST_IMAGES = 256
#: timed calls after the warm-up; the fastest is the figure
COST_REPEATS = 3


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_ms_per_pass(family: Any, run_meta: dict[str, Any], checkpoint: Path,
                        images: np.ndarray, threads: int,
                        n_images: int = COST_IMAGES) -> dict[str, Any]:
    """Milliseconds per image per pass (one model, one view) of ``checkpoint``'s predictor.

    ``images``: uint8 (N, H, W, 3) at the run's input size; the first ``n_images`` are timed.
    """
    from backbones.fold import run_views

    n = min(n_images, len(images))
    if n == 0:
        raise ValueError("no images to time the prediction on")
    batch = np.array(images[:n], dtype=np.uint8)  # a copy: the cache maps are read-only
    t0 = time.perf_counter()
    predictor = family.load_predictor(run_meta, checkpoint, threads, "cpu")
    load_seconds = time.perf_counter() - t0
    views = len(run_views(run_meta, {"fold": 0}, int(run_meta["backbone"]["input_size"])))
    predictor.predict_proba(batch)  # warm-up: thread pools, allocator, lazy initialisation
    each = []
    for _ in range(COST_REPEATS):
        t0 = time.perf_counter()
        predictor.predict_proba(batch)
        each.append(time.perf_counter() - t0)
    seconds = min(each)
    return {"ms_per_pass": seconds * 1000.0 / (n * views), "views": views, "images": n,
            "seconds": seconds, "seconds_each": each, "load_seconds": load_seconds,
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "batch_size": min(int(family.predict_batch_size), n), "threads": threads,
            "device": "cpu", "cpu": cpu_model(), "machine": platform.machine(),
            "cores": os.cpu_count(), "checkpoint": f"checkpoints/{checkpoint.name}"}


def run_cost(family: Any, run_meta: dict[str, Any], checkpoint_dir: Path, folds: int,
             images: np.ndarray, threads: int) -> dict[str, Any]:
    """The meta.json cost keys of a level-1 run of ``folds`` fold models (see the module)."""
    m = measure_ms_per_pass(family, run_meta, checkpoint_dir / family.checkpoint_name(0),
                            images, threads)
    passes = family.passes_per_image(folds, m["views"])
    log.info("cost: %d passes per image (%d folds, %d views), %.3f ms per pass, %.3f ms per "
             "image on %s, %d threads", passes, folds, m["views"], m["ms_per_pass"],
             m["ms_per_pass"] * passes, m["cpu"], threads)
    return {"passes_per_image": passes, "ms_per_image": m["ms_per_pass"] * passes,
            "ms_per_pass": m["ms_per_pass"], "cost": {**m, "folds": folds}}
