"""Plan files and executor options: several runs (backbones, configs), then the stack, as one job.

A plan is YAML::

    defaults:            # RunConfig keys given to every run
      data: data/cars
      folds: 5
    runs:                # one entry per run: RunConfig keys, optionally a run config file
      - backbone: timm/resnet50
        img_size: 384
      - config: configs/effnet.yaml
        epochs: 20
    stack:               # optional: stack.py keys; runs default to the plan's runs
      method: auto

Precedence, lowest first: RunConfig defaults < ``defaults`` < the entry's ``config`` file < the
entry's keys < flags on the command line (``--epochs 1`` applies to every run of the plan).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from oof.config import (
    PositiveInt,
    RunConfig,
    build_parser,
    config_dataclass,
    load_yaml,
    make_config,
    opt,
)
from oof.errors import ConfigError

NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
PLAN_KEYS = ("defaults", "runs", "stack")


@config_dataclass
class ExecutorConfig:
    """How ``run_folds.py`` runs its fold jobs (not part of any run's config: where a fold ran
    never changes what it computes; ``--cpus-per-job`` alone becomes the runs' ``--threads``)."""

    plan: str | None = opt(None, "plan file (YAML): several runs, then the stack, as one job "
                           "graph")
    executor: str = opt("local", "where fold jobs run: one after another in this process, or "
                        "on a Ray cluster (pip install -e .[ray])", ("local", "ray"))
    address: str | None = opt(None, "ray: address of a running cluster (HOST:PORT, or 'auto'); "
                              "default: start a local Ray instance on this machine")
    cpus_per_job: PositiveInt | None = opt(
        None, "ray: CPU cores reserved by each fold worker, which are its job's threads: a run's "
        "--threads by default; given alone, it sets --threads (the two differing is refused)")
    gpus_per_job: NonNegativeFloat = opt(0.0, "ray: GPUs reserved by each fold worker (0.5: two "
                                         "workers share a GPU)")
    retries: Annotated[int, Field(ge=0)] = opt(
        2, "ray: times a job is run again after its worker died (a job that fails on bad input "
        "is never retried)")
    object_store_mb: Annotated[int, Field(ge=80)] = opt(
        256, "ray: object store of a local Ray instance, MB (jobs pass file names, not pixels)")


def parse_executor_args(argv: list[str]) -> tuple[ExecutorConfig, list[str]]:
    """Split ``argv`` into the executor options and the rest (RunConfig flags)."""
    parser = build_parser(ExecutorConfig, "run_folds.py", "")
    parser.allow_abbrev = False  # --a must not become --address
    helps = [a for a in argv if a in ("-h", "--help")]
    known, rest = parser.parse_known_args([a for a in argv if a not in helps])
    values = vars(known)
    return make_config(ExecutorConfig, values, "config", frozenset(values)), [*rest, *helps]


def executor_help() -> str:
    """The executor options in a few lines, for ``run_folds.py --help``."""
    parts = []
    for f in dataclasses.fields(ExecutorConfig):
        flag = "--" + f.name.replace("_", "-")
        parts.append(f"{flag}: {f.metadata['help']}")
    return "Executor options: " + "; ".join(parts) + "."


def run_flags(argv: list[str]) -> dict[str, Any]:
    """The RunConfig flags given on the command line (no defaults), for a plan's overrides."""
    flags = vars(build_parser(RunConfig, "run_folds.py --plan", "").parse_args(argv))
    if "config" in flags:
        raise ConfigError("--config with --plan: give each run's config file in the plan "
                          "(runs: [{config: FILE}])")
    return flags


@dataclass
class Plan:
    """The runs of a plan, in order, and the stack options (None: no stack)."""

    path: Path
    runs: list[RunConfig]
    stack: dict[str, Any] | None = None
    sources: list[str] = field(default_factory=list)  # where each run came from, for messages

    @property
    def name(self) -> str:
        return self.path.stem


def load_plan(path: str | Path, overrides: dict[str, Any] | None = None) -> Plan:
    """Read and validate a plan file; every run is a checked RunConfig before anything runs."""
    path = Path(path)
    data = load_yaml(path)
    unknown = [k for k in data if k not in PLAN_KEYS]
    if unknown:
        raise ConfigError(f"plan {path}: unknown key(s) {unknown}; a plan has {list(PLAN_KEYS)}")
    defaults = data.get("defaults") or {}
    entries = data.get("runs")
    if not isinstance(defaults, dict):
        raise ConfigError(f"plan {path}: defaults must be a mapping of RunConfig keys")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"plan {path}: runs must be a non-empty list of run configs")
    runs, sources, seen = [], [], {}
    for i, entry in enumerate(entries):
        where = f"plan {path}: runs[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping of RunConfig keys, got {entry!r}")
        values = {str(k).replace("-", "_"): v for k, v in defaults.items()}
        entry = {str(k).replace("-", "_"): v for k, v in entry.items()}
        if entry.get("config"):
            cfg_file = Path(entry["config"])
            if not cfg_file.is_absolute() and not cfg_file.exists():
                cfg_file = path.parent / cfg_file  # relative to the plan file
            values.update(load_yaml(cfg_file))
            entry["config"] = str(cfg_file)
        values.update(entry)
        values.update(overrides or {})
        if values.get("fold") is not None:
            raise ConfigError(f"{where}: fold: a plan runs every fold; leave fold out")
        cfg = make_config(RunConfig, values, where)
        key = (cfg.data, cfg.out, cfg.backbone, cfg.run_name, repr(cfg.img_size))
        if key in seen:
            raise ConfigError(f"{where}: the same run as runs[{seen[key]}] ({cfg.backbone}); "
                              "give one of them another run_name")
        seen[key] = i
        runs.append(cfg)
        sources.append(where)
    stack = data.get("stack")
    if stack is not None and not isinstance(stack, dict):
        raise ConfigError(f"plan {path}: stack must be a mapping of stack.py keys (or absent)")
    if stack is not None:
        stack = {str(k).replace("-", "_"): v for k, v in stack.items()}
        stack_config(stack, runs[0], [], path)  # checked now, not after hours of training
    return Plan(path, runs, stack, sources)


