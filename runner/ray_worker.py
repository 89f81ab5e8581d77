"""The fold worker: a long-lived process that runs the jobs of one framework on its device share.

``runner.executors`` turns ``FoldWorker`` into a Ray actor (this module does not import Ray, so
it can be tested and read without it). One actor per device share per framework and thread
count: torch and TensorFlow never share a process, a worker's share is its jobs' thread count,
and an actor stays alive between jobs, so the run's prepared state (dataset, folds,
memory-mapped images, the backend module with its compiled-step cache) is reused by every fold
of that run it trains.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from typing import Any

from oof.config import RunConfig, make_config

log = logging.getLogger(__name__)


def _config(values: dict[str, Any]) -> RunConfig:
    return make_config(RunConfig, values, "plan")


def exit_with_parent(every: float = 0.2) -> None:
    """End this process as soon as its parent is gone: Ray's node manager (which dies with the
    driver of a local Ray instance) or the local executor's driver.

    An orphaned worker would go on training its fold for nobody, holding the fold's lock, so a
    rerun started meanwhile would find the fold busy; Ray's own check took 2-3 s to end it after
    a kill -9 of the driver, long enough to finish a small fold nobody would record.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        log.error("fold worker %d: its parent %d is gone; stopping", os.getpid(), parent)
        os._exit(1)  # no clean-up to run: fold parts are atomic, the OS frees the fold locks

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class FoldWorker:
    """Actor methods: ``prepare`` a run, train one ``fold`` of it, ``finish`` (assemble) it."""

    def __init__(self, family: str) -> None:
        logging.basicConfig(level=logging.INFO, datefmt="%H:%M:%S",
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.family = family
        self._runs: dict[str, Any] = {}  # config key -> (PreparedRun, FoldImages | None)
        exit_with_parent()

    def where(self) -> dict[str, Any]:
        """Host and process id: shown in the job table (and what an operator kills); on Ray,
        the node that holds this worker's CPU share too."""
        ray = sys.modules.get("ray")  # imported in a Ray actor; never imported here
        node = (ray.get_runtime_context().get_node_id()
                if ray is not None and ray.is_initialized() else None)
        return {"host": socket.gethostname(), "pid": os.getpid(), "family": self.family,
                "node": node}

    def _prepared(self, values: dict[str, Any], fresh: bool = False) -> Any:
        from runner.run import prepare_run

        key = repr(sorted(values.items()))
        if fresh or key not in self._runs:
            self._runs[key] = [prepare_run(_config(values)), None]
        return self._runs[key]

    def prepare(self, values: dict[str, Any]) -> dict[str, Any]:
        """Validate and decode the data, write folds and meta; the folds still to train."""
        prep, _ = self._prepared(values, fresh=True)
        return {"run_dir": str(prep.run.path), "run": prep.run.path.name, "k": prep.folds.k,
                "todo": prep.todo()}

    def fold(self, values: dict[str, Any], k: int) -> dict[str, Any]:
        """Train fold ``k`` (under its lock) unless it is done; its row of the fold table."""
        from runner.run import train_locked
        from runner.tasks import load_fold_images

        entry = self._prepared(values)
        prep = entry[0]
        if entry[1] is None:
            entry[1] = load_fold_images(prep)
        trained = train_locked(prep, [k], entry[1])
        info = prep.run.read_fold_info(k)
        return {"fold": k, "trained": bool(trained),
                **{m: info.get(m) for m in ("accuracy", "log_loss", "seconds", "epochs_run")}}

    def finish(self, values: dict[str, Any]) -> dict[str, Any]:
        """Assemble the run once every fold is done; its OOF scores."""
        from runner.run import finish_run

        prep, _ = self._prepared(values)
        summary = finish_run(prep)
        self._runs.pop(repr(sorted(values.items())), None)  # the run is over: drop its maps
        return {"run_dir": str(summary.run_dir), "complete": summary.complete,
                "oof_scores": summary.oof_scores, "fold_rows": summary.fold_rows}
