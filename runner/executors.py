"""Executors: run a plan's job graph (prepare each run, its folds, assemble it, then the stack).

One scheduler, two ways to run a job, both through ``runner.ray_worker.FoldWorker``:

- ``local`` (default): one worker process per framework on this machine, one job at a time;
- ``ray``: Ray actors, one per device share (``--gpus-per-job``, and as many CPUs as the run's
  ``--threads``) per framework, on a local Ray instance or a running cluster (``--address``);
  jobs start as workers free up and finish in any order (``ray.wait``), like AutoGluon's
  parallel fold fitting strategy.

Either way torch and TensorFlow never share a process, a worker computes on one thread count,
its run's (the count orders the float sums; TensorFlow cannot change it in a live process),
every fold part is written by the worker that trained it through ``RunDir`` (atomic; fold
locks), so a Ray run and a local run give the same files and a rerun redoes nothing finished.
A job whose worker died (killed, out of memory, node lost) runs again, up to ``--retries``
times; a job that fails by raising (bad input) fails once, with its own message, and the jobs
that needed it are skipped while the others go on.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oof.config import RunConfig, config_dict
from oof.errors import ConfigError, FoldstackError
from runner.plan import ExecutorConfig, Plan, stack_config, with_job_threads
from runner.progress import Job, JobTable

log = logging.getLogger(__name__)


class PlanError(FoldstackError):
    """Jobs of a plan failed; the message lists each with its own error."""


@dataclass
class Outcome:
    """How a job ended: ``ok`` (with its output), ``died`` (worker lost: retry) or ``error``."""

    kind: str
    output: Any = None
    message: str = ""


def describe_error(exc: BaseException) -> str:
    """A user error is its message; anything else keeps its type (and traceback, if remote)."""
    if isinstance(exc, FoldstackError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------ the job graph

def family_of(cfg: RunConfig) -> str:
    """The worker pool of a run: its backbone family (checked here, before any worker starts)."""
    from backbones import split_name

    return split_name(cfg.backbone)[0]


def run_label(cfg: RunConfig) -> str:
    """The run's folder name when known without the backbone (else a stand-in until prepared)."""
    size = cfg.img_size[-1] if isinstance(cfg.img_size, list) else cfg.img_size  # the last
    return cfg.resolved_run_name(size) if size or cfg.run_name else cfg.backbone.replace("/", "-")


@dataclass
class Graph:
    """The plan's jobs and what each needs: folds need their run prepared, a run's assembly
    needs its folds, the stack needs every run."""

    plan: Plan
    jobs: list[Job] = field(default_factory=list)
    values: list[dict[str, Any]] = field(default_factory=list)  # each run's config as a dict
    runs: list[dict[str, Any] | None] = field(default_factory=list)  # finish outputs
    prepared: set[int] = field(default_factory=set)
    stack_result: Any = None

    @classmethod
    def of(cls, plan: Plan) -> Graph:
        g = cls(plan)
        for i, cfg in enumerate(plan.runs):
            family = family_of(cfg)
            label = run_label(cfg)
            g.values.append(config_dict(cfg))
            g.runs.append(None)
            g.jobs.append(Job(f"{label}/prepare", "prepare", run=i, family=family))
            g.jobs.append(Job(f"{label}/assemble", "finish", run=i, family=family))
        if plan.stack is not None:
            g.jobs.append(Job("stack", "stack"))
        return g

    def pool_key(self, job: Job) -> PoolKey:
        """The workers that may run ``job``: its framework, and its run's thread count."""
        return (job.family or "", int(self.values[job.run]["threads"]))

    def of_run(self, i: int) -> list[Job]:
        return [j for j in self.jobs if j.run == i]

    def needs(self, job: Job) -> list[Job]:
        if job.kind == "fold":
            return [j for j in self.of_run(job.run) if j.kind == "prepare"]
        if job.kind == "finish":
            return [j for j in self.of_run(job.run) if j.kind in ("prepare", "fold")]
        if job.kind == "stack":
            return [j for j in self.jobs if j.kind == "finish"]
        return []

    def ready(self, busy_roots: set[tuple[str, str]]) -> list[Job]:
        """Jobs whose needs are done; a run root prepares one run at a time (one image cache
        build, one folds.csv), the others wait for it."""
        out = []
        for j in self.jobs:
            if j.state not in ("waiting", "retrying"):
                continue
            if not all(n.state == "done" for n in self.needs(j)):
                continue
            if j.kind == "prepare" and self.root(j.run) in busy_roots:
                continue
            out.append(j)
        return out

    def root(self, i: int) -> tuple[str, str]:
        cfg = self.plan.runs[i]
        from oof.demo import DEMO_DATA

        data = cfg.data if cfg.data in DEMO_DATA else str(Path(cfg.data).resolve())
        return (data, cfg.out)

    def prepared_run(self, job: Job, output: dict[str, Any]) -> list[Job]:
        """After a run is prepared: name its jobs after the run folder, add its fold jobs."""
        name = output["run"]
        for j in self.of_run(job.run):
            j.name = f"{name}/{j.name.rsplit('/', 1)[1]}"
        folds = [Job(f"{name}/fold{k}", "fold", run=job.run, fold=k, family=job.family)
                 for k in output["todo"]]
        at = self.jobs.index(job) + 1
        self.jobs[at:at] = folds
        self.prepared.add(job.run)
        return folds

    def skip_after(self, failed: Job, table: JobTable) -> None:
        """Jobs that needed ``failed`` (directly or not) will not run."""
        changed = True
        while changed:
            changed = False
            for j in self.jobs:
                if j.state == "waiting" and any(n.state in ("failed", "skipped")
                                                for n in self.needs(j)):
                    table.set(j, "skipped", result=f"needs {failed.name}, which failed")
                    changed = True


