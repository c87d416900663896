"""`fingerprint sweep`: one Ray Train run per backbone (and learning rate, margin, embedding size) through Ray Tune.

    fingerprint sweep --data data/sample --backbones resnet18,mobilenetv2_100,tf_efficientnet_lite0 \
        --weights none --image-size 64 --epochs 3 --num-workers 2
    fingerprint sweep --data data/sample --backbones resnet18 --lrs 1e-4,3e-4 --margins 0.2,0.5

On a cluster: `RAY_ADDRESS=... fingerprint sweep ... --use-gpu --num-workers 4 --storage-path s3://...
--tracking-uri http://mlflow:5000`; as many trials run at once as the cluster's CPUs/GPUs hold
(`--max-concurrent-trials` overrides).

A Tune `Tuner` grids over the values; each trial builds its own `TorchTrainer` (the Train V2 way of combining
Tune and Train) and reports every epoch back to Tune. MLflow gets one parent run per sweep and one nested run per
trial, each with its model registered as a new version; the best version by --select-metric gets the alias
`challenger`, ready for `fingerprint promote`.

Names are stable, never timestamps: the sweep is `sweep-<hash of settings and grid>` (or --sweep-name) and each
trial `<sweep>-<backbone>-lr..-m..-d..`. Running the same command again restores the Tune experiment: finished
trials are kept, interrupted ones resume from their last Ray Train checkpoint and log into the same MLflow runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fingerprint.cli import Command
from fingerprint.config import flag, from_dict, to_dict, validate
from jobs.train_ray import (
    BOOKKEEPING,
    NONE,
    RayTrainConfig,
    init_ray,
    resolved,
    run_training,
    safe_name,
    settings_digest,
)

log = logging.getLogger(__name__)

TRIAL_RESOURCES = {"cpu": 0, "memory": 2**20}
"""A trial only drives its TorchTrainer, whose workers reserve their own CPUs/GPUs. Tune insists on a non-empty
request and reserves 1 CPU by default, which would starve a 2-worker trial on a 2-CPU machine: ask for 1 MiB of
memory instead."""


@dataclass
class SweepConfig(RayTrainConfig):
    out: str = "runs/sweep"
    """Local folder for each trial's reports and checkpoint copy (<out>/<trial name>/) and the sweep summary."""
    backbone: str = "resnet18"
    """Not used by the sweep: give the backbones to compare with --backbones."""
    backbones: str = "resnet18,mobilenetv2_100,tf_efficientnet_lite0"
    """Comma-separated timm model names, one Ray Train run each (times the other grids)."""
    lrs: str = ""
    """Comma-separated learning rates to grid over; empty = --lr."""
    margins: str = ""
    """Comma-separated triplet margins to grid over; empty = --margin."""
    embed_dims: str = ""
    """Comma-separated embedding sizes to grid over; empty = --embed-dim."""
    weights_dir: str = ""
    """Folder of offline timm weights named <backbone>.safetensors (e.g. ../shared/weights); a backbone with a file
    there uses it, the others use --weights."""
    sweep_name: str = ""
    """Name of the sweep (Tune experiment, MLflow parent run); empty = 'sweep-<hash of settings and grid>'.
    The same name restores and finishes an interrupted sweep."""
    max_concurrent_trials: int = 0
    """Trials at once; 0 = as many as the cluster's CPUs (and GPUs) hold at --num-workers each."""

    def _grid(self) -> tuple[dict[str, list[Any]], list[str]]:
        errors: list[str] = []

        def parse(name: str, cast: type, default: Any) -> list[Any]:
            text = getattr(self, name)
            if not text.strip():
                return [default]
            try:
                return list(dict.fromkeys(cast(v.strip()) for v in text.split(",") if v.strip()))
            except ValueError as e:
                errors.append(f"{flag(name)}: {e} (give comma-separated numbers)")
                return []

        grid = {"backbone": list(dict.fromkeys(b.strip() for b in self.backbones.split(",") if b.strip())),
                "lr": parse("lrs", float, self.lr), "margin": parse("margins", float, self.margin),
                "embed_dim": parse("embed_dims", int, self.embed_dim)}
        return grid, errors

    def grid(self) -> dict[str, list[Any]]:
        """The values to sweep (single values included), or raise ValueError naming the flag."""
        grid, errors = self._grid()
        if errors:
            raise ValueError("; ".join(errors))
        return grid

    def problems(self) -> list[str]:
        out = RayTrainConfig.problems(self)
        grid, errors = self._grid()
        out += errors
        if not grid["backbone"]:
            out.append(f"{flag('backbones')}: give at least one timm model name")
        if any(v <= 0 for v in grid["lr"]):
            out.append(f"{flag('lrs')}: every learning rate must be > 0")
        if any(v <= 0 for v in grid["margin"]):
            out.append(f"{flag('margins')}: every margin must be > 0")
        if any(v < 2 for v in grid["embed_dim"]):
            out.append(f"{flag('embed_dims')}: every embedding size must be >= 2")
        if self.weights_dir and not Path(self.weights_dir).is_dir():
            out.append(f"{flag('weights_dir')}: '{self.weights_dir}' is not a folder")
        if self.max_concurrent_trials < 0:
            out.append(f"{flag('max_concurrent_trials')}: must be >= 0")
        if self.run_name:
            out.append(f"{flag('run_name')}: trials are named by the sweep; use --sweep-name instead")
        return out


