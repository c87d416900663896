"""`fingerprint fit-ray`: fit label-free and cheap detector kinds as Ray tasks, tracked in MLflow, registered.

    fingerprint fit-ray --data data/sample --presets pixel_ncc,pixel_mass,subspace_mass,gradient_nn,best
    fingerprint fit-ray --data data/sample --presets gradient_nn --frozen-backbones resnet18 --weights none

Each detector (a `fingerprint.detectors.PRESETS` name, or `frozen` per backbone) is one Ray task: it loads the
benchmark with `load_fit_data(--data, --val-fraction, --seed)`, so every kind is validated on the same locked
split, runs `fit_detector`, saves the detector folder under `<out>/<run name>/detector` and returns the folder and
its validation metrics. The tasks run in parallel, as many as the cluster's CPUs hold (--cpus-per-task each);
the driver then gives each one an MLflow run (params: kind, preset and settings; metrics: the validation
metrics) and registers the detector as a new version (`jobs.registry.log_detector`). The best by
--select-metric gets the `challenger` alias, for `fingerprint promote`.

Run names are stable (`<name>-<hash of kind, settings, data and split>`): running the same command again reuses
the detectors already registered instead of fitting them again. On a cluster, --out must be shared storage
(NFS) that every node reaches, and --tracking-uri a tracking server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from fingerprint.commands.cli import Command
from fingerprint.config import flag, validate
from jobs.train_ray import NONE, REGISTERED_TAG, safe_name

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ specs


@dataclass
class FitSpec:
    """One detector to fit: a display name, its kind and its settings."""

    name: str
    kind: str
    settings: dict[str, Any]
    preset: str = ""
    """The PRESETS name it came from ('' for per-backbone kinds)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preset_spec(name: str, data: str = "") -> FitSpec:
    """What preset ``name`` fits on the benchmark at ``data`` (shadow detectors take a zoo benchmark's recipe)."""
    from fingerprint.config import ConfigError
    from fingerprint.detectors import PRESETS, preset_settings

    if name not in PRESETS:
        raise ConfigError([f"--presets: unknown preset {name!r}; known: {', '.join(PRESETS)} "
                           "(network kinds: frozen and triplet, per backbone)"])
    kind, settings = preset_settings(name, data)
    return FitSpec(name, kind, settings, preset=name)


def frozen_spec(backbone: str, weights: str, image_size: int | None, k: int | None = None) -> FitSpec:
    settings: dict[str, Any] = {"backbone": backbone, "weights": weights, "device": "cpu"}
    if image_size:
        settings["image_size"] = int(image_size)
    if k:
        settings["k"] = int(k)
    return FitSpec(f"frozen-{backbone}", "frozen", settings)


def split_key(data: str, val_fraction: float, seed: int) -> dict[str, Any]:
    """What decides the locked validation split (and so belongs in every run name)."""
    return {"data": Path(data).name, "val_fraction": float(val_fraction), "seed": int(seed)}


def run_name(spec: FitSpec, data: str, val_fraction: float, seed: int) -> str:
    from fingerprint.detectors.base import TARGET_FPR, THRESHOLD_METHOD

    # The decision rule is in the name: a detector registered under another rule is not reused.
    digest = hashlib.sha256(json.dumps({"kind": spec.kind, "settings": spec.settings,
                                        "threshold": [THRESHOLD_METHOD, TARGET_FPR],
                                        **split_key(data, val_fraction, seed)},
                                       sort_keys=True).encode()).hexdigest()[:8]
    return safe_name(f"{spec.name}-{digest}")


# ------------------------------------------------------------------------------------------------ the task


