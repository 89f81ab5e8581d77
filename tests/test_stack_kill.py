"""kill -9 of stack.py at every file write (issue 10): the folder never looks complete without
all its files, a rerun completes it, and the result equals an uninterrupted run's."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from ensemble.stack import stack_runs
from tests.test_stack import Project

OUTPUTS = ["submission.csv", "submission_proba.csv", "report.json", "report.md", "config.yaml",
           "oof.parquet", "test.parquet", "test_folds.parquet"]



def _stack(p: Project, n: int, mode: str) -> tuple[int, int]:
    """Run stack_runs in a forked child whose os.replace (every atomic write's last step)
    SIGKILLs it just before or just after the Nth replace. Returns (signal, replaces made):
    forking the already-imported test process keeps each kill moment well under a second."""
    import os
    import signal

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        real, count = os.replace, [0]

        def replace(a: object, b: object) -> None:
            count[0] += 1
            if count[0] == n and mode == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            real(a, b)
            if count[0] == n and mode == "after":
                os.kill(os.getpid(), signal.SIGKILL)

        os.replace = replace
        try:
            stack_runs(p.cfg(runs=["good", "weak"], method="logreg", compare=False,
                             name="stack"))
            os.write(write, str(count[0]).encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    made = os.read(read, 64).decode()
    os.close(read)
    return (os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0), int(made or -1)


def _snapshot(folder: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for name in OUTPUTS:
        path = folder / name
        if name.endswith(".parquet"):
            out[name] = pd.read_parquet(path)
        elif name == "report.json":
            rep = json.loads(path.read_text())
            out[name] = {k: v for k, v in rep.items() if k not in ("seconds", "methods")}
            out[name]["table"] = [{k: v for k, v in row.items() if k != "seconds"}
                                  for row in rep["table"]]  # timings differ run to run
        elif name != "report.md":
            out[name] = path.read_bytes()
    meta = json.loads((folder / "meta.json").read_text())
    out["meta"] = {k: meta[k] for k in ("status", "level", "classes", "fold_fingerprint",
                                        "oof_metrics")}
    return out


def _same(a: dict, b: dict) -> bool:
    for k in a:
        if isinstance(a[k], pd.DataFrame):
            pd.testing.assert_frame_equal(a[k], b[k])
        else:
            assert a[k] == b[k], k
    return True


@pytest.mark.slow
def test_stack_killed_at_every_write_recovers(tmp_path: Path) -> None:
    p = Project(tmp_path)
    folder = p.root / "stack"
    sig, writes = _stack(p, 0, "count")
    assert sig == 0 and writes > 0
    assert writes >= len(OUTPUTS) + 1  # every output plus meta.json, each written atomically
    reference = _snapshot(folder)
    survived = 0
    for n in range(1, writes + 1):
        for mode in ("before", "after"):
            sig, _ = _stack(p, n, mode)
            assert sig == 9, (n, mode)
            meta = folder / "meta.json"
            complete = meta.exists() and json.loads(meta.read_text()).get("status") == "complete"
            # The marker is the last write: present only when everything else is in place.
            assert complete == (n == writes and mode == "after"), (n, mode)
            if complete:
                assert all((folder / f).exists() for f in OUTPUTS)
            stack_runs(p.cfg(runs=["good", "weak"], method="logreg", compare=False, name="stack"))
            assert not list(folder.glob(".*.tmp")), (n, mode)  # stale temporaries cleaned
            assert _same(reference, _snapshot(folder))
            survived += 1
    print(f"stack.py kill moments survived: {survived} ({writes} writes x before/after)")
    assert survived == 2 * writes
