"""`fingerprint train-ray`: data-parallel triplet fine-tuning on Ray Train, tracked in MLflow, registered as a version.

On this machine (an embedded local Ray; MLflow in ./mlflow.db with artifacts in ./mlartifacts):

    fingerprint train-ray --data data/sample --backbone resnet18 --weights none --image-size 64 \
        --num-workers 2 --epochs 3

On a running cluster (workers need the project installed, e.g. the image in docker/; storage and tracking must be
reachable from every node):

    RAY_ADDRESS=ray://head:10001 fingerprint train-ray --data /mnt/data/ctbench-s1 --backbone resnet50 \
        --weights hub --num-workers 8 --use-gpu --storage-path s3://bucket/fingerprint \
        --tracking-uri http://mlflow:5000

Every worker runs the library's `fit` (no training logic here): DDP through `prepare_model`, its own shard of each
epoch's triplets through `prepare_data_loader`, bfloat16 autocast on GPU (`--amp`). After each epoch rank 0 saves a
checkpoint (model, optimizer, scheduler, readable meta.json, validation scores) and every rank calls
`ray.train.report`; a restarted worker group resumes from the latest checkpoint. Rank 0 is the only worker that
talks to MLflow (per-epoch metrics); the driver logs the config, then the reports and the model of the best epoch.

What is registered is a *triplet detector* (`fingerprint.detectors`, kind `triplet`), not the checkpoint: the
driver loads the best checkpoint's network, indexes the benchmark with it (`use_network` + `index`), sets the
threshold and validation metrics with `finish_fit` on `load_fit_data(--data, --val-fraction, --seed)` (the split
every detector kind shares) and logs the folder with `jobs.registry.log_detector`, so promotion compares it with
any other kind. The checkpoint format (model.pt, meta.json, training_state.pt) stays internal to Ray Train.

The run name is stable (`<backbone>-<hash of the training settings>` unless `--run-name` is given): running the
same command again resumes the Ray run and the MLflow run instead of starting over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fingerprint.commands.cli import Command
from fingerprint.config import TrainConfig, flag, from_dict, to_dict, validate
from jobs.ray_session import init_ray

log = logging.getLogger(__name__)

NONE = "none"


@dataclass
class RayTrainConfig(TrainConfig):
    out: str = "runs/train-ray"
    """Local folder for each run's reports, its triplet detector and a copy of the selected checkpoint
    (<out>/<run-name>/detector, .../checkpoint)."""
    num_workers: int = 2
    """Ray Train workers (data-parallel replicas); each trains on its own shard of every epoch's triplets."""
    min_workers: int = 0
    """Elastic training: carry on with as few as this many workers when nodes disappear (0 = always exactly
    --num-workers, waiting for resources after a failure)."""
    use_gpu: bool = False
    """One GPU per worker (mixed precision follows --amp)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    storage_path: str = "runs/ray"
    """Where Ray Train persists checkpoints: a local folder, or shared / object storage (s3://, gs://, NFS) that
    every node reaches on a cluster."""
    run_name: str = ""
    """Name of the Ray Train run and the MLflow run; empty = '<backbone>-<hash of the training settings>'. The same
    name resumes an interrupted run from its last checkpoint."""
    max_failures: int = 2
    """Worker-group failures to recover from (restarting from the last checkpoint) before giving up; -1 = always."""
    checkpoints_to_keep: int = 2
    """Checkpoints kept in storage: the best by --select-metric, plus always the latest."""
    select_metric: str = "val_auc"
    """Validation metric (higher is better) that picks the checkpoint to register; ignored without validation."""
    tracking_uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI: a sqlite file (relative paths are made absolute), a server URL on a cluster, or 'none'
    to train without tracking or registering."""
    artifact_root: str = ""
    """Folder or URI for MLflow artifacts of new experiments; empty = mlartifacts/ beside the sqlite file (a
    tracking server decides for itself)."""
    experiment: str = ""
    """MLflow experiment; empty = 'fingerprint-<dataset folder name>' (one experiment per dataset)."""
    registered_model: str = ""
    """Registered model that receives the trained model as a new version; empty = 'fingerprint-<dataset folder
    name>', 'none' = do not register."""
    challenger_alias: str = "challenger"
    """Alias given to the new version (`fingerprint promote` compares it with 'champion'); empty = none."""

    def problems(self) -> list[str]:
        out = TrainConfig.problems(self)
        if self.num_workers < 1:
            out.append(f"{flag('num_workers')}: must be >= 1 (got {self.num_workers})")
        if self.min_workers < 0 or self.min_workers > self.num_workers:
            out.append(f"{flag('min_workers')}: must be in [0, --num-workers] (got {self.min_workers})")
        if self.cpus_per_worker <= 0:
            out.append(f"{flag('cpus_per_worker')}: must be > 0 (got {self.cpus_per_worker})")
        if self.max_failures < -1:
            out.append(f"{flag('max_failures')}: must be >= -1 (got {self.max_failures})")
        if self.checkpoints_to_keep < 1:
            out.append(f"{flag('checkpoints_to_keep')}: must be >= 1 (got {self.checkpoints_to_keep})")
        if self.run_name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=-]*", self.run_name):
            out.append(f"{flag('run_name')}: letters, digits and . _ = - only (got {self.run_name!r})")
        if not self.tracking_uri:
            out.append(f"{flag('tracking_uri')}: give a URI (e.g. sqlite:///mlflow.db) or 'none'")
        if self.device == "cuda" and not self.use_gpu:
            out.append(f"{flag('device')} cuda: Ray places workers, so ask for GPUs with --use-gpu instead")
        return out


