#!/usr/bin/env python
"""Car-scale image handling: the streaming cache build and one fold's memory.

Generates (once, into ``$FOLDSTACK_CACHE/bench_scale``) a synthetic set the size of the car
photos: 15,561 training + 6,675 test JPEGs, 640x480, textured (gradients, stripes, shapes and
grain, so JPEG decoding costs what a photo costs), 196 classes. Then prints, in one run:

1. decode throughput of the cache build (``oof.images.build_cache``: worker processes decode
   chunks straight into the ``.npy``) against a bare parallel PIL loop on the same cores that
   decodes the same files and throws the pixels away (target: build >= 0.9x bare); the build
   is timed between two bare runs, with no memory sampler running;
2. the cache build's peak memory, builder plus its workers (target < 1.5 GB at 512 px), from a
   second build;
3. one fold's peak memory (``run_folds.py --fold 0``, timm/resnet10t) at 224 and 512 px, for N
   and 2N images (target: grows with the image size, model and batch, not with N). Below
   N = 1280 the held-out fold (N/5 rows) is smaller than the backends' inference batch of 256,
   so a larger N means larger batches, and memory grows with N for that reason alone.

Memory is the peak over time of the summed RSS of the process tree, sampled from /proc every
50 ms, split into anonymous memory (what the process owns) and file-backed pages (page cache
mapped into it; shared and reclaimable). ``--scale 0.1`` runs everything on a tenth of the set.

    nice -n 10 .venv/bin/python bench/scale_images.py --scale 0.1     # a quick look
    nice -n 10 .venv/bin/python bench/scale_images.py                 # the car-sized set
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_TRAIN, N_TEST, N_CLASSES = 15_561, 6_675, 196
W, H = 640, 480


# ------------------------------------------------------------------------------ the data set

def synthetic_photo(seed: int) -> np.ndarray:
    """A 480x640 RGB picture with structure at several scales, seeded."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    img = np.empty((H, W, 3), dtype=np.float32)
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(0.02, 0.15)
    wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq)
    for c in range(3):
        a, b, base = rng.uniform(-0.2, 0.2, 2).tolist() + [rng.uniform(60, 190)]
        img[..., c] = base + a * xx + b * yy + rng.uniform(10, 40) * wave
    for _ in range(rng.integers(3, 8)):  # a few blobs: the "car" and its surroundings
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        ry, rx = rng.uniform(20, 120), rng.uniform(40, 200)
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        img[mask] = rng.uniform(0, 255, 3)
    grain = rng.normal(0, 6, (H // 4, W // 4, 3)).astype(np.float32)
    img += np.kron(grain, np.ones((4, 4, 1), dtype=np.float32))
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_photos(jobs: list[tuple[str, int]]) -> None:
    from PIL import Image

    for path, seed in jobs:
        if not os.path.exists(path):
            tmp = f"{path}.tmp"
            Image.fromarray(synthetic_photo(seed)).save(tmp, format="JPEG", quality=90)
            os.replace(tmp, path)


def ensure_dataset(root: Path, workers: int) -> Path:
    """The full set, generated once (resumable); ``train.csv`` (path,label) and ``test.csv``."""
    done = root / "complete.json"
    if done.exists():
        return root
    train = [(str(root / "train" / f"c{i % N_CLASSES:03d}" / f"{i:05d}.jpg"), i)
             for i in range(N_TRAIN)]
    test = [(str(root / "test" / f"{i:05d}.jpg"), 10**6 + i) for i in range(N_TEST)]
    for p, _ in train + test:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    jobs = train + test
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_photos, [jobs[i:i + 200] for i in range(0, len(jobs), 200)]))
    print(f"generated {len(jobs)} JPEGs {W}x{H} in {time.perf_counter() - t0:.0f}s -> {root}")
    done.write_text(json.dumps({"train": N_TRAIN, "test": N_TEST}))
    return root


