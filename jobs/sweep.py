"""`fingerprint sweep`: one Ray Tune grid over detector kinds x backbones x settings, every trial registered.

    fingerprint sweep --data data/sample --presets triplet,pixel_ncc,gradient_nn,best --backbones resnet18 \
        --weights none --image-size 64 --epochs 3 --num-workers 2
    fingerprint sweep --data data/sample --presets triplet,frozen --backbones resnet18,mobilenetv2_100 \
        --lrs 1e-4,3e-4 --margins 0.2,0.5

--presets names `fingerprint.detectors.PRESETS` entries (pixel_l2, pixel_ncc, pixel_mass, subspace_mass,
gradient_nn, domain_clf, ssim, ab_rank, best) plus `triplet` and `frozen`, which expand per --backbones (the
triplet ones also per --lrs, --margins and --embed-dims). On a cluster: `RAY_ADDRESS=... fingerprint sweep ...
--use-gpu --num-workers 4 --storage-path s3://... --tracking-uri http://mlflow:5000`.

A Tune `Tuner` runs one trial per detector configuration. A triplet trial builds its own `TorchTrainer` (the Train
V2 way of combining Tune and Train: data-parallel training, checkpoints, per-epoch reports to Tune) and registers
the triplet detector of its best checkpoint; any other trial fits its detector as one Ray task
(`jobs.fit_ray.fit_task`). Every kind loads the benchmark with the same --val-fraction and --seed, so all are
validated on one locked split; each trial reports the detector's `val_auc` (and the other validation metrics)
and registers a new version. MLflow gets one parent run per sweep and one nested run per trial; the best version
by --select-metric gets the alias `challenger`, ready for `fingerprint promote`.

Names are stable, never timestamps: the sweep is `sweep-<hash of settings and grid>` (or --sweep-name) and each
trial `<sweep>-<detector>` (`<sweep>-triplet-<backbone>-lr..-m..-d..`, `<sweep>-frozen-<backbone>`,
`<sweep>-<preset>`). Running the same command again restores the Tune experiment: finished trials are kept,
interrupted ones resume (triplets from their last Ray Train checkpoint) and log into the same MLflow runs.
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

from fingerprint.commands.cli import Command
from fingerprint.config import flag, from_dict, to_dict, validate
from fingerprint.features.backbones import weights_file
from jobs.ray_session import init_ray
from jobs.train_ray import (
    BOOKKEEPING,
    NONE,
    REGISTERED_TAG,
    RayTrainConfig,
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


NETWORK_KINDS = ("triplet", "frozen")
"""--presets entries that expand per backbone."""


@dataclass
class SweepConfig(RayTrainConfig):
    out: str = "runs/sweep"
    """Local folder for each trial's detector, reports and checkpoint copy (<out>/<trial name>/) and the sweep
    summary; shared storage on a cluster (fitting tasks write there)."""
    presets: str = "triplet,pixel_ncc,pixel_mass,subspace_mass,gradient_nn,best"
    """Comma-separated detectors to compare: fingerprint.detectors.PRESETS names, plus 'triplet' (Ray Train, per
    backbone x --lrs x --margins x --embed-dims) and 'frozen' (frozen features, per backbone)."""
    backbone: str = "resnet18"
    """Not used by the sweep: give the backbones to compare with --backbones."""
    backbones: str = "resnet18"
    """Comma-separated timm model names for the 'triplet' and 'frozen' presets."""
    lrs: str = ""
    """Comma-separated learning rates to grid over (triplet trials); empty = --lr."""
    margins: str = ""
    """Comma-separated triplet margins to grid over; empty = --margin."""
    embed_dims: str = ""
    """Comma-separated embedding sizes to grid over (triplet trials); empty = --embed-dim."""
    weights_dir: str = ""
    """Folder of offline timm weights named <backbone>.safetensors (e.g. ../shared/weights); a backbone with a file
    there uses it, the others use --weights."""
    cpus_per_task: float = 1.0
    """CPUs reserved by the fitting task of each non-triplet trial."""
    sweep_name: str = ""
    """Name of the sweep (Tune experiment, MLflow parent run); empty = 'sweep-<hash of settings and grid>'.
    The same name restores and finishes an interrupted sweep."""
    max_concurrent_trials: int = 0
    """Trials at once; 0 = as many as the cluster's CPUs (and GPUs) hold (a triplet trial needs --num-workers
    workers, another trial one task)."""

    def preset_names(self) -> list[str]:
        return list(dict.fromkeys(p.strip() for p in self.presets.split(",") if p.strip()))

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
        """The triplet values to sweep (single values included), or raise ValueError naming the flag."""
        grid, errors = self._grid()
        if errors:
            raise ValueError("; ".join(errors))
        return grid

    def specs(self) -> list[dict[str, Any]]:
        """One entry per trial, in order: what it fits ('mode' train = Ray Train triplet, task = fit task)."""
        from jobs.fit_ray import frozen_spec, preset_spec

        grid = self.grid()
        out: list[dict[str, Any]] = []
        for preset in self.preset_names():
            if preset == "triplet":
                for b in grid["backbone"]:
                    for lr in grid["lr"]:
                        for m in grid["margin"]:
                            for d in grid["embed_dim"]:
                                out.append({"trial": f"triplet-{b}-lr{lr:g}-m{m:g}-d{d}", "mode": "train",
                                            "kind": "triplet", "detector": f"triplet-{b}", "backbone": b,
                                            "lr": lr, "margin": m, "embed_dim": d})
            elif preset == "frozen":
                for b in grid["backbone"]:
                    spec = frozen_spec(b, weights_for(b, self.weights_dir, self.weights), self.image_size, self.k)
                    out.append({"trial": spec.name, "mode": "task", "kind": spec.kind, "detector": spec.name,
                                "backbone": b, "settings": spec.settings, "preset": ""})
            else:
                spec = preset_spec(preset, self.data)
                out.append({"trial": spec.name, "mode": "task", "kind": spec.kind, "detector": spec.name,
                            "backbone": "", "settings": spec.settings, "preset": preset})
        return out

    def problems(self) -> list[str]:
        from fingerprint.config import ConfigError
        from fingerprint.detectors import PRESETS

        out = RayTrainConfig.problems(self)
        grid, errors = self._grid()
        out += errors
        names = self.preset_names()
        unknown = [p for p in names if p not in PRESETS and p not in NETWORK_KINDS]
        if not names:
            out.append(f"{flag('presets')}: give at least one detector (e.g. triplet,pixel_ncc,gradient_nn)")
        if unknown:
            out.append(f"{flag('presets')}: unknown {', '.join(unknown)}; known: "
                       f"{', '.join([*PRESETS, *NETWORK_KINDS])}")
        if any(p in NETWORK_KINDS for p in names) and not grid["backbone"]:
            out.append(f"{flag('backbones')}: give at least one timm model name for triplet/frozen")
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
        if self.cpus_per_task <= 0:
            out.append(f"{flag('cpus_per_task')}: must be > 0")
        if self.run_name:
            out.append(f"{flag('run_name')}: trials are named by the sweep; use --sweep-name instead")
        if not out:
            try:
                self.specs()
            except (ConfigError, ValueError) as e:
                out += list(getattr(e, "problems", [str(e)]))
        return out


def default_sweep_name(config: SweepConfig) -> str:
    digest = hashlib.sha256(
        json.dumps([settings_digest(config, 16), config.specs(), config.weights_dir], sort_keys=True).encode()
    ).hexdigest()[:8]
    return f"sweep-{digest}"


def trial_name(sweep: str, spec: dict[str, Any]) -> str:
    return safe_name(f"{sweep}-{spec['trial']}")


def weights_for(backbone: str, weights_dir: str, default: str) -> str:
    """The backbone's file in ``weights_dir`` (absolute), else ``default`` ('none' or 'hub')."""
    found = weights_file(weights_dir, backbone) if weights_dir else None
    return str(found.resolve()) if found is not None else default