# Fields that say where things go, not what is trained: they stay out of the run-name hash.
BOOKKEEPING = frozenset({
    "data", "out", "storage_path", "run_name", "max_failures", "checkpoints_to_keep", "tracking_uri",
    "artifact_root", "experiment", "registered_model", "challenger_alias", "device", "loader_workers", "skip_bad",
    "min_workers", "cpus_per_worker",
})


def settings_digest(config: Any, length: int = 8) -> str:
    """Short hash of the training settings: equal settings give an equal name, so a rerun resumes."""
    relevant = {k: v for k, v in to_dict(config).items() if k not in BOOKKEEPING}
    relevant["data"] = Path(config.data).name
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:length]


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_") or "run"


def default_run_name(config: RayTrainConfig) -> str:
    return f"{safe_name(config.backbone)}-{settings_digest(config)}"


def dataset_name(config: TrainConfig) -> str:
    return safe_name(Path(config.data).resolve().name)


def resolved(config: RayTrainConfig) -> RayTrainConfig:
    """Absolute paths and filled-in names: workers and trials run in other processes and other folders."""
    from jobs.tracking import resolve_tracking_uri

    def absolute(p: str) -> str:
        return p if "://" in p else str(Path(p).resolve())

    ds = dataset_name(config)
    weights = config.weights if config.weights in ("hub", NONE) else absolute(config.weights)
    out = dataclasses.replace(
        config,
        data=absolute(config.data),
        out=absolute(config.out),
        storage_path=absolute(config.storage_path),
        weights=weights,
        tracking_uri=NONE if config.tracking_uri.lower() == NONE else resolve_tracking_uri(config.tracking_uri),
        artifact_root=absolute(config.artifact_root) if config.artifact_root else "",
        experiment=config.experiment or f"fingerprint-{ds}",
        registered_model=config.registered_model or f"fingerprint-{ds}",
    )
    out.run_name = config.run_name or default_run_name(out)
    return out


# ----------------------------------------------------------------------------------------------- Ray workers


def _report_metrics(metrics: dict[str, float], select_metric: str, world_size: int) -> dict[str, float]:
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    out["world_size"] = float(world_size)
    # Ray orders checkpoints by this metric and needs it in every report; an epoch without validation ranks last.
    if not math.isfinite(out.get(select_metric, float("nan"))):
        out[select_metric] = -1.0
    return out


