"""`fingerprint bench-train`: training throughput (triplets per second) on Ray Train with 1, 2, ... workers.

    fingerprint bench-train                                     # CPU, 1 and 2 workers, bundled sample data
    fingerprint bench-train --use-gpu --workers 1,2,4 --backbone resnet50 --image-size 224 --batch-size 64

Each worker count gets a fresh Ray Train run (no MLflow, nothing registered) of --epochs epochs; throughput is all
workers' triplets in an epoch divided by the epoch's training time (validation and worker start-up excluded),
the median over the epochs after the first (which pays for warm-up). Results go to --results (JSON) and a Markdown
table beside it. On GPU, mixed precision follows --amp. Without --data, a small sample benchmark is made first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fingerprint.commands.cli import Command
from fingerprint.config import flag, to_dict, validate
from jobs.ray_session import init_ray
from jobs.train_ray import RayTrainConfig, build_trainer, load_state, resolved

log = logging.getLogger(__name__)


@dataclass
class BenchTrainConfig(RayTrainConfig):
    data: str = ""
    """Benchmark folder; empty = make a small sample benchmark in a temporary folder."""
    backbone: str = "resnet18"
    """timm backbone to time."""
    weights: str = "none"
    """Weights do not change the speed: 'none' avoids any download."""
    image_size: int | None = 64
    """Input size in pixels."""
    embed_dim: int = 64
    """Embedding size."""
    epochs: int = 3
    """Epochs per worker count; the first is warm-up and not counted (unless it is the only one)."""
    triplets_per_epoch: int = 512
    """Triplets per epoch, split between the workers."""
    batch_size: int = 16
    """Triplets per step per worker."""
    val_fraction: float = 0.0
    """No validation: only training is timed."""
    workers: str = "1,2"
    """Comma-separated worker counts to time."""
    results: str = "benchmarks/results/train_throughput.json"
    """JSON results file (a Markdown table is written beside it)."""
    tracking_uri: str = "none"
    """Benchmarks are not tracked."""
    backend: Literal["ray", "local"] = "ray"
    """'ray' times Ray Train runs; 'local' times the library's `fit` in this process (one worker, no Ray: the
    per-worker speed, e.g. on a GPU machine where Ray is not installed)."""

    def worker_counts(self) -> list[int]:
        try:
            counts = [int(w) for w in self.workers.split(",") if w.strip()]
        except ValueError as e:
            raise ValueError(f"{flag('workers')}: {e} (give comma-separated integers)") from e
        return counts

    def problems(self) -> list[str]:
        out = RayTrainConfig.problems(self)
        if not self.data:  # allowed here: sample data is made first
            out = [p for p in out if not p.startswith(flag("data") + ":")]
        try:
            counts = self.worker_counts()
            if not counts or min(counts) < 1:
                out.append(f"{flag('workers')}: at least one count, each >= 1")
            if self.backend == "local" and counts != [1]:
                out.append(f"{flag('workers')}: --backend local runs exactly one worker (give --workers 1)")
        except ValueError as e:
            out.append(str(e))
        if self.backend not in ("ray", "local"):
            out.append(f"{flag('backend')}: ray or local (got {self.backend!r})")
        return out


def _sample_data(folder: Path, size: int = 64) -> Path:
    from fingerprint.data.phantoms import make_sample_dataset

    make_sample_dataset(folder, n_patients=20, slices_per_patient=4, size=size, n_generated_dev=100,
                        n_generated_test=100, n_reference_patients=20, seed=0)
    return folder


def time_workers(config: RayTrainConfig, workers: int) -> dict[str, Any]:
    """One fresh Ray Train run with `workers` workers; the epoch timings from its last checkpoint."""
    storage = Path(tempfile.mkdtemp(prefix="fingerprint-bench-"))
    try:
        cfg = dataclasses.replace(config, num_workers=workers, min_workers=0, storage_path=str(storage),
                                  run_name=f"bench-{workers}w", max_failures=0, checkpoints_to_keep=1)
        t0 = time.perf_counter()
        result = build_trainer(cfg).fit()
        wall = time.perf_counter() - t0
        with result.checkpoint.as_directory() as folder:
            history = load_state(folder)["history"]
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    # rank 0 trains on its 1/workers shard; DDP keeps the ranks in step, so its epoch time is everyone's.
    per_epoch = [h["triplets"] * workers / h["epoch_seconds"] for h in history]
    counted = per_epoch[1:] or per_epoch
    return {"workers": workers, "triplets_per_s": statistics.median(counted),
            "per_epoch_triplets_per_s": per_epoch, "epoch_seconds": [h["epoch_seconds"] for h in history],
            "wall_seconds": wall}


def time_local(config: RayTrainConfig) -> dict[str, Any]:
    """The library's `fit` in this process on one device: what each Ray worker runs, without Ray."""
    from fingerprint.detectors.triplet.training import fit, load_training_data

    data = load_training_data(config)
    device = "cuda" if config.use_gpu else "cpu"
    t0 = time.perf_counter()
    history = fit(config, data, device=__import__("torch").device(device)).history
    wall = time.perf_counter() - t0
    per_epoch = [h["triplets"] / h["epoch_seconds"] for h in history]
    counted = per_epoch[1:] or per_epoch
    return {"workers": 1, "triplets_per_s": statistics.median(counted), "per_epoch_triplets_per_s": per_epoch,
            "epoch_seconds": [h["epoch_seconds"] for h in history], "wall_seconds": wall}