def trial_config(base: dict[str, Any], spec: dict[str, Any], sweep: str) -> RayTrainConfig:
    config = from_dict(RayTrainConfig, {k: v for k, v in base.items()
                                        if k in {f.name for f in dataclasses.fields(RayTrainConfig)}})
    config = dataclasses.replace(config, backbone=spec["backbone"], lr=float(spec["lr"]),
                                 margin=float(spec["margin"]), embed_dim=int(spec["embed_dim"]))
    config.weights = weights_for(config.backbone, base.get("weights_dir", ""), config.weights)
    config.run_name = trial_name(sweep, spec)
    return config


def _final_report(metrics: dict[str, float], select_metric: str, version: str | None) -> dict[str, Any]:
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
    out.setdefault(select_metric, -1.0)  # Tune needs the metric in every trial's last result
    out["registered_version"] = float(version) if version else -1.0
    return out


def sweep_trial(params: dict[str, Any], *, base: dict[str, Any], sweep_name: str,
                parent_run_id: str | None) -> None:
    """One Tune trial: train a triplet detector with Ray Train, or fit another kind as one Ray task; either way
    register it and report its validation metrics to Tune.

    `params` holds the trial's spec; the rest is bound with `tune.with_parameters`.
    """
    import ray.tune

    spec = params["spec"]
    name = trial_name(sweep_name, spec)
    tags = {"sweep": sweep_name, "trial": name}
    select = base["select_metric"]
    if spec["mode"] == "train":
        from ray.tune.integration.ray_train import TuneReportCallback

        config = trial_config(base, spec, sweep_name)
        out = run_training(config, parent_run_id=parent_run_id, callbacks=[TuneReportCallback()], tags=tags)
        ray.tune.report(_final_report(out.detector_metrics, select, out.model_version))
        return
    from jobs.fit_ray import FitSpec, fit_and_register, job_for

    job = job_for(from_dict(RayTrainConfig, {k: v for k, v in base.items()
                                             if k in {f.name for f in dataclasses.fields(RayTrainConfig)}}))
    job.cpus_per_task = float(base.get("cpus_per_task", 1.0))
    fs = FitSpec(spec["detector"], spec["kind"], dict(spec["settings"]), spec.get("preset", ""))
    result = fit_and_register(job, fs, parent_run_id=parent_run_id, tags=tags, name=name)
    ray.tune.report(_final_report(result["metrics"], select, result.get("version")))


