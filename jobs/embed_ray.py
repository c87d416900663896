"""`fingerprint embed`: embed a gallery of generated images (and the real reference pool) with a fitted detector
as a Ray Data job, and store the embeddings and a search index beside the detector.

    fingerprint embed --model runs/frozen --data /data/ctbench                 # exact search (default)
    fingerprint embed --model runs/frozen --data /data/ctbench --approximate ivf --out /nfs/index

The image files are listed as a Ray Dataset and streamed through a pool of actors that each load the detector
once and read, decode and embed their batches (one GPU per actor where the cluster has GPUs, else CPU actors), and
the embeddings come back to the driver in order and are written in `.npy` shards of --shard-rows as they arrive:
no process ever holds all images, and the driver holds only the finished embeddings while building an
approximate index. The result is a stored index (`fingerprint.index_store`) in `<detector>/index` (or --out),
whose manifest names the detector (sha256 of its arrays) and, with --registered-model/--model-version, the
registry version that made it; with a tracking URI the job is an MLflow run and the version gets a tag
`fingerprint.index` pointing at the index. `fingerprint predict` and the service then read the stored
embeddings instead of embedding the gallery again.

Kinds that fit their feature map on the generated images (subspace) keep the saved map: the stored gallery is
embedded with what the detector learnt, not refitted on the new images.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np

from fingerprint.commands.cli import Command
from fingerprint.config import ConfigError, Range, check_fields, flag, validate

log = logging.getLogger(__name__)

NONE = "none"
INDEX_TAG = "fingerprint.index"
"""Model-version tag recording the stored index a version made (JSON: path, manifest sha256, size, search)."""


# ------------------------------------------------------------------------------------------- reading images


def listing(items: list[Any], workers: int = 1) -> Any:
    """A Ray Dataset of the images' paths and ids (columns `path`, `id`), in the given order.

    Only the listing is a dataset: each actor reads and decodes its batch's files itself, as the offline forward
    pass does. Reading them in separate read tasks measured slower here (the bytes then travel through the
    object store to the actors, and the read tasks compete with the actors for the same cores).
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # ids then come back in the order they were listed
    ctx.enable_progress_bars = False
    rows = [{"path": str(Path(it.path).resolve()), "id": it.id} for it in items]
    return ray.data.from_items(rows, override_num_blocks=blocks(len(rows), workers))