def load_fit(config: TrainConfig) -> Any:
    """The benchmark as FitData with the locked split every detector kind shares."""
    from fingerprint.data.imagesets import load_fit_data

    return load_fit_data(config.data, config.val_fraction, config.seed, config.skip_bad)


def load_data(config: TrainConfig, fit_data: Any = None) -> Any:
    """The triplet loop's TrainingData on that same split."""
    from fingerprint.detectors.triplet.training import training_data

    return training_data(fit_data if fit_data is not None else load_fit(config))


def load_state(folder: str | Path) -> dict[str, Any] | None:
    """A checkpoint's training state (model, optimizer, scheduler, epoch, history), tensors and plain data only."""
    import torch

    f = Path(folder) / "training_state.pt"
    return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: the library's `fit`, with Ray's DDP helpers and a reporting hook."""
    import ray.train
    import ray.train.torch

    from fingerprint.detectors.triplet.training import EpochEnd, fit
    from jobs.tracking import log_epoch_metrics

    config = from_dict(RayTrainConfig, loop_config["config"])
    run_id: str | None = loop_config.get("mlflow_run_id")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    is_main = rank == 0
    data = load_data(config)  # small image sets: every worker holds them, the sampler shards triplets

    resume = None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            resume = load_state(folder)
        if is_main and resume is not None:
            log.info("resuming after epoch %d from %s (world size %d)", resume["epoch"], restored.path, world)

    def on_epoch(end: EpochEnd) -> None:
        metrics = _report_metrics(end.metrics, config.select_metric, world)
        if not is_main:
            ray.train.report(metrics)  # a barrier: every rank reports every epoch
            return
        if run_id:
            try:
                log_epoch_metrics(config.tracking_uri, run_id, metrics, step=end.epoch)
            except Exception as e:  # a tracking hiccup must not cost the epoch; the checkpoint still has them
                log.warning("could not log epoch %d metrics to MLflow: %s", end.epoch, e)
        with tempfile.TemporaryDirectory(prefix="fingerprint-ckpt-") as tmp:
            path = end.save(Path(tmp) / "checkpoint")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(path),
                             checkpoint_dir_name=f"epoch_{end.epoch:04d}")

    fit(config, data, on_epoch=on_epoch, wrap_model=ray.train.torch.prepare_model,
        wrap_loader=ray.train.torch.prepare_data_loader, resume=resume, is_main=is_main,
        device=ray.train.torch.get_device())


# ------------------------------------------------------------------------------------------------- the driver


def build_trainer(config: RayTrainConfig, mlflow_run_id: str | None = None, callbacks: Sequence[Any] = ()) -> Any:
    """The TorchTrainer for a resolved config (see `resolved`)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    resources: dict[str, float] = {"CPU": config.cpus_per_worker}
    if config.use_gpu:
        resources["GPU"] = 1.0
    workers: int | tuple[int, int] = (
        (config.min_workers, config.num_workers) if 0 < config.min_workers < config.num_workers
        else config.num_workers
    )
    has_val = config.val_fraction > 0
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(config), "mlflow_run_id": mlflow_run_id},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=config.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=config.run_name,
            storage_path=config.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.checkpoints_to_keep,
                checkpoint_score_attribute=config.select_metric if has_val else None,
                checkpoint_score_order="max",
            ),
            callbacks=list(callbacks),
        ),
    )


def choose_checkpoint(result: Any, metric: str) -> tuple[Any, dict[str, Any]]:
    """The reported checkpoint with the highest `metric` (the latest when no checkpoint carries it)."""
    scored = [(c, m) for c, m in (result.best_checkpoints or [])
              if isinstance(m.get(metric), int | float) and math.isfinite(m[metric]) and m[metric] >= 0]
    if scored:
        return max(scored, key=lambda cm: (cm[1][metric], cm[1].get("epoch", 0)))
    if result.checkpoint is None:
        raise RuntimeError(
            f"the Ray Train run reported no checkpoint (see the worker logs under {result.path}); "
            "check --epochs and --triplets-per-epoch"
        )
    return result.checkpoint, dict(result.metrics or {})