def main(config: BenchTrainConfig) -> dict[str, Any]:
    """Time each worker count, write the results JSON and Markdown table, and return the results."""
    validate(config)
    counts = config.worker_counts()
    tmp = None
    if not config.data:
        tmp = Path(tempfile.mkdtemp(prefix="fingerprint-bench-data-"))
        # 64 px phantoms: the transform resizes to --image-size, and phantoms at 224 px take long to make.
        config = dataclasses.replace(config, data=str(_sample_data(tmp / "sample", 64)))
    import torch

    load_before = os.getloadavg()
    try:
        if config.backend == "local":
            # No Ray and no MLflow here: `resolved` would import MLflow for the tracking URI.
            config = dataclasses.replace(config, data=str(Path(config.data).resolve()))
            rows = [time_local(config)]
            resources = {"CPU": float(os.cpu_count() or 0), "GPU": float(torch.cuda.device_count())}
        else:
            config = resolved(dataclasses.replace(config, tracking_uri="none"))
            init_ray()
            import ray

            rows = []
            for n in counts:
                log.info("timing %d worker(s)", n)
                rows.append(time_workers(config, n))
                log.info("%d worker(s): %.1f triplets/s", n, rows[-1]["triplets_per_s"])
            resources = ray.cluster_resources()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0]["triplets_per_s"]
    for r in rows:
        r["speedup_vs_first"] = r["triplets_per_s"] / base
    gpu_name = torch.cuda.get_device_name(0) if config.use_gpu and torch.cuda.is_available() else None
    report = {
        "what": "Ray Train data-parallel triplet fine-tuning throughput (triplets per second, all workers)",
        "device": "cuda" if config.use_gpu else "cpu",
        "gpu": gpu_name,
        "amp": bool(config.amp and config.use_gpu),
        "backend": config.backend,
        "cluster": {k: resources[k] for k in ("CPU", "GPU") if k in resources},
        # The machine may be shared: a load above its CPU count means the figures are pessimistic.
        "load_average_1_5_15min": {"before": [round(x, 2) for x in load_before],
                                   "after": [round(x, 2) for x in os.getloadavg()]},
        "host": {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__},
        "settings": {k: v for k, v in to_dict(config).items()
                     if k in ("backbone", "image_size", "embed_dim", "batch_size", "triplets_per_epoch", "epochs",
                              "cpus_per_worker", "mining", "augment", "loader_workers")},
        "results": rows,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    from fingerprint.evaluation.metrics import format_table
    from fingerprint.io import write_text_atomic

    path = Path(config.results)
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    table = format_table(
        [{"workers": r["workers"], "triplets/s": f"{r['triplets_per_s']:.1f}",
          "speed-up": f"{r['speedup_vs_first']:.2f}x", "epoch s": ", ".join(f"{s:.2f}" for s in r["epoch_seconds"]),
          "wall s": f"{r['wall_seconds']:.0f}"} for r in rows],
        ["workers", "triplets/s", "speed-up", "epoch s", "wall s"])
    device = f"GPU ({gpu_name}, AMP {'on' if report['amp'] else 'off'})" if config.use_gpu else "CPU"
    md = (f"# Training throughput\n\n{report['settings']['backbone']} at {config.image_size}px, batch "
          f"{config.batch_size} per worker, {device}, backend {config.backend}, resources {report['cluster']}, "
          f"load average before/after {report['load_average_1_5_15min']['before'][0]}/"
          f"{report['load_average_1_5_15min']['after'][0]}, {report['measured_at']}.\n\n" + table + "\n")
    write_text_atomic(path.with_suffix(".md"), md)
    print(md)
    return report


def command() -> Command:
    """Entry point for the `fingerprint.commands` group: `fingerprint bench-train`."""
    return Command(BenchTrainConfig, main, (__doc__ or "").strip().splitlines()[0])


if __name__ == "__main__":
    from jobs._cli import run_command

    raise SystemExit(run_command("bench-train", command))
