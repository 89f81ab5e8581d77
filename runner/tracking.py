"""MLflow tracking of a run folder: its config, per-fold and per-epoch metrics, OOF score and
small artifacts, for practitioners who compare runs in the MLflow UI.

The run folder stays the source of truth; MLflow gets a copy after each ``run_folds`` call. One
MLflow run per run folder (found again by its ``foldstack.run_dir`` tag), so resuming a killed
run or training it fold by fold (``--fold N``) adds to the same MLflow run; folds already logged
are not logged twice. ``mlflow`` is imported here only, and only when ``--mlflow`` is given.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from oof.errors import ConfigError
from oof.rundir import RunDir

log = logging.getLogger(__name__)

ARTIFACTS = ("meta.json", "config.yaml", "history.csv")


def tracking_uri(value: str) -> str:
    """A URI as given (``http://``, ``sqlite:///``, ``file:``), or a local folder as a file URI.

    MLflow 3 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set; a local folder
    needs no server or database, so foldstack opts in for it.
    """
    if "://" in value or value.startswith("file:"):
        uri = value
    else:
        uri = Path(value).expanduser().resolve().as_uri()
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def _flat(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


def track_run(uri: str, run: RunDir, complete: bool) -> str:
    """Copy the run folder's config, new folds' metrics and (once complete) its OOF scores and
    artifacts into MLflow; returns the MLflow run id."""
    try:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise ConfigError(f"--mlflow {uri}: MLflow is not installed (pip install "
                          "'foldstack[logs]' or mlflow-skinny)") from exc
    import pandas as pd

    meta = run.read_meta()
    client = MlflowClient(tracking_uri=tracking_uri(uri))
    name = f"foldstack-{meta['data']['name']}"
    found = client.get_experiment_by_name(name)
    exp_id = found.experiment_id if found else client.create_experiment(name)
    where = str(run.path.resolve())
    existing = client.search_runs([exp_id], filter_string=f"tags.`foldstack.run_dir` = '{where}'",
                                  max_results=1)
    if existing:
        run_id = existing[0].info.run_id
        logged = set(json.loads(existing[0].data.tags.get("foldstack.logged_folds", "[]")))
    else:
        run_id = client.create_run(exp_id, run_name=run.path.name, tags={
            "foldstack.run_dir": where, "foldstack.backbone": meta["backbone"]["name"]}
        ).info.run_id
        params: dict[str, str] = {}
        _flat("", {"config": meta["config"], "train_seed": meta["train_seed"],
                   "folds": meta["folds"], "fold_fingerprint": meta["fold_fingerprint"]}, params)
        client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
        logged = set()
    metrics: list[Metric] = []
    now = int(time.time() * 1000)
    for k in run.done_folds():
        if k in logged:
            continue
        info = run.read_fold_info(k)
        for key in ("accuracy", "log_loss", "seconds"):
            if isinstance(info.get(key), (int, float)):
                metrics.append(Metric(f"fold_{key}", float(info[key]), now, k))
        history = run.history_path(k)
        if history.exists() and history.stat().st_size > 1:
            for _, row in pd.read_csv(history).iterrows():
                for key, value in row.items():
                    if key not in ("epoch", "fold") and pd.notna(value):
                        metrics.append(Metric(f"fold{k}.{key}", float(value), now,
                                              int(row["epoch"])))
        logged.add(k)
    if complete:
        for key, value in (meta.get("oof_metrics") or {}).items():
            metrics.append(Metric(f"oof_{key}", float(value), now, 0))
    for start in range(0, len(metrics), 900):  # MLflow takes at most 1000 per batch
        client.log_batch(run_id, metrics=metrics[start:start + 900])
    client.set_tag(run_id, "foldstack.logged_folds", json.dumps(sorted(logged)))
    if complete:
        for artifact in ARTIFACTS:
            if (run.path / artifact).exists():
                client.log_artifact(run_id, str(run.path / artifact))
        client.set_terminated(run_id, "FINISHED")
    log.info("MLflow run %s in experiment %r at %s", run_id, name, client.tracking_uri)
    return run_id
