"""Fold jobs on a real Ray cluster: ``ray start --head`` on 127.0.0.1 plus a worker node.

Everything runs as a user runs it: the cluster is two ``ray start --block`` processes (stopped by
their pids at the end), and ``run_folds.py --plan ... --executor ray --address ...`` runs in a
subprocess. Runs are tiny (16/32 px, K=2, 1-3 epochs, 300 demo scans).
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
from pathlib import Path

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

pytestmark = pytest.mark.slow


def ray_env(tmp: Path) -> dict[str, str]:
    """Token auth (Ray's default) with a token of this test session, not the user's ~/.ray."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": (tmp / "token").read_text(), "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A head node and a worker node on 127.0.0.1, one CPU each: two fold workers at once."""
    tmp = tmp_path_factory.mktemp("ray")
    # Ray's sockets live under the temp dir and AF_UNIX paths stop at 107 bytes: pytest's own
    # folders (deeper still under xdist: popen-gw0/) leave a second node's "plasma_store.1" past it.
    sockets = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    (tmp / "token").write_text(secrets.token_hex(32))
    env = ray_env(tmp)
    port = free_port()
    common = ["--num-cpus", "1", "--object-store-memory", str(80 * 2**20), "--block",
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
               wait: bool = True):
    cmd = [sys.executable, str(SCRIPT), *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def status(out: Path, plan: str) -> dict:
    return json.loads((out / "plans" / plan / "status.json").read_text())


def assert_same_run(a: Path, b: Path) -> None:
    for name in ("oof.parquet", "test.parquet", "test_folds.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(a / name), pd.read_parquet(b / name))


TWO = [{"backbone": "timm/resnet10t"}, {"backbone": "keras/MobileNetV3Small", "img_size": 32}]
RUNS = ("timm-resnet10t_16px", "keras-MobileNetV3Small_32px")


def test_two_backbone_plan_on_ray_equals_local(cluster, data: Path, tmp_path: Path) -> None:
    """torch and TensorFlow workers side by side; same files as the local executor, then the
    stack; a rerun on the cluster redoes nothing."""
    address, env = cluster
    out = {}
    for executor in ("local", "ray"):
        out[executor] = tmp_path / executor
        plan = write_plan(tmp_path / f"{executor}.yaml",
                          {**FAST, "data": str(data), "out": str(out[executor])}, TWO,
                          {"method": "mean"})
        extra = ["--address", address] if executor == "ray" else []
        proc = run_script(["--plan", str(plan), "--executor", executor, *extra], tmp_path, env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        assert "chosen: mean" in proc.stdout
    for run in RUNS:
        assert_same_run(out["local"] / "data" / run, out["ray"] / "data" / run)
    jobs = status(out["ray"], "ray")["jobs"]
    assert {j["state"] for j in jobs} == {"done"}
    assert len(jobs) == 2 * (1 + 2 + 1) + 1  # prepare, 2 folds, assemble per run; the stack
    by_family: dict[str, set[str]] = {}
    for j in jobs:
        if j["family"]:
            by_family.setdefault(j["family"], set()).add(j["worker"])
    assert not by_family["timm"] & by_family["keras"]  # never one process for both frameworks
    # fold jobs ran on the cluster's workers, two at a time at most (two CPUs)
    assert all(j["worker"] and not j["worker"].startswith("driver") for j in jobs
               if j["kind"] == "fold")

    again = run_script(["--plan", str(tmp_path / "ray.yaml"), "--executor", "ray",
                        "--address", address], tmp_path, env)
    assert again.returncode == 0, again.stderr[-3000:]
    jobs = status(out["ray"], "ray")["jobs"]
    assert not [j for j in jobs if j["kind"] == "fold"]  # every fold was done: none to train
    assert all("0 of 2 folds to train" in j["result"] for j in jobs if j["kind"] == "prepare")


def test_killed_worker_is_retried(cluster, data: Path, tmp_path: Path) -> None:
    """SIGKILL the worker in the middle of a fold: the job runs again and the run completes,
    with the same OOF as an uninterrupted local run."""
    address, env = cluster
    defaults = {**FAST, "epochs": 3, "data": str(data)}
    local = write_plan(tmp_path / "local.yaml", {**defaults, "out": str(tmp_path / "local")},
                       [TWO[0]])
    proc = run_script(["--plan", str(local)], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "ray"
    plan = write_plan(tmp_path / "kill.yaml", {**defaults, "out": str(out)}, [TWO[0]])
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
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    assert not fold_done_at_kill
    job = next(j for j in status(out, "kill")["jobs"] if j["job"] == victim["job"])
    assert job["state"] == "done" and job["attempts"] == 2, job
    assert job["worker"] != victim["worker"]  # a new process took it over
    assert_same_run(tmp_path / "local" / "data" / RUNS[0], run_dir)


def test_bad_input_fails_once_with_its_message(cluster, data: Path, tmp_path: Path,
                                               copy_dataset) -> None:
    """A corrupt image fails its run's job once, with the decoder's message naming the file;
    the jobs that needed it are skipped, a good run beside it completes."""
    address, env = cluster
    bad = copy_dataset(data, "bad")
    victim = sorted((bad / "train").rglob("*.png"))[5]
    victim.write_text("not an image")
    runs = [{**TWO[0], "data": str(bad)}, {**TWO[0], "run_name": "good"}]
    plan = write_plan(tmp_path / "bad.yaml", {**FAST, "data": str(data),
                                              "out": str(tmp_path / "out")}, runs)
    proc = run_script(["--plan", str(plan), "--executor", "ray", "--address", address],
                      tmp_path, env)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Traceback" not in proc.stderr.split("error:", 1)[-1]
    assert "1 image(s) could not be read" in proc.stderr and str(victim) in proc.stderr
    jobs = {j["job"]: j for j in status(tmp_path / "out", "bad")["jobs"]}
    failed = [j for j in jobs.values() if j["state"] == "failed"]
    assert len(failed) == 1 and failed[0]["kind"] == "prepare"
    assert failed[0]["attempts"] == 1  # raised, not retried
    assert "could not be read" in failed[0]["result"]
    assert jobs[f"{RUNS[0]}/assemble"]["state"] == "skipped"
    assert jobs["good/assemble"]["state"] == "done"
    assert (tmp_path / "out" / "data" / "good" / "oof.parquet").is_file()


def test_single_run_on_a_local_ray_instance(data: Path, tmp_path: Path) -> None:
    """No plan, no --address: ``run_folds.py --executor ray`` starts (and stops) its own Ray."""
    (tmp_path / "token").write_text(secrets.token_hex(32))
    args = ["--data", str(data), "--out", str(tmp_path / "runs"), "--executor", "ray",
            "--object-store-mb", "80", "--folds", "2", "--epochs", "1", "--img-size", "16",
            "--threads", "1", "--progress", "false"]
    proc = run_script(args, tmp_path, ray_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_dir = tmp_path / "runs" / "data" / RUNS[0]
    oof = pd.read_parquet(run_dir / "oof.parquet")
    assert len(oof) == 300 and oof["fold"].nunique() == 2
    accuracy = float(proc.stdout.rsplit("OOF accuracy ", 1)[1].split()[0])  # the last line
    assert accuracy > 0.3  # 10 classes: chance is 0.1
    jobs = status(tmp_path / "runs", RUNS[0])["jobs"]
    assert [j["kind"] for j in jobs] == ["prepare", "fold", "fold", "finish"]