def blocks(n: int, workers: int) -> int:
    """Listing blocks: a few per actor so every actor gets work, about 64 files each on large sets."""
    return max(1, min(n, max(4 * workers, min(n // 64, 2000))))


def pool_args(workers: int, cpus_per_worker: float, gpus: bool | None = None) -> dict[str, Any]:
    """map_batches arguments for an actor pool: one GPU per actor where the cluster has GPUs, else CPU actors."""
    import ray
    import ray.data

    if gpus is None:
        gpus = ray.cluster_resources().get("GPU", 0) >= 1
    args: dict[str, Any] = {"num_gpus": 1} if gpus else {"num_cpus": cpus_per_worker}
    return {**args, "compute": ray.data.ActorPoolStrategy(size=max(1, int(workers)))}


class Embedder:
    """One actor of the pool: loads the detector once, then reads, decodes and embeds batches of image files."""

    def __init__(self, detector_dir: str, skip_bad: bool = False) -> None:
        from fingerprint.detectors import load_detector

        self.det = load_detector(detector_dir)
        self.skip_bad = skip_bad

    def images(self, batch: dict[str, np.ndarray]) -> tuple[list[str], list[Any]]:
        from fingerprint.data.images import DataError, load_image

        ids, images = [], []
        for path, image_id in zip(batch["path"], batch["id"], strict=True):
            try:
                images.append(load_image(str(path)))
            except DataError:
                if not self.skip_bad:
                    raise
                log.warning("skipped unreadable %s", path)
                continue
            ids.append(str(image_id))
        return ids, images

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, images = self.images(batch)
        # A batch of only unreadable files (with --skip-bad) gives an empty block; the driver skips it.
        vectors = (np.asarray(self.det.features(images), dtype=np.float32) if images
                   else np.zeros((0, 1), dtype=np.float32))
        return {"id": np.asarray(ids, dtype=object), "embedding": vectors}


def embed_stream(detector_dir: str, items: list[Any], *, batch_size: int, workers: int, cpus_per_worker: float,
                 skip_bad: bool = False, gpus: bool | None = None) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, embeddings) batches of `items` (ImageItems), in their order, embedded by a Ray Data actor pool."""
    ds = listing(items, workers).map_batches(
        Embedder, fn_constructor_kwargs={"detector_dir": str(Path(detector_dir).resolve()), "skip_bad": skip_bad},
        batch_size=batch_size, batch_format="numpy", **pool_args(workers, cpus_per_worker, gpus))
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if len(batch["id"]):
            yield [str(i) for i in batch["id"]], batch["embedding"]


# ------------------------------------------------------------------------------------------------ command


@dataclass
class EmbedConfig:
    model: str = ""
    """A saved detector of a nearest-neighbour kind (the folder `fingerprint fit` / `train` wrote)."""
    data: str = ""
    """Benchmark or test folder: its generated images form the gallery, its real images the reference pool."""
    out: str = ""
    """Folder of the stored index; empty = <detector>/index, where `predict` and the service find it."""
    approximate: Literal["none", "ivf", "hnsw"] = "none"
    """Also build an approximate faiss index (IVF-Flat or HNSW) searched instead of the exact one."""
    batch_size: Annotated[int, Range(1)] = 64
    """Images per batch an actor embeds."""
    workers: Annotated[int, Range(1)] = 2
    """Actors embedding in parallel (each loads the detector once; one GPU each where there are GPUs)."""
    cpus_per_worker: Annotated[float, Range(0, lo_open=True)] = 1.0
    """CPUs reserved per CPU actor (each reads, decodes and embeds its own batches)."""
    gpu: Literal["auto", "yes", "no"] = "auto"
    """'auto': GPU actors when the cluster has GPUs; 'no' forces CPU actors."""
    shard_rows: Annotated[int, Range(1)] = 65536
    """Embeddings per .npy shard."""
    skip_bad: bool = False
    """Skip unreadable image files (logged) instead of stopping."""
    tracking_uri: str = NONE
    """MLflow tracking URI to record the job in (params, manifest, version tag), or 'none'."""
    experiment: str = "fingerprint-index"
    """MLflow experiment of the embedding runs."""
    registered_model: str = ""
    """Registered model the detector is a version of (recorded in the manifest and tagged in the registry)."""
    model_version: str = ""
    """That version's number."""

    def problems(self) -> list[str]:
        out = check_fields(self)
        for name, what in (("model", "a saved detector folder"), ("data", "a benchmark or test folder")):
            value = getattr(self, name)
            if not value:
                out.append(f"{flag(name)}: required, {what}")
            elif not Path(value).exists():
                out.append(f"{flag(name)}: '{value}' does not exist; give {what}")
        if bool(self.registered_model) != bool(self.model_version):
            out.append(f"{flag('registered_model')} and {flag('model_version')}: give both or neither")
        return out


def _uses_reference(det: Any) -> bool:
    return hasattr(det, "_set_reference_features") and bool(getattr(det.settings, "calibrate", False))


def main(config: EmbedConfig) -> Path:
    """Embed the gallery (and reference pool) of `config.data` and store the index; return its folder."""
    from fingerprint.commands.predict import resolve_detector
    from fingerprint.data.imagesets import benchmark_items
    from fingerprint.detectors import load_detector
    from fingerprint.detectors.neighbours import FeatureNN
    from fingerprint.index_store import (
        FAISS_FILE,
        INDEX_DIR,
        IndexManifest,
        ShardWriter,
        detector_digest,
        write_manifest,
    )
    from fingerprint.io import atomic_dir
    from fingerprint.knn import Gallery
    from jobs.train_ray import init_ray

    validate(config)
    t0 = time.perf_counter()
    det_dir = resolve_detector(config.model)
    det = load_detector(det_dir)
    if not isinstance(det, FeatureNN):
        raise ConfigError([f"{flag('model')}: {det_dir} is a {det.kind} detector; a stored index serves "
                           "nearest-neighbour kinds (pixel, gradient, subspace, frozen, triplet)"])
    items = benchmark_items(config.data, skip_bad=config.skip_bad)
    if not items.generated:
        raise ConfigError([f"{flag('data')}: {config.data} holds no generated images to embed"])
    out = Path(config.out) if config.out else det_dir / INDEX_DIR
    init_ray()
    gpus = None if config.gpu == "auto" else config.gpu == "yes"
    stream = dict(batch_size=config.batch_size, workers=config.workers, cpus_per_worker=config.cpus_per_worker,
                  skip_bad=config.skip_bad, gpus=gpus)
    with atomic_dir(out) as tmp:
        gallery = ShardWriter(tmp, "gallery", config.shard_rows)
        done = 0
        for ids, vectors in embed_stream(str(det_dir), items.generated, **stream):
            gallery.add(ids, vectors)
            done += len(ids)
            log.info("embedded %d/%d generated images", done, len(items.generated))
        gallery_shards = gallery.close()
        if not gallery_shards:
            raise ConfigError([f"{flag('data')}: no readable generated image under {config.data}"])
        reference_shards, reference_ids = [], [it.id for it in items.real]
        if _uses_reference(det) and items.real:
            reference = ShardWriter(tmp, "reference", config.shard_rows)
            for ids, vectors in embed_stream(str(det_dir), items.real, **stream):
                reference.add(ids, vectors)
            reference_shards = reference.close()
            reference_ids = [i for s in reference_shards for i in json.loads((tmp / s.ids).read_text())]
        manifest = IndexManifest(
            detector_sha256=detector_digest(det_dir), kind=det.kind, metric=det.metric, dim=int(gallery.dim or 0),
            gallery=gallery_shards, reference=reference_shards, reference_ids=reference_ids,
            search="exact" if config.approximate == NONE else config.approximate,
            registered_model=config.registered_model or None, model_version=config.model_version or None,
            detector_name=det.name, source=str(Path(config.data).resolve()))
        if manifest.search != "exact":
            import dataclasses

            from fingerprint.index_store import read_index

            # Read back through the reader (as exact, no faiss file yet): the index is built on what is stored.
            write_manifest(tmp, dataclasses.replace(manifest, search="exact"))
            stored = read_index(tmp)
            built = Gallery(stored.gallery, det.metric, search=manifest.search)  # type: ignore[arg-type]
            built.write_index(tmp / FAISS_FILE)
            manifest.approximate = json.loads(json.dumps(built.approximate.__dict__))
        manifest.seconds = round(time.perf_counter() - t0, 3)
        write_manifest(tmp, manifest)
    log.info("stored index of %d generated images (%s search) in %s, %.1fs", manifest.gallery_size, manifest.search,
             out, manifest.seconds)
    if config.tracking_uri.lower() != NONE:
        record(config, out, manifest)
    print(f"index: {out} ({manifest.gallery_size} generated, {len(manifest.reference_ids)} reference, "
          f"{manifest.search}, {manifest.seconds:.1f}s)")
    return out


def record(config: EmbedConfig, out: Path, manifest: Any) -> str:
    """An MLflow run for the index; the registry version that made it gets a tag pointing at it. Returns the run id."""
    import hashlib

    import mlflow
    from mlflow.tracking import MlflowClient

    from fingerprint.index_store import MANIFEST
    from jobs import tracking

    uri = tracking.resolve_tracking_uri(config.tracking_uri)
    experiment_id = tracking.setup_experiment(uri, config.experiment)
    name = f"index-{manifest.detector_sha256[:8]}-{manifest.search}"
    with tracking.start_run(uri, experiment_id, name, tags={"detector_sha256": manifest.detector_sha256}) as run:
        mlflow.log_params({"detector_sha256": manifest.detector_sha256, "kind": manifest.kind,
                           "search": manifest.search, "registered_model": manifest.registered_model or "",
                           "model_version": manifest.model_version or "", "index_path": str(out.resolve()),
                           "data": manifest.source})
        mlflow.log_metrics({"gallery_size": manifest.gallery_size, "reference_size": len(manifest.reference_ids),
                            "seconds": manifest.seconds})
        mlflow.log_artifact(str(out / MANIFEST), artifact_path="index")
        run_id = run.info.run_id
    if config.registered_model:
        sha = hashlib.sha256((out / MANIFEST).read_bytes()).hexdigest()
        MlflowClient(uri).set_model_version_tag(
            config.registered_model, config.model_version, INDEX_TAG,
            json.dumps({"path": str(out.resolve()), "manifest_sha256": sha, "gallery_size": manifest.gallery_size,
                        "search": manifest.search, "run_id": run_id}))
    return run_id


def command() -> Command:
    """Entry point for the `fingerprint.commands` group: `fingerprint embed`."""
    return Command(EmbedConfig, main, (__doc__ or "").strip().splitlines()[0])


if __name__ == "__main__":
    from jobs._cli import run_command

    raise SystemExit(run_command("embed", command))
