"""`fingerprint zoo-ray`: build a generator zoo on Ray, one task per generator, each tracked in MLflow.

    fingerprint zoo-ray --spec benchmarks/zoo/suite.yaml --out bench/zoo          # embedded local Ray, ./mlflow.db
    RAY_ADDRESS=ray://head:10001 fingerprint zoo-ray --spec benchmarks/zoo/suite.yaml --out /mnt/shared/zoo \\
        --tracking-uri http://mlflow:5000 --cpus-per-task 4

Every entry of the suite spec (see `fingerprint zoo --help` and `benchmarks/zoo/suite.yaml`) is one Ray task running
the library's `fingerprint.zoo.build.build_benchmark`: it trains the generator on a known part of the real pool,
samples, and writes the benchmark folder (with its labels, split, saved generator and README). As many tasks run at
once as the cluster's CPUs hold (--cpus-per-task each). The driver then gives each generator an MLflow run in the
experiment `--experiment`: its family, settings and build settings as params, the training losses per step and the
memorisation check (pixel-NN AUC on dev and test) as metrics, and zoo.json, split.json, the README, a grid of
generated samples and the saved generator as artifacts.

A folder that already holds a zoo.json is kept (the build is resumable); its run is logged once. On a cluster,
--out must be shared storage that every node reaches, and --tracking-uri a tracking server. The generators train on
CPU (the families have no GPU path yet).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import ray

from fingerprint.commands.cli import Command
from fingerprint.config import Range, check_fields, flag, path_problems, validate
from jobs.train_ray import NONE

log = logging.getLogger(__name__)

LOGGED_TAG = "fingerprint.zoo_logged"


@dataclass
class ZooRayConfig:
    spec: str = "benchmarks/zoo/suite.yaml"
    """Suite spec (YAML): the pool and one entry per generator (see benchmarks/zoo/suite.yaml)."""
    out: str = "runs/zoo"
    """Folder for the benchmarks (<out>/<entry name>/); shared storage on a cluster."""
    only: str = ""
    """Comma-separated entry names to build (default: every entry)."""
    reseed: Annotated[int, Range(0)] = 0
    """Add this to every entry's seed, for a fresh draw of the same suite (see `fingerprint zoo --reseed`)."""
    cpus_per_task: Annotated[float, Range(0, lo_open=True)] = 1.0
    """CPUs reserved per generator task (torch uses as many threads)."""
    tracking_uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI (relative sqlite paths are made absolute), a server URL on a cluster, or 'none'."""
    experiment: str = "fingerprint-zoo"
    """MLflow experiment of the generator runs."""
    artifact_root: str = ""
    """Folder or URI for the experiment's artifacts; empty = mlartifacts/ beside the sqlite file."""

    def problems(self) -> list[str]:
        return check_fields(self) + path_problems(self, "spec", "a suite spec such as benchmarks/zoo/suite.yaml")


def build_entry(spec: str, name: str, out: str, reseed: int = 0) -> dict[str, Any]:
    """Build one entry of the suite (what each Ray task runs), or read it back if already built; its zoo.json."""
    from fingerprint.zoo.build import build_benchmark, built_as, load_suite

    suite = load_suite(spec)
    entry = next(e for e in suite.entries if e.name == name)
    target = Path(out) / name
    build = suite.build_settings(entry, reseed)
    kept = built_as(target, entry.family, entry.settings, build)
    if kept is not None:
        return kept
    return build_benchmark(target, suite.pool_paths(entry, Path(spec).parent), entry.family, entry.settings, build,
                           name=name, overwrite=True)


@ray.remote(num_cpus=1, max_retries=1)
def build_task(spec: str, name: str, out: str, threads: int, reseed: int = 0) -> dict[str, Any]:
    """`build_entry` as a Ray task, with torch limited to the CPUs the task reserved."""
    import torch

    torch.set_num_threads(max(1, threads))
    return build_entry(spec, name, out, reseed)