# ------------------------------------------------------------------------------ worker pools

PoolKey = tuple[str, int]  # (family, threads): the jobs one worker process may run


def _call_in_worker(family: str, method: str, args: tuple) -> Any:
    """Runs in a local worker process: one FoldWorker per process, kept between jobs."""
    global _WORKER
    from runner.ray_worker import FoldWorker

    if _WORKER is None:
        _WORKER = FoldWorker(family)
    return getattr(_WORKER, method)(*args)


_WORKER: Any = None


class LocalPool:
    """One spawned worker process per framework and thread count, one job at a time."""

    def __init__(self, ex: ExecutorConfig) -> None:
        self.ex = ex
        self.pools: dict[PoolKey, ProcessPoolExecutor] = {}
        self.running: dict[Future, tuple[Job, PoolKey]] = {}

    def slots_free(self, key: PoolKey, wanted: set[PoolKey]) -> bool:
        return not self.running

    def _pool(self, key: PoolKey) -> ProcessPoolExecutor:
        if key not in self.pools:
            self.pools[key] = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return self.pools[key]

    def start(self, job: Job, key: PoolKey, method: str, args: tuple) -> str:
        pool = self._pool(key)
        where = pool.submit(_call_in_worker, job.family, "where", ()).result()
        self.running[pool.submit(_call_in_worker, job.family, method, args)] = (job, key)
        return f"{where['host']}:{where['pid']}"

    def wait(self, timeout: float) -> Iterator[tuple[Job, Outcome]]:
        done, _ = wait_futures(list(self.running), timeout=timeout, return_when=FIRST_COMPLETED)
        for fut in done:
            job, key = self.running.pop(fut)
            try:
                yield job, Outcome("ok", fut.result())
            except BrokenProcessPool as exc:  # the worker process died: a new one next time
                self.pools.pop(key, None)
                yield job, Outcome("died", message=f"worker died ({exc})")
            except Exception as exc:  # noqa: BLE001 - the job's own error, reported as its result
                if not isinstance(exc, FoldstackError):
                    log.error("%s failed", job.name, exc_info=exc)
                yield job, Outcome("error", message=describe_error(exc))

    def close(self) -> None:
        for pool in self.pools.values():
            pool.shutdown(wait=True)