def fit_to_folder(spec: dict[str, Any], data: str, val_fraction: float, seed: int, skip_bad: bool,
                  out_dir: str) -> dict[str, Any]:
    """Fit one detector on the benchmark's locked split and save it; what each Ray task runs."""
    from fingerprint.data.imagesets import load_fit_data
    from fingerprint.detectors import fit_detector
    from jobs.registry import split_digest

    t0 = time.perf_counter()
    fd = load_fit_data(data, val_fraction, seed, skip_bad)
    det = fit_detector(spec["kind"], spec["settings"], fd)
    det.meta.extra["name"] = spec["name"]
    path = det.save(out_dir)
    return {"path": str(path), "kind": det.kind, "name": spec["name"], "metrics": dict(det.meta.metrics),
            "threshold": det.threshold, "split_sha256": split_digest(det.meta.split),
            "n_train": len(det.meta.split.get("train", [])), "n_val": len(det.meta.split.get("val", [])),
            "seconds": time.perf_counter() - t0}


@ray.remote(num_cpus=1, max_retries=1)
def fit_task(spec: dict[str, Any], data: str, val_fraction: float, seed: int, skip_bad: bool,
             out_dir: str) -> dict[str, Any]:
    """`fit_to_folder` as a Ray task (one CPU unless `.options(num_cpus=...)` says otherwise)."""
    return fit_to_folder(spec, data, val_fraction, seed, skip_bad, out_dir)


# -------------------------------------------------------------------------------------------- tracking


@dataclass
class FitJob:
    """Where a fit reads and writes: the fields `fit-ray` and the sweep share (paths absolute, names filled)."""

    data: str
    out: str
    val_fraction: float = 0.25
    seed: int = 0
    skip_bad: bool = False
    tracking_uri: str = NONE
    experiment: str = ""
    artifact_root: str = ""
    registered_model: str = NONE
    cpus_per_task: float = 1.0


def previous_fit(job: FitJob, name: str, parent_run_id: str | None = None) -> dict[str, Any] | None:
    """The result of an earlier run with this name that registered its detector (a rerun reuses it)."""
    if job.tracking_uri == NONE:
        return None
    from fingerprint.detectors import is_detector_dir
    from jobs import tracking

    experiment_id = tracking.setup_experiment(job.tracking_uri, job.experiment, job.artifact_root)
    run_id = tracking.find_run(job.tracking_uri, experiment_id, name, parent_run_id)
    if run_id is None:
        return None
    from mlflow.tracking import MlflowClient

    run = MlflowClient(job.tracking_uri).get_run(run_id)
    version = run.data.tags.get(REGISTERED_TAG)
    path = run.data.tags.get("detector_path", "")
    if not version or not is_detector_dir(path):
        return None
    return {"path": path, "kind": run.data.params.get("kind"), "name": run.data.params.get("detector"),
            "metrics": {k: v for k, v in run.data.metrics.items() if k.startswith("val_")},
            "split_sha256": run.data.tags.get("split_sha256", ""), "version": version, "run_id": run_id,
            "reused": True}


