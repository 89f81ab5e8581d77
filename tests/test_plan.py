"""Plan files and executor flags: checked before any job starts, errors naming the entry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from oof.errors import ConfigError
from runner.plan import load_plan, parse_executor_args, run_flags


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_precedence_defaults_file_entry_flags(tmp_path: Path) -> None:
    (tmp_path / "cfgs").mkdir()
    write(tmp_path / "cfgs" / "small.yaml", {"epochs": 3, "lr": 0.01, "batch_size": 16})
    plan = write(tmp_path / "plan.yaml", {
        "defaults": {"data": "d", "epochs": 7, "lr": 0.5, "folds": 3},
        "runs": [{"backbone": "timm/resnet10t"},
                 {"config": "cfgs/small.yaml", "lr": 0.02, "backbone": "keras/MobileNetV3Small"}],
        "stack": {"method": "mean"}})
    p = load_plan(plan, {"batch_size": 8})
    a, b = p.runs
    assert (a.epochs, a.lr, a.batch_size, a.folds) == (7, 0.5, 8, 3)
    assert (b.epochs, b.lr, b.batch_size, b.folds) == (3, 0.02, 8, 3)  # file < entry < flags
    assert b.config == str(tmp_path / "cfgs" / "small.yaml")  # relative to the plan file
    assert p.stack == {"method": "mean"} and p.name == "plan"


@pytest.mark.parametrize("data, needle", [
    ({"runs": []}, "non-empty list"),
    ({"runs": [{"backbone": "timm/resnet10t"}], "extra": 1}, "unknown key(s) ['extra']"),
    ({"runs": [{"backbone": "timm/resnet10t"}, {"epoch": 2}]}, "runs[1]: unknown key(s) 'epoch'"),
    ({"runs": [{"backbone": "timm/resnet10t", "epochs": 0}]}, "runs[0]"),
    ({"runs": [{"backbone": "timm/resnet10t", "fold": 1}]}, "a plan runs every fold"),
    ({"runs": [{"backbone": "timm/resnet10t"}, {"backbone": "timm/resnet10t"}]},
     "the same run as runs[0]"),
    ({"runs": [{"backbone": "timm/resnet10t"}], "stack": {"method": "vote"}}, "stack"),
    ({"runs": ["timm/resnet10t"]}, "runs[0]: expected a mapping"),
])
def test_bad_plans_are_refused_before_anything_runs(tmp_path: Path, data: dict,
                                                    needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_plan(write(tmp_path / "plan.yaml", data))
    assert needle in str(err.value)
    assert str(tmp_path / "plan.yaml") in str(err.value)


def test_executor_flags_are_split_from_run_flags() -> None:
    ex, rest = parse_executor_args(["--executor", "ray", "--epochs", "2", "--gpus-per-job",
                                    "0.5", "--address", "10.0.0.1:6379", "--augment", "flip"])
    assert (ex.executor, ex.gpus_per_job, ex.address, ex.cpus_per_job) == (
        "ray", 0.5, "10.0.0.1:6379", None)
    assert rest == ["--epochs", "2", "--augment", "flip"]
    assert run_flags(rest) == {"epochs": 2, "augment": "flip"}
    with pytest.raises(ConfigError, match="--cpus-per-job 0: Input should be greater"):
        parse_executor_args(["--cpus-per-job", "0"])
    with pytest.raises(ConfigError, match="--config with --plan"):
        run_flags(["--config", "x.yaml"])
    with pytest.raises(SystemExit):  # argparse: not a choice
        parse_executor_args(["--executor", "dask"])


def test_each_run_gets_a_thread_count_and_ray_shares_follow_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fold job's thread count is its run's: resolved to a number before any job starts; on
    Ray --cpus-per-job alone sets it, and a --cpus-per-job other than --threads is refused."""
    from runner.plan import with_job_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    plan = load_plan(write(tmp_path / "plan.yaml", {"runs": [
        {"backbone": "timm/resnet10t"}, {"backbone": "timm/resnet18", "threads": 2}]}))
    ray, _ = parse_executor_args(["--executor", "ray"])
    assert [c.threads for c in with_job_threads(plan, ray).runs] == [3, 2]
    share, _ = parse_executor_args(["--executor", "ray", "--cpus-per-job", "2"])
    assert [c.threads for c in with_job_threads(plan, share).runs] == [2, 2]
    local, _ = parse_executor_args(["--cpus-per-job", "4"])  # a Ray option: local ignores it
    assert [c.threads for c in with_job_threads(plan, local).runs] == [3, 2]
    other, _ = parse_executor_args(["--executor", "ray", "--cpus-per-job", "1"])
    with pytest.raises(ConfigError, match=r"runs\[1\]: threads 2 but --cpus-per-job 1"):
        with_job_threads(plan, other)
