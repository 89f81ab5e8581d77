"""``run_folds.py --executor ray`` on the local Ray instance it starts, as a user runs it.

The kill -9 campaign of ``tests/test_faults.py`` on Ray: a worker killed while it trains a fold,
then the driver killed while folds are left; the rerun trains only what was left and ends where
an uninterrupted run ends. (Local vs Ray bit for bit on 2 threads a job:
``tests/test_ray_executor.py``.) Each test runs its drivers in Ray sessions of its own: a
private temp dir (short, for AF_UNIX socket paths), a private token, and a marker in the
environment that every process of the session inherits, so the test can tell that none outlived
its driver.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.conftest import write_demo_subset
from tests.requirements import INSTALL_RAY, require_module

require_module("ray", INSTALL_RAY)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run_folds.py"
RUN = "timm-resnet10t_16px"


@pytest.fixture
def ray_env() -> Iterator[tuple[dict[str, str], str]]:
    """The environment of this test's drivers, and the marker their Ray processes carry."""
    tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    marker = f"FOLDSTACK_TEST_SESSION={secrets.token_hex(8)}"
    name, value = marker.split("=")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(tmp), name: value,
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}
    yield env, marker
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def small(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 demo scans: epochs long enough to kill a worker in the middle of a fold."""
    return write_demo_subset(demo_dir, tmp_path_factory.mktemp("raysmall") / "data", 30, 10)


def run(args: list[str], cwd: Path, env: dict[str, str],
        preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, preexec_fn=preexec)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def matrices(run_dir: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(run_dir / f"{name}.parquet")
            for name in ("oof", "test", "test_folds")}


def assert_same(a: Path, b: Path) -> float:
    """Every probability of two runs equal, bit for bit; the largest difference (0.0)."""
    want, got = matrices(a), matrices(b)
    worst = 0.0
    for name in want:
        cols = [c for c in want[name].columns if "__" in c]
        diff = np.abs(got[name][cols].to_numpy() - want[name][cols].to_numpy())
        worst = max(worst, float(diff.max()))
    print(f"max abs difference of the probabilities: {worst}")
    for name in want:
        pd.testing.assert_frame_equal(got[name], want[name], check_exact=True, obj=name)
    return worst


def jobs_of(out: Path) -> list[dict[str, Any]]:
    """The job table of the driver's plan (one run: the plan is named after it)."""
    try:
        return json.loads((out / "plans" / RUN / "status.json").read_text())["jobs"]
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet
        return []


def ray_processes(env: dict[str, str], marker: str) -> list[str]:
    """Live processes of the Ray sessions under ``env``'s temp dir: each keeps its log files
    there open (after the folder is gone too); or whose environment still holds ``marker``
    (Ray's process titles can overwrite the start of it)."""
    tmp = env["RAY_TMPDIR"]
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            ours = marker.encode() in (proc / "environ").read_bytes()  # a zombie reads empty
            ours = ours or any(os.readlink(fd).startswith(tmp) for fd in (proc / "fd").iterdir())
            if ours:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{proc.name}: {cmd.strip()[:150]}")
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


def ours(processes: list[str]) -> list[str]:
    """The processes of ``ray_processes`` that run foldstack's code: Ray workers and drivers.
    Ray's own processes are known by their command line or their process title (an agent may
    retitle itself ``ray::RuntimeEnvAgent``), spelled with or without underscores."""
    agents = ("dashboard", "runtimeenv", "raylet", "gcsserver", "logmonitor", "monitor.py")
    return [p for p in processes if not any(a in p.lower().replace("_", "") for a in agents)]


def wait_until(what: Callable[[], Any], driver: subprocess.Popen | None, log: Path,
               timeout: float = 300) -> Any:
    """Poll ``what`` until it returns something true; fail if the driver ends first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = what()
        if got:
            return got
        if driver is not None and driver.poll() is not None:
            pytest.fail(f"the driver ended ({driver.returncode}) first:\n"
                        f"{log.read_text()[-5000:]}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what.__doc__}:\n{log.read_text()[-5000:]}")


# --------------------------------------------------------------------------- kill -9 on Ray
def test_ray_worker_then_driver_killed_rerun_redoes_nothing_finished(
        small: Path, tmp_path: Path, ray_env: tuple[dict[str, str], str]) -> None:
    """kill -9 a Ray worker while it trains a fold: its job runs again on a new worker. Then
    kill -9 the driver once a fold is finished and the killed one is running again: its Ray
    instance and workers go with it, releasing their fold locks. The rerun trains only the
    folds left, leaves the finished folds' files untouched, and its OOF and test matrices equal
    an uninterrupted run's bit for bit."""
    env, marker = ray_env
    t0 = time.monotonic()
    args = ["--data", str(small), "--folds", "3", "--epochs", "3", "--img-size", "16",
            "--progress", "false", "--threads", "1"]  # two workers at once on 2 cores
    out = tmp_path / "ray"
    ray_args = [*args, "--out", str(out), "--executor", "ray", "--object-store-mb", "80"]
    parts = out / "data" / RUN / "parts"
    log = tmp_path / "driver.log"
    with open(log, "w") as fh:
        driver = subprocess.Popen([sys.executable, str(SCRIPT), *ray_args], cwd=tmp_path,
                                  env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        def training() -> dict[str, Any] | None:
            """a fold job with an epoch written"""
            return next((j for j in jobs_of(out) if j["kind"] == "fold"
                         and j["state"] == "running" and j["attempts"] == 1
                         and (parts / f"fold{j['fold']}_history.csv").exists()), None)

        victim = wait_until(training, driver, log)
        os.kill(int(victim["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
        assert not (parts / f"fold{victim['fold']}.json").exists(), "it ended before the kill"

        def retried_and_one_running() -> dict[str, Any] | None:
            """the killed fold's job run again; a fold done, and another still running"""
            jobs = {j["job"]: j for j in jobs_of(out)}
            if jobs[victim["job"]]["attempts"] < 2:
                return None
            done = {k for k in range(3) if (parts / f"fold{k}.json").exists()}
            # any running fold: one just started trains 3 epochs of 200 images in about 1 s,
            # less than the driver takes to publish its status, so waiting for a fresh one
            # could see the run end first (it did, once, on a 2-core Intel Xeon)
            return next((j for j in jobs.values() if j["kind"] == "fold"
                         and j["state"] == "running" and j["fold"] not in done
                         and done - {j["fold"]}), None)

        running = wait_until(retried_and_one_running, driver, log)
        driver.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    job = next(j for j in jobs_of(out) if j["job"] == victim["job"])
    assert job["worker"] != victim["worker"], job  # a new worker took the fold over

    from filelock import FileLock, Timeout

    def locks_free() -> bool:
        """the driver's workers to exit and free their fold locks"""
        for k in range(3):
            try:
                with FileLock(out / "data" / RUN / ".locks" / f"fold{k}.lock").acquire(timeout=0):
                    pass
            except Timeout:
                return False
        return True

    wait_until(locks_free, None, log, timeout=60)
    orphaned = time.monotonic() - killed_at
    done = sorted(int(p.name[4]) for p in parts.glob("fold?.json"))
    # killed mid-run: a fold finished and one not. The fold seen running may have finished in
    # the moment between the check and the kill on a loaded machine; another is then unfinished.
    assert 0 < len(done) < 3, (done, running)
    finished = {p: p.stat().st_mtime_ns for p in [*parts.iterdir(),
                                                   *(parts.parent / "checkpoints").iterdir()]
                if p.name.startswith("fold") and int(p.name[4]) in done}
    assert len(finished) >= 5 * len(done), finished

    # the rerun: no plan, no --address, so run_folds.py starts (and stops) a Ray of its own
    rerun = ok(run(ray_args, tmp_path, env))
    jobs = jobs_of(out)
    left = [k for k in range(3) if k not in done]
    assert [j["kind"] for j in jobs] == ["prepare", *["fold"] * len(left), "finish"]
    assert [j["fold"] for j in jobs if j["kind"] == "fold"] == left  # nothing finished redone
    oof = pd.read_parquet(out / "data" / RUN / "oof.parquet")
    assert len(oof) == 300 and oof["fold"].nunique() == 3
    accuracy = float(rerun.stdout.rsplit("OOF accuracy ", 1)[1].split()[0])  # the last line
    assert accuracy > 0.3  # 10 classes: chance is 0.1
    prepare = next(j for j in jobs if j["kind"] == "prepare")["result"]
    assert f"{len(left)} of 3 folds to train" in prepare
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    # the uninterrupted run, while the killed session's last Ray processes wind down
    ok(run([*args, "--out", str(tmp_path / "straight")], tmp_path, env))
    assert assert_same(tmp_path / "straight" / "data" / RUN, out / "data" / RUN) == 0.0

    # Every Ray process of both drivers that runs foldstack's code (a worker or the driver)
    # exits. The killed instance's dashboard and runtime-env agents are left out: they exit about
    # 60 s after it, when their report of the dead node manager times out on the dead GCS, and
    # they run none of our code and hold no fold lock (waiting for them doubled this test).
    end = time.monotonic() + 60
    while ours(ray_processes(env, marker)) and time.monotonic() < end:
        time.sleep(0.5)
    assert not ours(ray_processes(env, marker))
    gone = time.monotonic() - killed_at
    print(f"folds done at the driver kill {done}; its workers outlived it by {orphaned:.1f}s; "
          f"no Ray worker left {gone:.0f}s after it; {time.monotonic() - t0:.0f}s in all")