def with_job_threads(plan: Plan, ex: ExecutorConfig) -> Plan:
    """``plan`` with each run's thread count as a number (``runner.run.with_threads``).

    On Ray a fold worker reserves as many CPUs as its job computes on: fewer would oversubscribe
    the node, and a thread count that followed the reservation instead of the run would make
    the executor change the numbers. ``--cpus-per-job`` alone sets the runs' ``--threads``.
    """
    from runner.run import with_threads

    runs = []
    for cfg, where in zip(plan.runs, plan.sources):
        cpus = ex.cpus_per_job if ex.executor == "ray" else None
        if cpus is not None and cfg.threads is None:
            cfg = dataclasses.replace(cfg, threads=cpus)
        elif cpus is not None and cfg.threads != cpus:
            raise ConfigError(
                f"{where}: threads {cfg.threads} but --cpus-per-job {cpus}: a fold job computes "
                "on the CPUs its worker reserves, and its thread count is part of its result; "
                "give one of --threads and --cpus-per-job, or the same number")
        runs.append(with_threads(cfg))
    return dataclasses.replace(plan, runs=runs)


def stack_config(stack: dict[str, Any], first: RunConfig, run_dirs: list[str],
                 path: Path) -> Any:
    """The StackConfig of a plan: the plan's data and run root, its runs unless named."""
    from ensemble.stack import StackConfig

    values = {"data": first.data, "layout": first.layout, "test": first.test, "out": first.out,
              **stack}
    if not values.get("runs"):
        values["runs"] = run_dirs
    return make_config(StackConfig, values, f"plan {path}: stack")
