"""The job table of a plan: every job's state, attempts, worker and result in one place.

Executors update it as jobs start, finish, fail or are retried; it is logged as a table when
something changes (at most every few seconds) and written atomically to ``<out>/plans/<plan>/
status.json`` (and ``status.md``), so a second terminal, a notebook or a test can follow a run
on a cluster without attaching to it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from oof.atomic import write_json, write_text
from oof.cli import format_table

log = logging.getLogger(__name__)

STATES = ("waiting", "running", "retrying", "done", "failed", "skipped")
COLUMNS = ["job", "state", "attempts", "worker", "seconds", "result"]


@dataclass
class Job:
    """One node of the job graph: prepare a run, train one of its folds, assemble it, or stack."""

    name: str  # "timm-resnet10t_16px/fold1": run label, then the step
    kind: str  # prepare | fold | finish | stack
    run: int | None = None  # index of the run in the plan (None: the stack)
    fold: int | None = None
    family: str | None = None  # timm | keras: which worker pool (None: runs in the driver)
    state: str = "waiting"
    attempts: int = 0
    worker: str = ""  # host:pid of the worker running it (the last one)
    started: float | None = None
    seconds: float | None = None
    result: str = ""  # a score when done, the message when failed
    output: Any = field(default=None, repr=False)

    def row(self) -> dict[str, Any]:
        d = {"job": self.name, **asdict(self)}
        d.pop("output")
        d.pop("started")
        if self.state == "running" and self.started is not None:
            d["seconds"] = time.time() - self.started
        return d


class JobTable:
    """The jobs of one plan, with the status file and the throttled log of the table."""

    def __init__(self, jobs: list[Job], status_dir: Path | None, every: float = 5.0) -> None:
        self.jobs = jobs
        self.status_dir = status_dir
        self.every = every
        self._logged = 0.0

    def set(self, job: Job, state: str, **kw: Any) -> None:
        """Change a job's state (and fields), then write the status file and maybe log."""
        assert state in STATES, state
        now = time.time()
        if state == "running":
            job.attempts += 1
            job.started = now
            job.seconds = None
        elif job.started is not None and state in ("done", "failed", "retrying"):
            job.seconds = now - job.started
        job.state = state
        for k, v in kw.items():
            setattr(job, k, v)
        log.info("%s: %s%s%s", job.name, state,
                 f" on {job.worker}" if state == "running" and job.worker else "",
                 f" ({job.result})" if job.result and state != "running" else "")
        self.save()
        if now - self._logged >= self.every or self.finished():
            self._logged = now
            log.info("jobs:\n%s", self.table())

    def finished(self) -> bool:
        return all(j.state in ("done", "failed", "skipped") for j in self.jobs)

    def rows(self) -> list[dict[str, Any]]:
        return [j.row() for j in self.jobs]

    def table(self) -> str:
        rows = []
        for r in self.rows():
            sec = r["seconds"]
            rows.append({**r, "seconds": None if sec is None else f"{sec:.1f}",
                         "result": r["result"].splitlines()[0][:60] if r["result"] else ""})
        return format_table(rows, COLUMNS)

    def save(self) -> None:
        if self.status_dir is None:
            return
        counts = {s: sum(j.state == s for j in self.jobs) for s in STATES}
        write_json(self.status_dir / "status.json",
                   {"updated": time.time(), "counts": counts, "jobs": self.rows()})
        write_text(self.status_dir / "status.md", self.table() + "\n")