def build_detector(config: TrainConfig, checkpoint_dir: Path, fit_data: Any = None) -> Any:
    """The triplet detector of a checkpoint's network: indexed on the benchmark, thresholded on the training
    labels, validated on the held-out images of the shared split (``finish_fit``)."""
    from fingerprint.detectors import finish_fit
    from fingerprint.detectors.triplet.checkpoint import load_checkpoint
    from fingerprint.detectors.triplet.training import as_detector

    fd = fit_data if fit_data is not None else load_fit(config)
    ckpt = load_checkpoint(checkpoint_dir)
    det = as_detector(ckpt.model, ckpt.meta["data_config"], config)
    det.meta.extra["name"] = f"triplet-{config.backbone}"
    det.meta.extra["epoch"] = int(ckpt.meta.get("epoch", -1))
    det.index(fd.generated, fd.generated_ids, fd.real, fd.real_ids, fd.groups)
    return finish_fit(det, fd, threshold_method=config.threshold_method, target_fpr=config.target_fpr)


def write_run_reports(out: Path, detector: Any, config: TrainConfig, history: list[dict[str, float]],
                      fit_data: Any = None) -> list[Path]:
    """History, training curves and the validation pictures (ROC, histograms, confusion, evidence) of the
    registered detector, scored on the held-out images of the shared split."""
    from fingerprint.commands.train import write_reports
    from fingerprint.detectors.triplet.training import FitResult, Validation
    from fingerprint.io import write_text_atomic

    data = load_data(config, fit_data)
    validation = None
    if len(data.val_images) and len(np.unique(data.val_labels)) == 2:
        scores = detector.score(data.val_images, data.val_ids)
        validation = Validation(dict(detector.meta.metrics), detector.threshold, scores, data.val_labels, detector)
    result = FitResult(detector.net, detector.meta.extra.get("data_config", {}), list(history), validation,
                       detector.threshold)
    written = write_reports(out, result, data)
    written.append(write_text_atomic(out / "split.json", json.dumps(detector.meta.split, indent=2)))
    return written


@dataclass
class TrainRayResult:
    run_name: str
    checkpoint: Path
    """Local copy of the selected checkpoint (model.pt + meta.json), for fingerprint.detectors.triplet.checkpoint."""
    detector: Path
    """The triplet detector built from it (what is registered), loadable by fingerprint.detectors.load_detector."""
    metrics: dict[str, float]
    """The selected checkpoint's metrics (rank 0's report of that epoch)."""
    detector_metrics: dict[str, float]
    """The registered detector's validation metrics (val_auc, ...) on the shared split."""
    ray_path: str
    """Where Ray Train stored the run (checkpoints, state) under --storage-path."""
    mlflow_run_id: str | None = None
    model_version: str | None = None
    reports: list[Path] = field(default_factory=list)


