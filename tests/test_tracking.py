"""Training logs people already read (issue 9): TensorBoard event files per fold from both
frameworks' own writers, and MLflow tracking of a run (config, per-fold and per-epoch metrics,
OOF score, artifacts), added to, not duplicated, when a run is resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oof.config import RunConfig, parse_config
from tests.test_run_folds import run_script


def _scalars(event_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for sub in [event_dir, *[p for p in event_dir.rglob("*") if p.is_dir()]]:
        if not list(sub.glob("events.out.tfevents.*")):
            continue
        acc = EventAccumulator(str(sub), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        prefix = "" if sub == event_dir else f"{sub.name}/"
        for tag in acc.Tags()["scalars"]:
            out[prefix + tag] = [e.value for e in acc.Scalars(tag)]
        for tag in acc.Tags()["tensors"]:  # TensorFlow 2 writes scalars as tensors
            out[prefix + tag] = [float(e.tensor_proto.float_val[0]) if e.tensor_proto.float_val
                                 else float(__import__("tensorflow").make_ndarray(
                                     e.tensor_proto)) for e in acc.Tensors(tag)]
    return out


def test_mlflow_flag_alone_means_local_mlruns() -> None:
    cfg = parse_config(RunConfig, ["--mlflow"], "run_folds.py", "")
    assert cfg.mlflow == "mlruns"
    cfg = parse_config(RunConfig, ["--mlflow", "http://127.0.0.1:5000"], "run_folds.py", "")
    assert cfg.mlflow == "http://127.0.0.1:5000"
    assert parse_config(RunConfig, [], "run_folds.py", "").mlflow == ""


@pytest.mark.slow
def test_timm_tensorboard_and_mlflow(demo_subset: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from runner.tracking import tracking_uri

    out, store = tmp_path / "runs", tmp_path / "mlruns"
    args = ["--data", str(demo_subset), "--out", str(out), "--img-size", "16", "--epochs", "2",
            "--folds", "2", "--progress", "false", "--tensorboard", "--mlflow", str(store)]
    proc = run_script(args, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TensorFlow" not in proc.stderr  # TensorBoard's writer did not load it into torch's
    run_dir = out / demo_subset.name / "timm-resnet10t_16px"
    board = _scalars(run_dir / "tensorboard" / "fold1")
    for tag in ("epoch/loss", "epoch/accuracy", "epoch/lr", "epoch/images_per_second",
                "epoch/val_loss", "epoch/val_accuracy"):
        assert len(board[tag]) == 2, (tag, sorted(board))
    assert min(board["epoch/images_per_second"]) > 0

    meta = json.loads((run_dir / "meta.json").read_text())
    client = MlflowClient(tracking_uri=tracking_uri(str(store)))
    exp = client.get_experiment_by_name(f"foldstack-{demo_subset.name}")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.params["config.backbone"] == "timm/resnet10t"
    assert run.data.params["config.img_size"] == "16"
    assert run.data.metrics["oof_accuracy"] == pytest.approx(meta["oof_metrics"]["accuracy"])
    fold_acc = client.get_metric_history(run.info.run_id, "fold_accuracy")
    assert sorted(m.step for m in fold_acc) == [0, 1]
    assert [m.value for m in sorted(fold_acc, key=lambda m: m.step)] == pytest.approx(
        [meta["fold_info"][k]["accuracy"] for k in ("0", "1")])
    assert len(client.get_metric_history(run.info.run_id, "fold0.val_loss")) == 2
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"meta.json",
                                                                         "config.yaml"}

    # nothing to train: the same MLflow run, no duplicates
    again = run_script(args, tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    (rerun,) = client.search_runs([exp.experiment_id])
    assert rerun.info.run_id == run.info.run_id
    assert len(client.get_metric_history(run.info.run_id, "fold_accuracy")) == 2


# Keras' TensorBoard logging: tests/test_progressive.py::test_keras_tensorboard (shares its run).