def track_fit(job: FitJob, spec: FitSpec, name: str, result: dict[str, Any], *, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> dict[str, Any]:
    """An MLflow run for a fitted detector (params, metrics, the detector registered); adds version and run id."""
    import mlflow

    from jobs import registry, tracking

    if job.tracking_uri == NONE:
        return {**result, "version": None, "run_id": None}
    experiment_id = tracking.setup_experiment(job.tracking_uri, job.experiment, job.artifact_root)
    with tracking.start_run(job.tracking_uri, experiment_id, name, parent_run_id=parent_run_id,
                            tags={"dataset": Path(job.data).name, "kind": spec.kind, "detector": spec.name,
                                  **(tags or {})}) as run:
        params = {"kind": spec.kind, "detector": spec.name, "preset": spec.preset,
                  **{f"settings.{k}": v for k, v in spec.settings.items()},
                  "data": job.data, "val_fraction": job.val_fraction, "seed": job.seed}
        tracking.log_params_flat(params, may_change={"data"})
        mlflow.log_metrics({**tracking.finite_metrics(result["metrics"]), "fit_seconds": result["seconds"]})
        mlflow.log_artifact(str(Path(result["path"]) / "meta.json"), artifact_path="detector")
        mlflow.set_tags({registry.SPLIT_TAG: result["split_sha256"], "detector_path": result["path"]})
        version = None
        if job.registered_model.lower() != NONE:
            done = mlflow.get_run(run.info.run_id).data.tags.get(REGISTERED_TAG)
            if done:
                version = done
            else:
                mv = registry.log_detector(Path(result["path"]), job.registered_model,
                                           tags={"run_name": name, **(tags or {})})
                version = str(mv.version)
                mlflow.set_tag(REGISTERED_TAG, version)
        return {**result, "version": version, "run_id": run.info.run_id}


def fit_and_register(job: FitJob, spec: FitSpec, *, parent_run_id: str | None = None,
                     tags: dict[str, str] | None = None, name: str = "") -> dict[str, Any]:
    """Fit one detector as a Ray task, wait for it, track and register it (reusing an earlier registered run).

    `name` names the MLflow run and the output folder (default: `run_name`, stable for equal settings)."""
    name = name or run_name(spec, job.data, job.val_fraction, job.seed)
    found = previous_fit(job, name, parent_run_id)
    if found is not None:
        log.info("%s: reusing version %s (%s)", name, found["version"], found["path"])
        return found
    # "DEFAULT": inside a Tune trial the task would otherwise be captured by the trial's placement group, which
    # reserves no CPU for it; it reserves its own instead.
    ref = fit_task.options(num_cpus=job.cpus_per_task, scheduling_strategy="DEFAULT").remote(
        spec.to_dict(), job.data, job.val_fraction, job.seed, job.skip_bad, str(Path(job.out) / name / "detector"))
    return track_fit(job, spec, name, ray.get(ref), parent_run_id=parent_run_id, tags=tags)


# ----------------------------------------------------------------------------------------------- command


@dataclass
class FitRayConfig:
    data: str = ""
    """Benchmark folder (dev/ and test/, or one labelled folder, or a manifest)."""
    presets: str = "pixel_ncc,pixel_mass,subspace_mass,gradient_nn"
    """Comma-separated detector presets (see fingerprint.detectors.PRESETS), one Ray task each."""
    frozen_backbones: str = ""
    """Comma-separated timm backbones to fit the 'frozen' kind with (one task each); empty = none."""
    weights: str = "none"
    """Weights of the frozen backbones: a local timm file, 'hub' or 'none'."""
    image_size: int = 64
    """Input size of the frozen backbones."""
    out: str = "runs/fit-ray"
    """Folder for the detector folders (<out>/<run name>/detector); shared storage on a cluster."""
    val_fraction: float = 0.25
    """Labelled dev images held out (by whole groups) for validation: the locked split every kind shares."""
    seed: int = 0
    """Seed of the split."""
    skip_bad: bool = False
    """Skip unreadable image files instead of stopping."""
    cpus_per_task: float = 1.0
    """CPUs reserved per fitting task."""
    select_metric: str = "val_auc"
    """Validation metric (higher is better) that picks the challenger."""
    tracking_uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI (relative sqlite paths are made absolute), or 'none' to fit without tracking."""
    artifact_root: str = ""
    """Folder or URI for MLflow artifacts of new experiments; empty = mlartifacts/ beside the sqlite file."""
    experiment: str = ""
    """MLflow experiment; empty = 'fingerprint-<dataset folder name>'."""
    registered_model: str = ""
    """Registered model receiving each detector as a version; empty = 'fingerprint-<dataset folder name>',
    'none' = do not register."""
    challenger_alias: str = "challenger"
    """Alias given to the best new version; empty = none."""

    def specs(self) -> list[FitSpec]:
        out = [preset_spec(p.strip(), self.data) for p in self.presets.split(",") if p.strip()]
        out += [frozen_spec(b.strip(), self.weights, self.image_size) for b in self.frozen_backbones.split(",")
                if b.strip()]
        return out

    def problems(self) -> list[str]:
        from fingerprint.config import ConfigError

        out = []
        if not self.data:
            out.append(f"{flag('data')}: required, a benchmark folder")
        elif not Path(self.data).exists():
            out.append(f"{flag('data')}: '{self.data}' does not exist")
        try:
            if not self.specs():
                out.append(f"{flag('presets')}: give at least one preset (or --frozen-backbones)")
        except ConfigError as e:
            out += list(e.problems)
        if not 0 <= self.val_fraction < 1:
            out.append(f"{flag('val_fraction')}: must be in [0, 1) (got {self.val_fraction})")
        if self.cpus_per_task <= 0:
            out.append(f"{flag('cpus_per_task')}: must be > 0 (got {self.cpus_per_task})")
        if not self.tracking_uri:
            out.append(f"{flag('tracking_uri')}: give a URI (e.g. sqlite:///mlflow.db) or 'none'")
        return out


def job_for(config: Any) -> FitJob:
    """A FitJob with absolute paths and filled-in names from any config with the same field names."""
    from jobs.tracking import resolve_tracking_uri

    def absolute(p: str) -> str:
        return p if "://" in p else str(Path(p).resolve())

    ds = safe_name(Path(config.data).resolve().name)
    uri = NONE if config.tracking_uri.lower() == NONE else resolve_tracking_uri(config.tracking_uri)
    return FitJob(data=absolute(config.data), out=absolute(config.out), val_fraction=config.val_fraction,
                  seed=config.seed, skip_bad=config.skip_bad, tracking_uri=uri,
                  experiment=config.experiment or f"fingerprint-{ds}",
                  artifact_root=absolute(config.artifact_root) if config.artifact_root else "",
                  registered_model=config.registered_model or f"fingerprint-{ds}",
                  cpus_per_task=getattr(config, "cpus_per_task", 1.0))


def main(config: FitRayConfig) -> list[dict[str, Any]]:
    """Fit every requested detector as a parallel Ray task, track and register each, mark the best challenger."""
    from jobs.ray_session import init_ray

    validate(config)
    job = job_for(config)
    specs = config.specs()
    init_ray()
    rows: list[dict[str, Any]] = []
    pending: dict[Any, tuple[FitSpec, str]] = {}
    for spec in specs:
        name = run_name(spec, job.data, job.val_fraction, job.seed)
        found = previous_fit(job, name)
        if found is not None:
            log.info("%s: already registered as version %s", name, found["version"])
            rows.append({**found, "spec": spec})
            continue
        ref = fit_task.options(num_cpus=job.cpus_per_task).remote(
            spec.to_dict(), job.data, job.val_fraction, job.seed, job.skip_bad, str(Path(job.out) / name / "detector"))
        pending[ref] = (spec, name)
    while pending:  # track each detector as soon as its task ends; the others keep fitting
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        spec, name = pending.pop(ref)
        rows.append({**track_fit(job, spec, name, ray.get(ref)), "spec": spec})

    metric = config.select_metric
    scored = [r for r in rows if r.get("version") and math.isfinite(r["metrics"].get(metric, float("nan")))]
    best = max(scored, key=lambda r: r["metrics"][metric]) if scored else None
    if best is not None and config.challenger_alias and job.registered_model.lower() != NONE:
        from jobs import registry

        current = registry.get_alias(job.registered_model, config.challenger_alias)
        if current is None or current.version != str(best["version"]):
            registry.set_alias(job.registered_model, config.challenger_alias, best["version"],
                               reason=f"best of fit-ray by {metric} ({best['name']}, kind {best['kind']})",
                               metrics={metric: best["metrics"][metric], "detector": best["name"]})
    from fingerprint.evaluation.metrics import format_table

    print(format_table(
        [{"detector": r["spec"].name, "kind": r["spec"].kind, metric: f"{r['metrics'].get(metric, float('nan')):.4f}",
          "version": r.get("version") or "-", "folder": r["path"]} for r in rows],
        ["detector", "kind", metric, "version", "folder"]))
    if best is not None:
        print(f"best: {best['name']} ({metric}={best['metrics'][metric]:.4f}, version {best['version']})"
              + (f" -> alias {config.challenger_alias}" if config.challenger_alias else ""))
    return rows


def command() -> Command:
    """Entry point for the `fingerprint.commands` group: `fingerprint fit-ray`."""
    return Command(FitRayConfig, main, (__doc__ or "").strip().splitlines()[0])


if __name__ == "__main__":
    from jobs._cli import run_command

    raise SystemExit(run_command("fit-ray", command))