def run_training(
    config: RayTrainConfig,
    *,
    parent_run_id: str | None = None,
    callbacks: Sequence[Any] = (),
    tags: dict[str, str] | None = None,
) -> TrainRayResult:
    """Train one configuration on Ray Train with MLflow tracking and registration; Ray must be initialised.

    `config` must be `resolved`. Used by `main` and by every sweep trial (which passes its parent run and the
    Tune report callback).
    """
    import mlflow

    from fingerprint.detectors import check_decision
    from jobs import registry, tracking

    fd = load_fit(config)
    check_decision(fd, config.threshold_method, config.target_fpr)  # before any run or epoch, not after
    track = config.tracking_uri != NONE
    run_out = Path(config.out) / config.run_name
    with contextlib.ExitStack() as stack:
        run_id = None
        if track:
            experiment_id = tracking.setup_experiment(config.tracking_uri, config.experiment, config.artifact_root)
            run = stack.enter_context(tracking.start_run(
                config.tracking_uri, experiment_id, config.run_name, parent_run_id=parent_run_id,
                tags={"dataset": dataset_name(config), "backbone": config.backbone, **(tags or {})}))
            run_id = run.info.run_id
            tracking.log_params_flat(to_dict(config), may_change=BOOKKEEPING)
            mlflow.log_dict(to_dict(config), "config.json")

        result = build_trainer(config, run_id, callbacks).fit()
        checkpoint, metrics = choose_checkpoint(result, config.select_metric)
        local = run_out / "checkpoint"
        with checkpoint.as_directory() as folder:
            _copy_checkpoint(Path(folder), local)
        epoch = int(metrics.get("epoch", json.loads((local / "meta.json").read_text()).get("epoch", -1)))
        log.info("%s: selected epoch %d (%s=%s) from %s", config.run_name, epoch, config.select_metric,
                 metrics.get(config.select_metric), checkpoint.path)
        detector = build_detector(config, local, fd)
        detector_dir = detector.save(run_out / "detector")
        reports = write_run_reports(run_out, detector, config, _latest_history(result) or [], fd)

        version = None
        if track:
            mlflow.log_metrics({f"selected_{k}": v for k, v in tracking.finite_metrics(metrics).items()})
            mlflow.set_tags({registry.SPLIT_TAG: registry.split_digest(detector.meta.split),
                             "selected_epoch": str(epoch), "ray_path": result.path, "kind": "triplet",
                             "detector_path": str(detector_dir)})
            for path in reports:
                mlflow.log_artifact(str(path), artifact_path="reports")
            version = _register_once(config, detector_dir, run_id, tags, step=config.epochs)
        return TrainRayResult(config.run_name, local, detector_dir,
                              {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
                              dict(detector.meta.metrics), result.path, run_id, version, reports)


def _latest_history(result: Any) -> list[dict[str, float]] | None:
    if result.checkpoint is None:
        return None
    with result.checkpoint.as_directory() as folder:
        state = load_state(folder)
    return None if state is None else list(state.get("history", []))


REGISTERED_TAG = "fingerprint.registered_version"


def _register_once(config: RayTrainConfig, detector_dir: Path, run_id: str | None, tags: dict[str, str] | None,
                   step: int = 0) -> str | None:
    """Register the triplet detector unless this (resumed) run already did: a restart must not add a twin version."""
    import mlflow

    from jobs import registry

    if config.registered_model.lower() == NONE or run_id is None:
        return None
    done = mlflow.get_run(run_id).data.tags.get(REGISTERED_TAG)
    if done:
        log.info("run %s already registered %s version %s", config.run_name, config.registered_model, done)
        return done
    mv = registry.log_detector(detector_dir, config.registered_model,
                               tags={"run_name": config.run_name, **(tags or {})}, step=step)
    mlflow.set_tag(REGISTERED_TAG, str(mv.version))
    return str(mv.version)


def _copy_checkpoint(src: Path, dst: Path) -> None:
    from fingerprint.io import atomic_dir

    with atomic_dir(dst) as tmp:
        for item in src.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)


def main(config: RayTrainConfig) -> TrainRayResult:
    """Validate, start (or join) Ray, train with tracking, register, and mark the new version as challenger."""
    validate(config)
    config = resolved(config)
    init_ray()
    out = run_training(config)
    if out.model_version is not None and config.challenger_alias:
        from jobs import registry

        registry.set_alias(config.registered_model, config.challenger_alias, out.model_version,
                           reason=f"train-ray run {config.run_name} (kind triplet)",
                           metrics=out.detector_metrics or out.metrics)
    print(f"run {out.run_name}: {config.select_metric}="
          f"{out.detector_metrics.get(config.select_metric, float('nan')):.4f} detector {out.detector}"
          f" (checkpoint {out.checkpoint})")
    if out.model_version is not None:
        print(f"registered {config.registered_model} version {out.model_version}"
              + (f" (alias {config.challenger_alias})" if config.challenger_alias else ""))
    return out


def command() -> Command:
    """Entry point for the `fingerprint.commands` group: `fingerprint train-ray`."""
    return Command(RayTrainConfig, main, (__doc__ or "").strip().splitlines()[0])


if __name__ == "__main__":
    from jobs._cli import run_command

    raise SystemExit(run_command("train-ray", command))