def subset(root: Path, n_train: int, n_test: int, out: Path) -> Path:
    """A csv-layout dataset of the first images (``out/train.csv`` + ``out/test.csv``)."""
    out.mkdir(parents=True, exist_ok=True)
    # 10 labels, so that K=5 stratified folds exist for a few hundred images (memory does not
    # depend on the labels)
    rows = ["path,label"] + [f"{root}/train/c{i % N_CLASSES:03d}/{i:05d}.jpg,l{i % 10}"
                             for i in range(n_train)]
    (out / "train.csv").write_text("\n".join(rows) + "\n")
    tests = ["path"] + [f"{root}/test/{i:05d}.jpg" for i in range(n_test)]
    (out / "test.csv").write_text("\n".join(tests) + "\n")
    return out / "train.csv"


# ------------------------------------------------------------------------------ measuring

def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _rss(pids: list[int]) -> tuple[int, int]:
    """Summed (anonymous, file-backed + shmem) resident kB of ``pids``."""
    anon = file = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        anon += int(line.split()[1])
                    elif line.startswith(("RssFile:", "RssShmem:")):
                        file += int(line.split()[1])
        except OSError:
            continue
    return anon, file


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``cmd``; its seconds and the peak RSS (MB) of its process tree, sampled."""
    peak = {"anon": 0, "file": 0, "total": 0}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout or []), daemon=True)
    reader.start()
    t0 = time.perf_counter()
    while proc.poll() is None:
        anon, file = _rss(_tree(proc.pid))
        peak["anon"], peak["file"] = max(peak["anon"], anon), max(peak["file"], file)
        peak["total"] = max(peak["total"], anon + file)
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    reader.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{''.join(out)[-3000:]}")
    result = {k: v / 1024 for k, v in peak.items()}
    result["seconds"] = seconds
    for line in out:  # a child may report its own numbers as JSON on its last line
        if line.startswith("{"):
            result.update(json.loads(line))
    return result


def _bare_decode(paths: list[str], size: int) -> int:
    """What any decoder must do per file: open, DCT-draft, decode, resize, one copy of the
    pixels out of Pillow; no EXIF, no mode conversion (the set is RGB), no storage."""
    from PIL import Image

    for p in paths:
        with Image.open(p) as im:
            im.draft("RGB", (size, size))
            im.load()
            im = im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
            im.tobytes()
    return len(paths)


def bare_throughput(paths: list[str], size: int, workers: int) -> float:
    """Images per second of a bare parallel PIL loop over ``paths`` (same chunks, processes)."""
    import multiprocessing

    from oof.images import CHUNK

    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        n = sum(pool.map(_bare_decode, [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)],
                         [size] * len(range(0, len(paths), CHUNK))))
    return n / (time.perf_counter() - t0)


BUILD = """
import json, sys, time
from pathlib import Path
from oof.images import build_cache
paths = Path(sys.argv[1]).read_text().split("\\n")
t0 = time.perf_counter()
build_cache(paths, int(sys.argv[2]), Path(sys.argv[3]), workers=int(sys.argv[4]), progress=False)
print(json.dumps({"build_seconds": time.perf_counter() - t0}))
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0,
                    help="fraction of the car-sized set used by the measurements")
    ap.add_argument("--build-size", type=int, default=512, help="cache build: image size")
    ap.add_argument("--fold-sizes", type=int, nargs="*", default=[224, 512],
                    help="image sizes of the fold measurement (none: skip it)")
    ap.add_argument("--fold-images", type=int, default=1280,
                    help="N: images of the smaller fold run (the other has 2N); keep N >= 1280 "
                    "so that every batch of the fold is full (the backends predict and "
                    "re-estimate BatchNorm in batches of 256: a held-out fold of N/5 rows)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="decode processes (all cores)")
    ap.add_argument("--dir", type=Path, default=None, help="where the set and caches live")
    ap.add_argument("--keep-cache", action="store_true", help="keep the big cache file")
    args = ap.parse_args(argv)

    from oof.demo import cache_root
    from oof.images import default_workers

    workers = args.workers or default_workers()
    base = args.dir or cache_root() / "bench_scale"
    data = ensure_dataset(base / "photos", workers)
    n = max(CHUNK_MIN, round(N_TRAIN * args.scale))
    paths = [f"{data}/train/c{i % N_CLASSES:03d}/{i:05d}.jpg" for i in range(n)]
    print(f"{n} training JPEGs {W}x{H} (scale {args.scale:g}), {workers} decode processes, "
          f"cache at {args.build_size}px = {n * args.build_size**2 * 3 / 2**30:.2f} GiB")

    # 1 + 2: decode throughput and the build's peak memory
    size = args.build_size
    list_file = base / "paths.txt"
    list_file.write_text("\n".join(paths))
    target = base / f"bench_{size}px.npy"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    build_cmd = [sys.executable, "-c", BUILD, str(list_file), str(size), str(target), str(workers)]

    def timed_build() -> float:
        """Build seconds, nothing sampling beside it (the sampler's /proc walks every 50 ms take
        a tenth of a core, which the bare loop would not pay)."""
        target.unlink(missing_ok=True)
        proc = subprocess.run(build_cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"cache build failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])["build_seconds"]

    bare_a = bare_throughput(paths, size, workers)
    build_seconds = timed_build()
    bare_b = bare_throughput(paths, size, workers)
    target.unlink(missing_ok=True)
    build = run_measured(build_cmd, env)  # again, sampled: its peak memory
    if not args.keep_cache:
        target.unlink(missing_ok=True)
    bare = (bare_a + bare_b) / 2
    built = n / build_seconds
    print(f"\ncache build at {size}px: {built:.0f} img/s; bare parallel PIL decode "
          f"{bare:.0f} img/s (runs {bare_a:.0f}, {bare_b:.0f}) -> ratio {built / bare:.2f} "
          f"(target >= 0.9)")
    print(f"cache build peak memory (builder + workers): {build['total']:.0f} MB "
          f"(anonymous {build['anon']:.0f} MB, file-backed {build['file']:.0f} MB; "
          f"target < 1500 MB; the pixels are {n * size**2 * 3 / 2**20:.0f} MB)")

    # 3: one fold's peak memory, N and 2N images, at each size
    rows = []
    for size in args.fold_sizes:
        for n_imgs in (args.fold_images, 2 * args.fold_images):
            ds = subset(data, n_imgs, n_imgs // 4, base / f"sub_{n_imgs}")
            out = base / "runs"
            from oof.datasets import load_dataset
            from oof.images import cached_images

            d = load_dataset(str(ds), "csv", None)
            for part in (d.train, d.test):  # decoded beforehand: the fold alone is measured
                cached_images(list(part["path"]), size, out / d.name / "cache", progress=False)
            cmd = [sys.executable, str(ROOT / "run_folds.py"), "--data", str(ds),
                   "--out", str(out), "--fold", "0", "--folds", "5", "--epochs", "1",
                   "--img-size", str(size), "--batch-size", str(args.batch_size),
                   "--backbone", "timm/resnet10t", "--progress", "false",
                   "--run-name", f"bench_{size}_{n_imgs}_{time.time_ns()}"]
            m = run_measured(cmd, env)
            copy_mb = n_imgs * size**2 * 3 / 2**20
            rows.append((size, n_imgs, m, copy_mb))
    if not rows:
        return
    print(f"\none fold (timm/resnet10t, batch {args.batch_size}, 1 epoch, K=5, fold 0), "
          "peak memory of its process:")
    print("| size | train images | test images | seconds | peak MB | anonymous MB | "
          "file-backed MB | a per-fold copy would add MB |")
    print("|---|---|---|---|---|---|---|---|")
    for size, n_imgs, m, copy_mb in rows:
        print(f"| {size} | {n_imgs} | {n_imgs // 4} | {m['seconds']:.0f} | {m['total']:.0f} | "
              f"{m['anon']:.0f} | {m['file']:.0f} | {copy_mb:.0f} |")
    for size in args.fold_sizes:
        a, b = [r[2] for r in rows if r[0] == size]
        print(f"{size}px: 2N/N peak ratio {b['total'] / a['total']:.2f} (anonymous "
              f"{b['anon'] / a['anon']:.2f}); 1.00 = flat in the number of images")


CHUNK_MIN = 64

if __name__ == "__main__":
    main()