def fitted_concurrency(config: SweepConfig, specs: list[dict[str, Any]]) -> int:
    """How many trials the cluster holds at once (at least 1); a triplet trial needs --num-workers workers, any
    other one task of --cpus-per-task. Trials beyond what fits at the moment wait for Ray's resources."""
    import ray

    n_trials = len(specs)
    if config.max_concurrent_trials:
        return min(config.max_concurrent_trials, n_trials)
    res = ray.cluster_resources()
    demands = [config.num_workers * config.cpus_per_worker if s["mode"] == "train" else config.cpus_per_task
               for s in specs]
    fits = math.floor(res.get("CPU", 0) / min(demands) + 1e-9)
    if config.use_gpu and any(s["mode"] == "train" for s in specs) and all(s["mode"] == "train" for s in specs):
        fits = min(fits, math.floor(res.get("GPU", 0) / config.num_workers + 1e-9))
    if fits < 1:
        log.warning("the cluster (%s) cannot hold one trial now; Tune will wait for resources",
                    {k: res[k] for k in ("CPU", "GPU") if k in res})
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
    specs = config.specs()
    sweep = config.sweep_name or default_sweep_name(config)
    config = dataclasses.replace(resolved(dataclasses.replace(config, run_name="")), run_name="", sweep_name=sweep)
    init_ray()
    n_trials = len(specs)
    concurrency = fitted_concurrency(config, specs)
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
        param_space = {"spec": ray.tune.grid_search(specs)}
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
                    trial_name_creator=lambda t: trial_name(sweep, t.config["spec"]),
                    trial_dirname_creator=lambda t: trial_name(sweep, t.config["spec"]),
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
                mlflow.set_tags({"best_trial": best["name"], "best_version": str(best.get("version")),
                                 "best_kind": best["kind"]})
        if best is not None and best.get("version") and config.challenger_alias and track \
                and config.registered_model.lower() != NONE:
            from jobs import registry

            current = registry.get_alias(config.registered_model, config.challenger_alias)
            if current is None or current.version != str(best["version"]):
                registry.set_alias(config.registered_model, config.challenger_alias, best["version"],
                                   reason=f"best of sweep {sweep} by {config.select_metric}: {best['detector']} "
                                          f"(kind {best['kind']})",
                                   metrics={config.select_metric: best["metric"], "trial": best["name"],
                                            "kind": best["kind"]})
        failed = [t for t in trials if t["status"] != "ok"]
        print(summary.read_text())
        if failed and best is None:
            raise RuntimeError(f"sweep {sweep}: every trial failed; first error: {failed[0].get('error')}")
        return SweepResult(sweep, trials, best, parent.info.run_id if parent is not None else None)
    finally:
        if parent is not None:
            mlflow.end_run()