def sample_grid(folder: Path, path: Path, n: int = 64) -> Path:
    """A square grid of the first ``n`` generated images of a built benchmark (dev/generated)."""
    import numpy as np
    from PIL import Image

    files = sorted((folder / "dev" / "generated").glob("*.png"))[:n]
    images = [np.asarray(Image.open(f).convert("L")) for f in files]
    side = int(np.ceil(np.sqrt(len(images))))
    h, w = images[0].shape
    grid = np.zeros((side * h, side * w), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, side)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    Image.fromarray(grid).resize((side * w * 2, side * h * 2), Image.Resampling.NEAREST).save(path)
    return path


def track(config: ZooRayConfig, record: dict[str, Any], folder: Path) -> str | None:
    """Log one built generator to MLflow (once per run name); returns the run id."""
    import mlflow

    from jobs import tracking

    if config.tracking_uri == NONE:
        return None
    experiment_id = tracking.setup_experiment(config.tracking_uri, config.experiment, config.artifact_root)
    with tracking.start_run(config.tracking_uri, experiment_id, record["name"],
                            tags={"family": record["family"],
                                  **({"memorisation": record["memorisation"]} if "memorisation" in record else {})
                                  }) as run:
        if mlflow.get_run(run.info.run_id).data.tags.get(LOGGED_TAG):
            return run.info.run_id
        params = {"family": record["family"],
                  **{f"settings.{k}": v for k, v in (record.get("settings") or {}).items()},
                  **{f"build.{k}": v for k, v in (record.get("build") or {}).items()}}
        tracking.log_params_flat(params)
        for step in record.get("history") or []:
            tracking.log_epoch_metrics(config.tracking_uri, run.info.run_id,
                                       {k: v for k, v in step.items() if k != "step"}, step=int(step.get("step", 0)))
        mlflow.log_metrics(tracking.finite_metrics({**(record.get("checks") or {}),
                                                    **(record.get("timing") or {})}))
        for name in ("zoo.json", "split.json", "README.md", "test_labels.csv", "groups.csv"):
            if (folder / name).is_file():
                mlflow.log_artifact(str(folder / name))
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(sample_grid(folder, Path(tmp) / "samples.png")))
        if (folder / "generator").is_dir():
            mlflow.log_artifacts(str(folder / "generator"), artifact_path="generator")
        mlflow.set_tag(LOGGED_TAG, "1")
        return run.info.run_id


def main(config: ZooRayConfig) -> list[dict[str, Any]]:
    """Build the suite's entries as Ray tasks (existing ones are kept) and log each to MLflow."""
    from fingerprint.zoo.build import load_suite
    from jobs.ray_session import init_ray
    from jobs.tracking import resolve_tracking_uri

    validate(config)
    spec = str(Path(config.spec).resolve())
    out = Path(config.out).resolve()
    suite = load_suite(spec)
    names = [e.name for e in suite.entries]
    only = [n.strip() for n in config.only.split(",") if n.strip()]
    unknown = sorted(set(only) - set(names))
    if unknown:
        from fingerprint.config import ConfigError

        raise ConfigError([f"{flag('only')}: no entry named {', '.join(unknown)} in {config.spec}; entries: "
                           + ", ".join(names)])
    chosen = only or names
    if config.tracking_uri != NONE:
        config.tracking_uri = resolve_tracking_uri(config.tracking_uri)
    init_ray()
    threads = max(1, int(config.cpus_per_task))
    refs = {n: build_task.options(num_cpus=config.cpus_per_task).remote(spec, n, str(out), threads, config.reseed)
            for n in chosen}
    rows = []
    for name, ref in refs.items():
        record = ray.get(ref)
        run_id = track(config, record, out / name)
        checks = record.get("checks") or {}
        rows.append({"name": name, "family": record["family"], "run_id": run_id, **checks})
        log.info("%s (%s): built in %s, checks %s", name, record["family"], out / name, checks)
    print(json.dumps(rows, indent=1))
    return rows


def command() -> Command:
    """Entry point for the `fingerprint.commands` group: `fingerprint zoo-ray`."""
    return Command(ZooRayConfig, main, (__doc__ or "").strip().splitlines()[0])


if __name__ == "__main__":
    from jobs._cli import run_command

    raise SystemExit(run_command("zoo-ray", command))