class RayPool:
    """Ray actors, per framework and thread count, as many as the nodes have CPU shares for.

    A worker reserves exactly its run's ``threads`` CPUs (Ray then also sets its
    ``OMP_NUM_THREADS``), so a job computes on the count its run records, never on what the
    reservation happened to leave it. A count no node can hold is refused before any job runs.
    """

    def __init__(self, ex: ExecutorConfig, threads: set[int]) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install -e .[ray]") from None
        self.ray, self.ex = ray, ex
        env = {k: v for k, v in os.environ.items() if k.startswith("FOLDSTACK_")}
        repo = str(Path(__file__).resolve().parents[1])  # this checkout, ahead of any install
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
        kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "include_dashboard": False,
                                  "logging_level": logging.WARNING}
        if ex.address:
            kwargs["address"] = ex.address
        else:
            kwargs["object_store_memory"] = ex.object_store_mb * 2**20
        ray.init(**kwargs)
        # each node's (CPUs, GPUs): a worker's share must fit on one node
        self.nodes = {n["NodeID"]: (n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0))
                      for n in ray.nodes() if n["Alive"]}
        for t in sorted(threads):
            if not any(cpu >= t and gpu >= ex.gpus_per_job for cpu, gpu in self.nodes.values()):
                ray.shutdown()
                sizes = ", ".join(f"{cpu:g} CPU(s) and {gpu:g} GPU(s)"
                                  for cpu, gpu in self.nodes.values())
                raise ConfigError(
                    f"a fold job of --threads {t} reserves {t} CPU(s) (and --gpus-per-job "
                    f"{ex.gpus_per_job:g}) on one Ray node, and no node has that much (nodes: "
                    f"{sizes}); pass a smaller --threads (or --cpus-per-job)")
        log.info("Ray: %d node(s) of %s; fold workers of %s CPU(s) and %g GPU(s)",
                 len(self.nodes), ", ".join(f"{c:g} CPU/{g:g} GPU" for c, g in self.nodes.values()),
                 "/".join(map(str, sorted(threads))), ex.gpus_per_job)
        from runner.ray_worker import FoldWorker

        self.actor_cls = ray.remote(FoldWorker)
        self.actors: dict[PoolKey, list[Any]] = {}  # (family, threads) -> actor handles
        self.node_of: dict[int, str] = {}  # id(actor) -> the node its share is on
        self.busy: dict[Any, Any] = {}  # ObjectRef -> (job, actor)

    def _idle(self, key: PoolKey) -> Any:
        running = {id(a) for _, a in self.busy.values()}
        return next((a for a in self.actors.get(key, []) if id(a) not in running), None)

    def _fits(self, threads: int) -> bool:
        """A node with ``threads`` CPUs (and the GPU share) not held by a worker of ours."""
        free = {n: list(res) for n, res in self.nodes.items()}
        for (_, t), actors in self.actors.items():
            for a in actors:
                held = free.get(self.node_of.get(id(a), ""))
                if held is not None:
                    held[0] -= t
                    held[1] -= self.ex.gpus_per_job
        return any(cpu >= threads and gpu >= self.ex.gpus_per_job for cpu, gpu in free.values())

    def slots_free(self, key: PoolKey, wanted: set[PoolKey]) -> bool:
        """An idle worker for ``key``, or room to start one. ``wanted``: the pools with jobs
        ready to start; their idle workers are kept (starting one costs seconds)."""
        if self._idle(key) is not None or self._fits(key[1]):
            return True
        # no room: free the shares held by idle workers that no ready job wants
        for other, actors in self.actors.items():
            idle = self._idle(other) if other not in wanted else None
            while idle is not None:
                actors.remove(idle)
                self.node_of.pop(id(idle), None)
                self.ray.kill(idle)
                if self._fits(key[1]):
                    return True
                idle = self._idle(other)
        return False

    def start(self, job: Job, key: PoolKey, method: str, args: tuple) -> str:
        actor = self._idle(key)
        if actor is None:
            actor = self.actor_cls.options(
                num_cpus=key[1], num_gpus=self.ex.gpus_per_job, max_restarts=-1,
                max_task_retries=0, max_concurrency=1).remote(job.family or "")
            self.actors.setdefault(key, []).append(actor)
        where = self._where(actor)
        self.node_of[id(actor)] = where["node"]  # a restarted worker may have moved
        ref = getattr(actor, method).remote(*args)
        self.busy[ref] = (job, actor)
        return f"{where['host']}:{where['pid']}"

    def _where(self, actor: Any, timeout: float = 300.0) -> dict[str, Any]:
        """The actor's host, pid and node, once it is up (a restarting actor answers
        'unavailable')."""
        end = time.monotonic() + timeout
        while True:
            try:
                return self.ray.get(actor.where.remote())
            except self.ray.exceptions.ActorUnavailableError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.5)

    def wait(self, timeout: float) -> Iterator[tuple[Job, Outcome]]:
        ray = self.ray
        done, _ = ray.wait(list(self.busy), num_returns=1, timeout=timeout)
        for ref in done:
            job, _actor = self.busy.pop(ref)
            try:
                yield job, Outcome("ok", ray.get(ref))
            except ray.exceptions.RayTaskError as exc:  # the job raised: its own error, once
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                message = (str(cause) if isinstance(cause, FoldstackError) else str(exc))
                yield job, Outcome("error", message=message)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError) as exc:
                yield job, Outcome("died", message=f"worker died: {type(exc).__name__}")

    def close(self) -> None:
        for actors in self.actors.values():
            for a in actors:
                self.ray.kill(a)
        self.ray.shutdown()


# ------------------------------------------------------------------------------ the scheduler

@dataclass
class PlanResult:
    """What ``run_plan`` returns: the job table, each run's OOF scores, the stack's result."""

    jobs: list[dict[str, Any]]
    table: str
    runs: list[dict[str, Any] | None]
    stack: Any = None
    status_dir: Path | None = None


def status_dir_of(plan: Plan) -> Path:
    return Path(plan.runs[0].out) / "plans" / plan.name


