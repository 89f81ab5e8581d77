"""Fold jobs on a real Ray cluster: ``ray start --head`` on 127.0.0.1 plus a worker node.

Everything runs as a user runs it: the cluster is two ``ray start --block`` processes (stopped by
their pids at the end), and ``run_folds.py --plan ... --executor ray --address ...`` runs in a
subprocess. Runs are tiny (16/32 px, K=2, 1-3 epochs, 300 demo scans). The thread count of a
fold job orders its float sums: a plan run on the cluster and the same plan run locally compute
on the run's thread count and give the same OOF, bit for bit.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import write_demo_subset
from tests.requirements import INSTALL_RAY, require_module, require_program

require_module("ray", INSTALL_RAY)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run_folds.py"
RAY = Path(require_program("ray", INSTALL_RAY))
FAST = {"folds": 2, "epochs": 1, "img_size": 16, "threads": 1, "progress": False}
NODE_CPUS = 2  # each node: one fold job of 2 threads, or two of 1
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "TF_NUM_INTRAOP_THREADS")

pytestmark = pytest.mark.slow


def ray_env(tmp: Path) -> dict[str, str]:
    """Token auth (Ray's default) with a token of this test session, not the user's ~/.ray;
    no thread-count variables (the suite's one thread a worker), as on a user's machine."""
    return {**{k: v for k, v in os.environ.items() if k not in THREAD_VARS},
            "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": (tmp / "token").read_text(), "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A head node and a worker node on 127.0.0.1, 2 CPUs each: two fold workers of 2 threads
    at once (or four of one)."""
    tmp = tmp_path_factory.mktemp("ray")
    # Ray's sockets live under the temp dir and AF_UNIX paths stop at 107 bytes: pytest's own
    # folders (deeper still under xdist: popen-gw0/) leave a second node's "plasma_store.1" past it.
    sockets = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    (tmp / "token").write_text(secrets.token_hex(32))
    env = ray_env(tmp)
    port = free_port()
    common = ["--num-cpus", str(NODE_CPUS), "--object-store-memory", str(80 * 2**20), "--block",
              "--disable-usage-stats"]
    procs = [start_node(["--head", "--port", str(port), "--include-dashboard", "false",
                         "--temp-dir", str(sockets), *common], tmp / "head.log", env)]
    address = f"127.0.0.1:{port}"
    try:
        _wait_for(tmp / "head.log", 90)
        procs.append(start_node(["--address", address, *common], tmp / "worker.log", env))
        _wait_for(tmp / "worker.log", 90)
        yield address, env
    finally:
        for p in reversed(procs):  # --block: SIGTERM stops the node's own processes
            p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(sockets, ignore_errors=True)


def start_node(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([str(RAY), "start", "--node-ip-address", "127.0.0.1", *args],
                                env=env, stdout=fh, stderr=subprocess.STDOUT)


def _wait_for(log: Path, timeout: float) -> None:
    """Wait for ``ray start`` to report its node up; on a timeout, show why from its log."""
    end = time.time() + timeout
    while time.time() < end:
        if "Ray runtime started" in log.read_text():
            return
        time.sleep(0.5)
    raise AssertionError(f"{log.name}: Ray did not start in {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def data(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_subset(demo_dir, tmp_path_factory.mktemp("raydata") / "data", 30, 40)


def write_plan(path: Path, defaults: dict, runs: list[dict], stack: dict | None = None) -> Path:
    plan = {"defaults": defaults, "runs": runs, **({"stack": stack} if stack else {})}
    path.write_text(yaml.safe_dump(plan))
    return path


def run_script(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600,
               wait: bool = True, preexec: Callable[[], None] | None = None):
    cmd = [sys.executable, str(SCRIPT), *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec)


def two_cores() -> None:
    """A 2-core machine (in a child, before exec): what a thread count left out resolves to."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])


def status(out: Path, plan: str) -> dict:
    return json.loads((out / "plans" / plan / "status.json").read_text())


def assert_same_run(a: Path, b: Path, exact: bool = False) -> float:
    """The run's matrices equal (bit for bit if ``exact``); the largest probability difference."""
    worst = 0.0
    for name in ("oof.parquet", "test.parquet", "test_folds.parquet"):
        want, got = pd.read_parquet(a / name), pd.read_parquet(b / name)
        cols = [c for c in want.columns if "__" in c]
        worst = max(worst, float(np.abs(got[cols].to_numpy() - want[cols].to_numpy()).max()))
        pd.testing.assert_frame_equal(got, want, check_exact=exact, obj=name)
    return worst


def recorded_threads(run_dir: Path) -> tuple[Any, Any]:
    meta = json.loads((run_dir / "meta.json").read_text())
    return meta["config"]["threads"], yaml.safe_load((run_dir / "config.yaml").read_text())[
        "threads"]


TWO = [{"backbone": "timm/resnet10t"}, {"backbone": "keras/MobileNetV3Small", "img_size": 32}]
RUNS = ("timm-resnet10t_16px", "keras-MobileNetV3Small_32px")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_two_backbone_plan_on_ray_equals_local_bit_for_bit_on_two_threads(
        cluster, data: Path, tmp_path: Path) -> None:
    """torch and TensorFlow workers side by side, then the stack; the timm run writes the same
    files as the local executor, the Keras run completes; a rerun on the cluster redoes
    nothing. Two threads a fold job, as on a user's 2-core machine (not the suite's one
    thread): the plan gives no thread count, so both drivers resolve it to the machine's 2 cores
    and record it as a number, and each Ray worker reserves those 2 CPUs. The timm run's OOF
    equals the local one bit for bit (Ray's 1-CPU workers computed on 1 thread and did not). A
    --cpus-per-job that differs from --threads, or a count no node holds, is refused before
    anything is trained."""
    address, env = cluster
    out, procs = {}, {}
    defaults = {k: v for k, v in FAST.items() if k != "threads"}
    # the local twin is the timm run alone: the Keras run is checked on Ray (its local twin was
    # only compared within a tolerance, for a TensorFlow start and two folds traced and trained)
    for executor, runs, stack in (("local", TWO[:1], None), ("ray", TWO, {"method": "mean"})):
        out[executor] = tmp_path / executor
        plan = write_plan(tmp_path / f"{executor}.yaml",
                          {**defaults, "data": str(data), "out": str(out[executor])}, runs, stack)
        extra = ["--address", address] if executor == "ray" else []
        proc = procs[executor] = run_script(["--plan", str(plan), "--executor", executor, *extra],
                                            tmp_path, env, preexec=two_cores)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "chosen: mean" in procs["ray"].stdout
    assert recorded_threads(out["local"] / "data" / RUNS[0]) == (2, 2)
    for run in RUNS:
        assert recorded_threads(out["ray"] / "data" / run) == (2, 2)
    worst = assert_same_run(out["local"] / "data" / RUNS[0], out["ray"] / "data" / RUNS[0],
                            exact=True)
    print(f"timm, local vs Ray on 2 threads: max abs difference {worst}")
    assert worst == 0.0
    keras_oof = pd.read_parquet(out["ray"] / "data" / RUNS[1] / "oof.parquet")
    assert len(keras_oof) == 300 and sorted(keras_oof["fold"].unique()) == [0, 1]
    assert "fold workers of 2 CPU(s)" in procs["ray"].stderr, procs["ray"].stderr[-3000:]
    jobs = status(out["ray"], "ray")["jobs"]
    assert {j["state"] for j in jobs} == {"done"}
    assert len(jobs) == 2 * (1 + 2 + 1) + 1  # prepare, 2 folds, assemble per run; the stack
    by_family: dict[str, set[str]] = {}
    for j in jobs:
        if j["family"]:
            by_family.setdefault(j["family"], set()).add(j["worker"])
    assert not by_family["timm"] & by_family["keras"]  # never one process for both frameworks
    # fold jobs ran on the cluster's workers, two at a time at most (2-CPU shares of 4 CPUs)
    assert all(j["worker"] and not j["worker"].startswith("driver") for j in jobs
               if j["kind"] == "fold")

    again = run_script(["--plan", str(tmp_path / "ray.yaml"), "--executor", "ray",
                        "--address", address], tmp_path, env)
    assert again.returncode == 0, again.stderr[-3000:]
    jobs = status(out["ray"], "ray")["jobs"]
    assert not [j for j in jobs if j["kind"] == "fold"]  # every fold was done: none to train
    assert all("0 of 2 folds to train" in j["result"] for j in jobs if j["kind"] == "prepare")

    ray_args = ["--data", str(data), "--folds", "2", "--epochs", "1", "--img-size", "16",
                "--progress", "false", "--executor", "ray", "--address", address]
    mismatch = run_script([*ray_args, "--out", str(tmp_path / "mismatch"), "--threads", "2",
                           "--cpus-per-job", "1"], tmp_path, env)
    assert mismatch.returncode == 2, mismatch.stderr[-3000:]
    assert "threads 2 but --cpus-per-job 1" in mismatch.stderr
    too_many = run_script([*ray_args, "--threads", str(NODE_CPUS + 1), "--out",
                           str(tmp_path / "big")], tmp_path, env)
    assert too_many.returncode == 2, too_many.stderr[-3000:]
    assert f"a fold job of --threads {NODE_CPUS + 1} reserves" in too_many.stderr
    assert not (tmp_path / "big" / "data").exists()


def test_killed_worker_is_retried_and_bad_input_fails_once(cluster, data: Path, tmp_path: Path,
                                                           copy_dataset) -> None:
    """One Ray plan of two runs (one driver and one set of workers for both checks):

    SIGKILL the worker in the middle of a fold of the good run: the job runs again and the run
    completes, with the same OOF as an uninterrupted local run.

    A corrupt image of the other run fails that run's job once, with the decoder's message
    naming the file; the jobs that needed it are skipped, the good run beside it completes."""
    address, env = cluster
    defaults = {**FAST, "epochs": 3, "data": str(data)}
    local = write_plan(tmp_path / "local.yaml", {**defaults, "out": str(tmp_path / "local")},
                       [TWO[0]])
    proc = run_script(["--plan", str(local)], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    bad = copy_dataset(data, "bad")
    broken = sorted((bad / "train").rglob("*.png"))[5]
    broken.write_text("not an image")
    out = tmp_path / "ray"
    plan = write_plan(tmp_path / "kill.yaml", {**defaults, "out": str(out)},
                      [TWO[0], {**TWO[0], "data": str(bad), "run_name": "bad"}])
    proc = run_script(["--plan", str(plan), "--executor", "ray", "--address", address],
                      tmp_path, env, wait=False)
    run_dir = out / "data" / RUNS[0]
    victim = None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            jobs = status(out, "kill")["jobs"]
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        for j in jobs:
            # an epoch of the fold is written: it is training, and far from done (3 epochs)
            if (j["kind"] == "fold" and j["state"] == "running"
                    and (run_dir / "parts" / f"fold{j['fold']}_history.csv").exists()):
                victim = j
                os.kill(int(j["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
                break
    assert victim is not None, "no fold was seen training"
    fold_done_at_kill = (run_dir / "parts" / f"fold{victim['fold']}.json").exists()
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 2, stdout[-3000:] + stderr[-5000:]  # the bad run failed

    assert not fold_done_at_kill
    jobs = {j["job"]: j for j in status(out, "kill")["jobs"]}
    job = jobs[victim["job"]]
    assert job["state"] == "done" and job["attempts"] == 2, job
    assert job["worker"] != victim["worker"]  # a new process took it over
    assert jobs[f"{RUNS[0]}/assemble"]["state"] == "done"
    assert_same_run(tmp_path / "local" / "data" / RUNS[0], run_dir)

    assert "\nerror: " in stderr, stderr[-5000:]
    message = stderr.rsplit("\nerror: ", 1)[-1]  # the driver's last words
    assert "1 image(s) could not be read" in message and str(broken) in message, stderr[-5000:]
    assert "Traceback" not in message
    failed = [j for j in jobs.values() if j["state"] == "failed"]
    assert len(failed) == 1 and failed[0]["job"] == "bad/prepare"
    assert failed[0]["attempts"] == 1  # raised, not retried
    assert "could not be read" in failed[0]["result"]
    assert jobs["bad/assemble"]["state"] == "skipped"
