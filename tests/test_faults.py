"""Fault injection: kill -9 at many moments, a full disk, two processes on one fold.

The unit cases (no torch) kill or starve small writer processes; the end-to-end cases (marked
slow) run ``run_folds.py`` in subprocesses on a tiny dataset (60 scans, 16 px, K=2, 2 epochs,
``--augment none`` so that an interrupted run must reproduce the uninterrupted one bit for bit).

Kills "after the Nth atomic write" use the test-only hook ``FOLDSTACK_FAULT_AFTER_WRITES`` of
``oof/atomic.py``; a full disk is ``RLIMIT_FSIZE`` with SIGXFSZ ignored, so writes fail with EFBIG.
kill -9 of a Ray worker and of a Ray driver: ``tests/test_ray_local.py``; the Keras disk full and
kill -9: ``tests/test_keras_backend.py``.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from oof.atomic import FAULT_ENV
from tests.conftest import write_demo_subset

REPO = Path(__file__).resolve().parents[1]
FAST = ["--folds", "2", "--epochs", "2", "--img-size", "16", "--progress", "false",
        "--augment", "none"]
KILLED = -signal.SIGKILL


def _limit_file_size(limit: int):  # noqa: ANN202 - a preexec_fn
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _python(code: str, cwd: Path, env: dict[str, str] | None = None,
            fsize: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        preexec_fn=_limit_file_size(fsize) if fsize else None)


def _visible(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# --------------------------------------------------------------------------- unit: atomic writes
WRITE_FOUR = """
from oof.atomic import write_json, write_text
for i in range(4):
    write_text(f"f{i}.txt", "x" * 1000 + str(i))
write_json("done.json", {"ok": True})
"""


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_kill_after_nth_write_leaves_only_whole_files(tmp_path: Path, n: int) -> None:
    proc = _python(WRITE_FOUR, tmp_path, {FAULT_ENV: str(n)})
    assert proc.returncode == KILLED, proc.stderr
    files = _visible(tmp_path)
    expected = [f"f{i}.txt" for i in range(min(n, 4))] + (["done.json"] if n == 5 else [])
    assert sorted(files) == sorted(expected)  # nothing after the kill, no .tmp left
    assert all(files[f"f{i}.txt"] == ("x" * 1000 + str(i)).encode() for i in range(min(n, 4)))


def test_atomic_files_get_the_mode_a_plain_open_gives(tmp_path: Path) -> None:
    """mkstemp's 0600 is not kept, even when the writer replaces the temporary file with one of
    its own (safetensors does: the timm checkpoints were 0600, unreadable to a server's user)."""
    import torch

    from backbones.timm.serving import save_checkpoint
    from oof.atomic import write_atomic, write_text

    umask = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")

        def own_file(p: Path) -> None:
            p.unlink()
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o600))

        write_atomic(tmp_path / "b.bin", own_file)
        save_checkpoint(tmp_path / "c.safetensors", torch.nn.Linear(2, 2), {"role": "test"})
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(umask)
    modes = {q.name: q.stat().st_mode & 0o777 for q in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["a.txt", "b.bin", "c.safetensors", "plain.txt"], 0o644)


@pytest.mark.parametrize("writer", ["text", "parquet", "numpy", "csv"])
def test_disk_full_names_the_file_and_keeps_the_old_one(tmp_path: Path, writer: str) -> None:
    code = {
        "text": "write_text(target, 'y' * 100_000)",
        "parquet": "write_atomic(target, lambda p: pd.DataFrame({'a': np.random.rand(50_000)})"
                   ".to_parquet(p))",
        "numpy": "write_atomic(target, lambda p: np.save(open(p, 'wb'), np.zeros(50_000)))",
        "csv": "write_atomic(target, lambda p: pd.DataFrame({'a': range(50_000)}).to_csv(p))",
    }[writer]
    (tmp_path / "target").write_text("old, whole")
    script = ("import numpy as np, pandas as pd\n"
              "from oof.atomic import write_atomic, write_text\n"
              "from oof.errors import DiskFullError\n"
              "target = 'target'\n"
              f"try:\n    {code}\nexcept DiskFullError as e:\n    print(e)\n")
    proc = _python(script, tmp_path, fsize=20_000)
    assert proc.returncode == 0, proc.stderr
    assert f"no space left on device while writing {'target'}" in proc.stdout, proc.stdout
    assert _visible(tmp_path) == {"target": b"old, whole"}  # no .tmp, old file intact


FOLDS = """
from oof.folds import ensure_folds
ids = [f"i{n}" for n in range(40)]
f = ensure_folds(".", ids, [str(n % 4) for n in range(40)], 2, 3)
print(f.fingerprint)
"""