def run_plan(plan: Plan, ex: ExecutorConfig) -> PlanResult:
    """Run every job of ``plan`` on the executor ``ex`` names; raise PlanError if any failed."""
    plan = with_job_threads(plan, ex)
    graph = Graph.of(plan)
    table = JobTable(graph.jobs, status_dir_of(plan))
    table.save()
    threads = {int(v["threads"]) for v in graph.values}
    pool: LocalPool | RayPool = (RayPool(ex, threads) if ex.executor == "ray"
                                 else LocalPool(ex))
    try:
        _schedule(graph, table, pool, ex)
    finally:
        pool.close()
    failed = [j for j in graph.jobs if j.state == "failed"]
    log.info("jobs:\n%s", table.table())
    if failed:
        lines = "\n".join(f"{j.name}: {j.result}" for j in failed)
        skipped = [j.name for j in graph.jobs if j.state == "skipped"]
        raise PlanError(f"{len(failed)} of {len(graph.jobs)} job(s) of plan {plan.path} failed:"
                        f"\n{lines}" + (f"\nnot run: {', '.join(skipped)}" if skipped else "")
                        + f"\n(job table: {table.status_dir / 'status.md'})")
    return PlanResult(table.rows(), table.table(), graph.runs, graph.stack_result,
                      table.status_dir)


def _schedule(graph: Graph, table: JobTable, pool: LocalPool | RayPool,
              ex: ExecutorConfig) -> None:
    running: dict[int, Job] = {}
    while True:
        busy_roots = {graph.root(j.run) for j in running.values() if j.kind == "prepare"}
        ready = graph.ready(busy_roots)
        wanted = {graph.pool_key(j) for j in ready if j.family}
        for job in ready:
            if job.kind == "stack":  # level 2 runs here: it never needs torch or TensorFlow
                _run_stack(graph, table, job)
                continue
            key = graph.pool_key(job)
            if not pool.slots_free(key, wanted):
                continue
            args: tuple = (graph.values[job.run],)
            if job.kind == "fold":
                args = (*args, job.fold)
            worker = pool.start(job, key, job.kind, args)
            table.set(job, "running", worker=worker, result="")
            running[id(job)] = job
            if job.kind == "prepare":
                busy_roots.add(graph.root(job.run))
        if not running:
            if table.finished() or not graph.ready(set()):
                return
            continue
        for job, outcome in pool.wait(timeout=1.0):
            running.pop(id(job), None)
            _finished(graph, table, job, outcome, ex)


def _finished(graph: Graph, table: JobTable, job: Job, outcome: Outcome,
              ex: ExecutorConfig) -> None:
    if outcome.kind == "ok":
        out = outcome.output
        if job.kind == "prepare":
            graph.prepared_run(job, out)
            result = f"{len(out['todo'])} of {out['k']} folds to train"
        elif job.kind == "fold":
            result = (f"accuracy {out['accuracy']:.4f}, log loss {out['log_loss']:.4f}"
                      + ("" if out["trained"] else " (done before)"))
        else:
            graph.runs[job.run] = out
            s = out["oof_scores"]
            result = (f"OOF accuracy {s['accuracy']:.4f}, log loss {s['log_loss']:.4f}"
                      if out["complete"] else "incomplete")
        table.set(job, "done", result=result, output=out)
        table.save()  # the renamed and added jobs
    elif outcome.kind == "died" and job.attempts <= ex.retries:
        table.set(job, "retrying", result=f"{outcome.message}; attempt {job.attempts + 1} next")
    else:
        if outcome.kind == "died":
            outcome.message += f" ({job.attempts} attempts)"
        table.set(job, "failed", result=outcome.message)
        graph.skip_after(job, table)


def _run_stack(graph: Graph, table: JobTable, job: Job) -> None:
    from ensemble.stack import stack_runs

    plan = graph.plan
    run_dirs = [r["run_dir"] for r in graph.runs if r]
    table.set(job, "running", worker=f"driver:{os.getpid()}", result="")
    try:
        result = stack_runs(stack_config(plan.stack or {}, plan.runs[0], run_dirs, plan.path))
    except FoldstackError as exc:
        table.set(job, "failed", result=describe_error(exc))
        return
    graph.stack_result = result
    table.set(job, "done", result=f"chosen {result.chosen}", output=None)


def single_run_plan(cfg: RunConfig) -> Plan:
    """A plan of one run (``run_folds.py --executor ray`` without ``--plan``)."""
    if cfg.fold is not None:
        raise ConfigError("--fold with --executor ray: the executor runs the folds; leave "
                          "--fold out (or use the default local executor)")
    return Plan(Path(f"{run_label(cfg)}.yaml"), [cfg], None, ["command line"])


__all__ = ["ExecutorConfig", "PlanError", "PlanResult", "run_plan", "single_run_plan"]