def _collect(config: SweepConfig, sweep: str, grid_result: Any, parent_run_id: str | None) -> list[dict[str, Any]]:
    """Per-trial rows from Tune (status, last report) joined with MLflow (registered version) by trial name."""
    runs: dict[str, Any] = {}
    if parent_run_id is not None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(config.tracking_uri)
        experiment = client.get_experiment_by_name(config.experiment)
        for r in client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'"):
            runs.setdefault(r.info.run_name, r)
    rows = []
    for result in grid_result:
        spec = result.config["spec"]
        name = trial_name(sweep, spec)
        metric = (result.metrics or {}).get(config.select_metric)
        run = runs.get(name)
        version = run.data.tags.get(REGISTERED_TAG) if run is not None else None
        if version and config.registered_model.lower() != NONE:
            from jobs import registry

            # the registered detector's own validation metric (a triplet's last Tune report is the same number)
            metric = registry.version_metrics(registry.get_version(config.registered_model, version)).get(
                config.select_metric, metric)
        rows.append({
            "name": name, "detector": spec["detector"], "kind": spec["kind"], "backbone": spec.get("backbone", ""),
            "status": "ok" if result.error is None else "failed",
            "error": None if result.error is None else _last_line(result.error),
            "metric": float(metric) if isinstance(metric, int | float) else float("nan"),
            "version": version,
            "run_id": run.info.run_id if run is not None else None,
        })
    return sorted(rows, key=lambda r: r["name"])


def _last_line(error: BaseException) -> str:
    """The error's own message (a RayTaskError wraps the remote traceback: its last line says what failed)."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def _best(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [t for t in trials if t["status"] == "ok" and math.isfinite(t["metric"]) and t["metric"] >= 0]
    return max(ok, key=lambda t: t["metric"]) if ok else None


def _write_summary(path: Path, sweep: str, metric: str, trials: list[dict[str, Any]], best: dict | None) -> Path:
    from fingerprint.evaluation.metrics import format_table
    from fingerprint.io import write_text_atomic

    rows = [{"trial": t["name"], "detector": t["detector"], "kind": t["kind"], "backbone": t["backbone"] or "-",
             metric: f"{t['metric']:.4f}", "version": t["version"] or "-",
             "status": t["status"] if t["status"] == "ok" else f"failed: {t['error']}"} for t in trials]
    table = format_table(rows, ["trial", "detector", "kind", "backbone", metric, "version", "status"])
    head = f"# Sweep {sweep}\n\nEvery detector validated on the same held-out split.\n\n"
    tail = (f"\nBest: {best['name']} ({best['detector']}, kind {best['kind']}; {metric}={best['metric']:.4f}, "
            f"version {best['version']})\n") if best \
        else "\nNo trial produced a usable model.\n"
    return write_text_atomic(path, head + table + "\n" + tail)


def command() -> Command:
    """Entry point for the `fingerprint.commands` group: `fingerprint sweep`."""
    return Command(SweepConfig, main, (__doc__ or "").strip().splitlines()[0])


if __name__ == "__main__":
    from jobs._cli import run_command

    raise SystemExit(run_command("sweep", command))
