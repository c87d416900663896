"""MLflow plumbing shared by the jobs: where the store is, one experiment per dataset, runs found again by name.

Nothing happens at import time; every function takes the tracking URI explicitly, because Ray workers and Tune
trials run in other processes that never saw the driver's `mlflow.set_tracking_uri`.

Defaults: `sqlite:///mlflow.db` (relative to the folder the job starts in, made absolute before it is handed to
other processes) with artifacts in `mlartifacts/` beside the database file. On a cluster give a tracking server
(`--tracking-uri http://mlflow:5000`): a sqlite file on one node's disk is not visible from the others.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SQLITE = "sqlite:///"


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative sqlite path or plain folder absolute, so that every process writes to the same store."""
    if uri.startswith(SQLITE):
        path = uri[len(SQLITE):]
        if path != ":memory:" and not path.startswith("/"):
            return SQLITE + str(Path(path).resolve())
        return uri
    if "://" not in uri and uri not in ("", "databricks"):
        return str(Path(uri).resolve())
    return uri


def default_artifact_root(tracking_uri: str) -> str | None:
    """`mlartifacts/` beside a sqlite file; None (the server's choice) for a tracking server."""
    if tracking_uri.startswith(SQLITE):
        return (Path(tracking_uri[len(SQLITE):]).parent / "mlartifacts").as_uri()
    return None


def setup_experiment(tracking_uri: str, experiment: str, artifact_root: str = "") -> str:
    """Point this process at the store and return the experiment's id, creating it (with its artifact
    folder) the first time."""
    mlflow.set_tracking_uri(tracking_uri)
    if tracking_uri.startswith(SQLITE):
        Path(tracking_uri[len(SQLITE):]).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise ValueError(
                f"--experiment: '{experiment}' was deleted in {tracking_uri}; restore it "
                f"(`mlflow experiments restore`) or choose another name"
            )
        return found.experiment_id
    root = artifact_root or default_artifact_root(tracking_uri)
    location = None
    if root is not None:
        root_uri = root if "://" in root else Path(root).resolve().as_uri()
        location = f"{root_uri.rstrip('/')}/{experiment}"
    try:
        return client.create_experiment(experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another trial created it first.
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


def find_run(tracking_uri: str, experiment_id: str, run_name: str, parent_run_id: str | None = None) -> str | None:
    """The id of the newest live run called `run_name` (under `parent_run_id` if given), else None.

    Runs are looked up by name rather than remembered, so a restarted job carries on logging into its run.
    """
    client = MlflowClient(tracking_uri)
    escaped = run_name.replace("'", "\\'")
    query = f"tags.mlflow.runName = '{escaped}'"
    if parent_run_id:
        query += f" and tags.mlflow.parentRunId = '{parent_run_id}'"
    runs = client.search_runs([experiment_id], query, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def start_run(
    tracking_uri: str, experiment_id: str, run_name: str, *, parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> mlflow.ActiveRun:
    """Start (or resume, when one with this name exists) a run; nested under `parent_run_id` if given."""
    mlflow.set_tracking_uri(tracking_uri)
    existing = find_run(tracking_uri, experiment_id, run_name, parent_run_id)
    nested = mlflow.active_run() is not None
    if existing is not None:
        log.info("resuming MLflow run %s (%s)", run_name, existing)
        run = mlflow.start_run(run_id=existing, nested=nested)
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, parent_run_id=parent_run_id,
                               nested=nested or parent_run_id is not None, tags=dict(tags or {}))
    if tags:
        mlflow.set_tags(dict(tags))
    return run


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric, finite entries: MLflow rejects NaN in some stores and infinities help no one on a chart."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


def log_epoch_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    """Log one epoch's metrics into `run_id` through the client (no global active run: Ray worker safe)."""
    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, step) for k, v in finite_metrics(metrics).items()]
    if batch:
        MlflowClient(tracking_uri).log_batch(run_id, metrics=batch)


def log_params_flat(params: Mapping[str, Any], may_change: Collection[str] = ()) -> None:
    """Log a flat config as params, skipping values already logged identically (a resumed run).

    MLflow params are immutable: a resumed run whose training settings differ is an error, but the `may_change`
    ones (output folders and the like) keep their first value, with a warning.
    """
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_params_flat needs an active MLflow run")
    have = MlflowClient().get_run(run.info.run_id).data.params
    fresh = {k: ("" if v is None else json.dumps(v) if isinstance(v, list | dict) else str(v))
             for k, v in params.items()}
    changed = {k: (have[k], v) for k, v in fresh.items() if k in have and have[k] != v}
    tolerated = {k: changed.pop(k) for k in list(changed) if k in may_change}
    if tolerated:
        log.warning("run %s keeps its first values of %s (now %s)", run.info.run_name,
                    {k: old for k, (old, _) in tolerated.items()}, {k: new for k, (_, new) in tolerated.items()})
    if changed:
        raise ValueError(
            f"MLflow run {run.info.run_name} already holds different values for {sorted(changed)} "
            f"(e.g. {next(iter(changed.items()))}); give a new --run-name for a different configuration"
        )
    new = {k: v for k, v in fresh.items() if k not in have}
    if new:
        mlflow.log_params(new)