def test_kill_between_folds_json_and_folds_csv_is_recovered(tmp_path: Path) -> None:
    clean = _python(FOLDS, tmp_path / "..")
    proc = _python(FOLDS, tmp_path, {FAULT_ENV: "1"})
    assert proc.returncode == KILLED and sorted(_visible(tmp_path)) == ["folds.json"]
    again = _python(FOLDS, tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout == clean.stdout and sorted(_visible(tmp_path)) == ["folds.csv",
                                                                           "folds.json"]


def test_a_held_fold_lock_refuses_and_a_dead_holder_does_not(tmp_path: Path) -> None:
    """Another process's lock on a fold refuses this one; kill -9 of the holder frees it."""
    from oof.errors import BusyError
    from oof.rundir import RunDir
    from runner.run import fold_locks

    run = RunDir(tmp_path / "run")
    (tmp_path / "run" / ".locks").mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from filelock import FileLock\n"
         f"lock = FileLock({str(tmp_path / 'run' / '.locks' / 'fold1.lock')!r})\n"
         "lock.acquire()\n"
         "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match="fold 1 of .* another process"), fold_locks(
                run, [0, 1]):
            pass
        with fold_locks(run, [0]):  # other folds stay free
            pass
    finally:
        holder.kill()
        holder.wait()
    with fold_locks(run, [0, 1]):  # the OS released the dead holder's lock
        pass


# --------------------------------------------------------------------------- end to end (timm)
def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None,
         fsize: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "run_folds.py"), *args], cwd=cwd, capture_output=True,
        text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        preexec_fn=_limit_file_size(fsize) if fsize else None)


def _matrices(run_dir: Path) -> dict[str, np.ndarray]:
    """The probability columns (``<run>__<class>``) of the assembled OOF and test matrices."""
    out = {}
    for name in ("oof", "test"):
        df = pd.read_parquet(run_dir / f"{name}.parquet")
        out[name] = df[[c for c in df.columns if "__" in c]].to_numpy()
    return out


@pytest.fixture(scope="module")
def tiny(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_subset(demo_dir, tmp_path_factory.mktemp("faults") / "data", 6, 10)


@pytest.fixture(scope="module")
def baseline(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """The uninterrupted run every interrupted one must reproduce exactly."""
    out = tmp_path_factory.mktemp("baseline")
    proc = _run(["--data", str(tiny), "--out", str(out), *FAST], out)
    assert proc.returncode == 0, proc.stderr
    return _matrices(out / "data" / "timm-resnet10t_16px")


@pytest.mark.slow
def test_timm_survives_disk_full_locks_and_kills(tiny: Path, baseline: dict[str, np.ndarray],
                                                 tmp_path: Path) -> None:
    """One run root taken through a full disk, a held fold lock, a mid-epoch kill -9 and a kill
    after every few atomic writes; the rerun that finally completes equals the baseline."""
    args = ["--data", str(tiny), "--out", str(tmp_path / "runs"), *FAST]
    run_dir = tmp_path / "runs" / "data" / "timm-resnet10t_16px"
    survived = []

    # 1. Disk full at the first checkpoint (the image cache fits under 1 MB, weights do not).
    proc = _run(args, tmp_path, fsize=1_000_000)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no space left on device while writing" in proc.stderr and "Traceback" not in (
        proc.stderr), proc.stderr[-3000:]
    assert not list(run_dir.rglob("*.tmp")) and not (run_dir / "parts" / "fold0.json").exists()
    survived.append("disk full")

    # 2. Another process holds fold 0: this one refuses, naming the fold and the lock.
    from filelock import FileLock

    with FileLock(run_dir / ".locks" / "fold0.lock"):
        proc = _run([*args, "--fold", "0"], tmp_path)
    assert proc.returncode == 2 and "fold 0" in proc.stderr and "another process" in proc.stderr
    survived.append("fold locked")

    # 3. kill -9 mid-epoch: as soon as the first fold starts training.
    with subprocess.Popen([sys.executable, str(REPO / "run_folds.py"), *args], cwd=tmp_path,
                          stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}) as popen:
        for line in popen.stderr:
            if "runner.run: fold 1/2" in line:
                time.sleep(0.3)
                popen.send_signal(signal.SIGKILL)
                break
        popen.wait(60)
    assert popen.returncode == KILLED
    survived.append("mid-epoch")

    # 4. A chain of processes, the i-th killed after its (3 i)-th atomic write, until one
    #    completes. A resumed process redoes its first writes (meta.json, config.yaml, the fold
    #    in progress), so a fixed N would kill every process at the same moment.
    for n in range(3, 60, 3):
        proc = _run(args, tmp_path, {FAULT_ENV: str(n)})
        if proc.returncode == 0:
            break
        assert proc.returncode == KILLED, proc.stderr[-3000:]
        written = proc.stderr.rsplit(f"after atomic write {n} (", 1)[-1].split(")")[0]
        survived.append(Path(written).name)
    else:
        pytest.fail("the run never completed")
    final = _run(args, tmp_path)  # done: nothing retrained, same result
    assert final.returncode == 0 and "epoch 1/2" not in final.stderr
    got = _matrices(run_dir)
    for name, want in baseline.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    print(f"timm: {len(survived)} fault moments survived: {survived}")
    assert len(survived) >= 6


# --------------------------------------------------------------------------- end to end (keras)
# Disk full, then kill -9 and resume (Keras): tests/test_keras_backend.py::
# test_disk_full_then_a_kill_with_a_damaged_backup_resume_as_if_never_stopped (one TF sequence).