def default_sweep_name(config: SweepConfig) -> str:
    digest = hashlib.sha256(
        json.dumps([settings_digest(config, 16), config.grid(), config.weights_dir], sort_keys=True).encode()
    ).hexdigest()[:8]
    return f"sweep-{digest}"


def trial_name(sweep: str, params: dict[str, Any]) -> str:
    return safe_name(f"{sweep}-{params['backbone']}-lr{params['lr']:g}-m{params['margin']:g}-d{params['embed_dim']}")


def weights_for(backbone: str, weights_dir: str, default: str) -> str:
    if weights_dir:
        for ext in (".safetensors", ".pth", ".bin"):
            candidate = Path(weights_dir) / f"{backbone}{ext}"
            if candidate.is_file():
                return str(candidate.resolve())
    return default


def trial_config(base: dict[str, Any], params: dict[str, Any], sweep: str) -> RayTrainConfig:
    config = from_dict(RayTrainConfig, base)
    config = dataclasses.replace(config, backbone=params["backbone"], lr=float(params["lr"]),
                                 margin=float(params["margin"]), embed_dim=int(params["embed_dim"]))
    config.weights = weights_for(config.backbone, base.get("weights_dir", ""), config.weights)
    config.run_name = trial_name(sweep, params)
    return config


def sweep_trial(params: dict[str, Any], *, base: dict[str, Any], sweep_name: str,
                parent_run_id: str | None) -> None:
    """One Tune trial: build this point's config and train it with Ray Train, reporting each epoch to Tune.

    `params` is the grid point; the rest is bound with `tune.with_parameters`, so Tune's tables show only the grid.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    config = trial_config(base, params, sweep_name)
    run_training(config, parent_run_id=parent_run_id, callbacks=[TuneReportCallback()],
                 tags={"sweep": sweep_name, "trial": config.run_name})


def fitted_concurrency(config: SweepConfig, n_trials: int) -> int:
    """How many trials the cluster holds at once at --num-workers workers each (at least 1)."""
    import ray

    if config.max_concurrent_trials:
        return min(config.max_concurrent_trials, n_trials)
    res = ray.cluster_resources()
    fits = math.floor(res.get("CPU", 0) / (config.num_workers * config.cpus_per_worker) + 1e-9)
    if config.use_gpu:
        fits = min(fits, math.floor(res.get("GPU", 0) / config.num_workers + 1e-9))
    if fits < 1:
        log.warning("the cluster (%s) cannot hold one trial of %d workers now; Tune will wait for resources",
                    {k: res[k] for k in ("CPU", "GPU") if k in res}, config.num_workers)
    return max(1, min(fits, n_trials))


@dataclass
class SweepResult:
    sweep_name: str
    trials: list[dict[str, Any]]
    """One row per trial: name, params, status, selected metric, registered version, MLflow run id."""
    best: dict[str, Any] | None
    parent_run_id: str | None


def main(config: SweepConfig) -> SweepResult:
    """Run (or resume) the grid, then give the best new version the challenger alias."""
    import ray.tune

    validate(config)
    grid = config.grid()
    sweep = config.sweep_name or default_sweep_name(config)
    config = dataclasses.replace(resolved(dataclasses.replace(config, run_name="")), run_name="", sweep_name=sweep)
    init_ray()
    n_trials = math.prod(len(v) for v in grid.values())
    concurrency = fitted_concurrency(config, n_trials)
    log.info("sweep %s: %d trial(s), %d at a time", sweep, n_trials, concurrency)

    import mlflow

    from jobs import tracking

    track = config.tracking_uri != NONE
    parent = None
    if track:
        experiment_id = tracking.setup_experiment(config.tracking_uri, config.experiment, config.artifact_root)
        parent = tracking.start_run(config.tracking_uri, experiment_id, sweep, tags={"sweep": sweep})
        tracking.log_params_flat({**to_dict(config), "n_trials": n_trials},
                                 may_change=BOOKKEEPING | {"max_concurrent_trials"})
    try:
        param_space = {k: ray.tune.grid_search(v) for k, v in grid.items()}
        trainable = ray.tune.with_resources(
            ray.tune.with_parameters(sweep_trial, base=to_dict(config), sweep_name=sweep,
                                     parent_run_id=parent.info.run_id if parent is not None else None),
            TRIAL_RESOURCES)
        path = str(Path(config.storage_path) / sweep) if "://" not in config.storage_path \
            else f"{config.storage_path.rstrip('/')}/{sweep}"
        if ray.tune.Tuner.can_restore(path):
            log.info("restoring sweep %s from %s", sweep, path)
            tuner = ray.tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        else:
            tuner = ray.tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=ray.tune.TuneConfig(
                    max_concurrent_trials=concurrency,
                    trial_name_creator=lambda t: trial_name(sweep, t.config),
                    trial_dirname_creator=lambda t: trial_name(sweep, t.config),
                ),
                run_config=ray.tune.RunConfig(name=sweep, storage_path=config.storage_path, verbose=1,
                                              failure_config=ray.tune.FailureConfig(max_failures=0)),
            )
        grid_result = tuner.fit()
        trials = _collect(config, sweep, grid_result, parent.info.run_id if parent is not None else None)
        best = _best(trials)
        summary = _write_summary(Path(config.out) / f"{sweep}.md", sweep, config.select_metric, trials, best)
        if track:
            mlflow.log_artifact(str(summary))
            if best is not None:
                mlflow.log_metric(f"best_{config.select_metric}", best["metric"])
                mlflow.set_tags({"best_trial": best["name"], "best_version": str(best.get("version"))})
        if best is not None and best.get("version") and config.challenger_alias and track \
                and config.registered_model.lower() != NONE:
            from jobs import registry

            current = registry.get_alias(config.registered_model, config.challenger_alias)
            if current is None or current.version != str(best["version"]):
                registry.set_alias(config.registered_model, config.challenger_alias, best["version"],
                                   reason=f"best of sweep {sweep} by {config.select_metric}",
                                   metrics={config.select_metric: best["metric"], "trial": best["name"]})
        failed = [t for t in trials if t["status"] != "ok"]
        print(summary.read_text())
        if failed and best is None:
            raise RuntimeError(f"sweep {sweep}: every trial failed; first error: {failed[0].get('error')}")
        return SweepResult(sweep, trials, best, parent.info.run_id if parent is not None else None)
    finally:
        if parent is not None:
            mlflow.end_run()


def _collect(config: SweepConfig, sweep: str, grid_result: Any, parent_run_id: str | None) -> list[dict[str, Any]]:
    """Per-trial rows from Tune (status) joined with MLflow (registered version) by the stable trial name."""
    from jobs.train_ray import REGISTERED_TAG

    runs: dict[str, Any] = {}
    if parent_run_id is not None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(config.tracking_uri)
        experiment = client.get_experiment_by_name(config.experiment)
        for r in client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'"):
            runs.setdefault(r.info.run_name, r)
    rows = []
    for result in grid_result:
        params = {k: result.config[k] for k in ("backbone", "lr", "margin", "embed_dim")}
        name = trial_name(sweep, params)
        metric = (result.metrics or {}).get(config.select_metric)
        run = runs.get(name)
        if run is not None and f"selected_{config.select_metric}" in run.data.metrics:
            metric = run.data.metrics[f"selected_{config.select_metric}"]  # the registered epoch, not the last one
        rows.append({
            "name": name, **params,
            "status": "ok" if result.error is None else "failed",
            "error": None if result.error is None else f"{type(result.error).__name__}: {str(result.error)[:300]}",
            "metric": float(metric) if isinstance(metric, int | float) else float("nan"),
            "version": run.data.tags.get(REGISTERED_TAG) if run is not None else None,
            "run_id": run.info.run_id if run is not None else None,
        })
    return sorted(rows, key=lambda r: r["name"])


def _best(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [t for t in trials if t["status"] == "ok" and math.isfinite(t["metric"]) and t["metric"] >= 0]
    return max(ok, key=lambda t: t["metric"]) if ok else None


def _write_summary(path: Path, sweep: str, metric: str, trials: list[dict[str, Any]], best: dict | None) -> Path:
    from fingerprint.io import write_text_atomic
    from fingerprint.metrics import format_table

    rows = [{"trial": t["name"], "backbone": t["backbone"], "lr": f"{t['lr']:g}", "margin": f"{t['margin']:g}",
             "embed_dim": t["embed_dim"], metric: f"{t['metric']:.4f}", "version": t["version"] or "-",
             "status": t["status"] if t["status"] == "ok" else f"failed: {t['error']}"} for t in trials]
    table = format_table(rows, ["trial", "backbone", "lr", "margin", "embed_dim", metric, "version", "status"])
    head = f"# Sweep {sweep}\n\n"
    tail = f"\nBest: {best['name']} ({metric}={best['metric']:.4f}, version {best['version']})\n" if best \
        else "\nNo trial produced a usable model.\n"
    return write_text_atomic(path, head + table + "\n" + tail)


def command() -> Command:
    """Entry point for the `fingerprint.commands` group: `fingerprint sweep`."""
    return Command(SweepConfig, main, (__doc__ or "").strip().splitlines()[0])


if __name__ == "__main__":
    from jobs._cli import run_command

    raise SystemExit(run_command("sweep", command))
