#!/usr/bin/env python
"""Service vs library: images/s and p50/p95 latency of ``serve.py`` against
``Ensemble.predict_proba`` in-process, on the same images, in one run.

The library side predicts batches of ``--batch`` encoded image files (decoding included, as in
the service). The service side is ``serve.py`` started as a subprocess on a free port of
127.0.0.1, sent the same batches as multipart uploads by 1 client, then by ``--clients``
concurrent clients. Both are warmed up first (traced shapes, thread pools). Target: the service
keeps >= 0.8x the library's images/s at batch 16.

    .venv/bin/python bench/serve_load.py STACK_OR_BUNDLE IMAGES_DIR [--batch 16] [--batches 30]
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def stats(name: str, latencies: list[float], images: int, seconds: float) -> dict:
    lat = np.asarray(latencies) * 1000
    return {"mode": name, "images/s": images / seconds, "p50 ms": float(np.percentile(lat, 50)),
            "p95 ms": float(np.percentile(lat, 95)), "requests": len(latencies)}


def library(stack: str, batches: list[list[bytes]], warmup: int) -> dict:
    from serve.bundle import Ensemble

    ens = Ensemble.load(stack)
    for b in batches[:warmup]:
        ens.predict_proba(b)
    lat = []
    t0 = time.perf_counter()
    for b in batches:
        t = time.perf_counter()
        ens.predict_proba(b)
        lat.append(time.perf_counter() - t)
    return stats("library Ensemble.predict_proba", lat, sum(map(len, batches)),
                 time.perf_counter() - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _send(post: Any, sessions: list[Any], batches: list[list[bytes]], i: int) -> float:
    return post(sessions[i % len(sessions)], batches[i])


def service(stack: str, batches: list[list[bytes]], clients: list[int], warmup: int
            ) -> list[dict]:
    import requests

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), stack, "--port", str(port),
                             "--max-files", str(max(len(b) for b in batches))],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"serve.py exited; see {log.name}")
            try:
                if requests.get(url + "/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"serve.py did not start in 300 s; see {log.name}")
            time.sleep(0.5)

        def post(session: requests.Session, batch: list[bytes]) -> float:
            t = time.perf_counter()
            r = session.post(url + "/predict", timeout=300,
                             files=[("file", (f"{i}.png", b)) for i, b in enumerate(batch)])
            r.raise_for_status()
            assert len(r.json()["predictions"]) == len(batch)
            return time.perf_counter() - t

        out = []
        for n in clients:
            sessions = [requests.Session() for _ in range(n)]
            send = functools.partial(_send, post, sessions, batches)
            with ThreadPoolExecutor(n) as pool:  # warm-up: every batch size the server will see
                list(pool.map(send, range(warmup * n)))
                t0 = time.perf_counter()
                lat = list(pool.map(send, range(len(batches))))
                seconds = time.perf_counter() - t0
            out.append(stats(f"service, {n} client(s)", lat, sum(map(len, batches)), seconds))
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        os.unlink(log.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stack", help="stack folder or exported bundle")
    parser.add_argument("images", help="folder of image files (cycled)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    files = sorted(p for p in Path(args.images).iterdir() if p.is_file())
    blobs = [p.read_bytes() for p in files]
    batches = [[blobs[(b * args.batch + i) % len(blobs)] for i in range(args.batch)]
               for b in range(args.batches)]
    rows = [library(args.stack, batches, args.warmup)]
    rows += service(args.stack, batches, sorted({1, args.clients}), args.warmup)
    base = rows[0]["images/s"]
    print(f"{len(batches)} batches of {args.batch} images ({len(files)} distinct files), "
          f"{os.cpu_count()} CPU cores")
    print(f"{'mode':34} {'images/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'x library':>10}")
    for r in rows:
        print(f"{r['mode']:34} {r['images/s']:9.1f} {r['p50 ms']:8.1f} {r['p95 ms']:8.1f} "
              f"{r['images/s'] / base:10.2f}")
    print("target: service >= 0.80x the library's images/s at batch 16")


if __name__ == "__main__":
    main()
