"""`fingerprint score-ray`: score many candidate real images with a saved detector as a Ray Data batch job.

    fingerprint score-ray --model runs/frozen --data /data/ctbench --out runs/score
    fingerprint score-ray --model runs/frozen --data /data/ctbench --index /nfs/index --workers 8

The real images `fingerprint predict` would score (a test set's real_unknown/, else every real image) are listed
as a Ray Dataset and read and scored in batches by a pool of actors, each of which loads the
detector and its stored gallery index once (`fingerprint embed`; one GPU per actor where there are GPUs). Each
batch is one `Detector.score(images, ids)` call, the call `predict` makes, so the numbers are the same. The
driver writes what `predict` writes: `submission.csv` (ImageCLEF), `scores.csv` and `scores.jsonl`.

The gallery is the detector's own or the stored index; a --data folder with other generated images needs an
index of them first (`fingerprint embed --model M --data D`): re-embedding a large gallery in every actor is
what this job exists to avoid.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np

from fingerprint.commands.cli import Command
from fingerprint.config import ConfigError, Range, check_fields, flag, validate
from jobs.embed_ray import Embedder, listing, pool_args

log = logging.getLogger(__name__)


class Scorer(Embedder):
    """One actor of the pool: the detector with its gallery (stored index or its own), scoring image batches."""

    def __init__(self, detector_dir: str, index: str = "", skip_bad: bool = False) -> None:
        from fingerprint.index_store import use_stored_index

        super().__init__(detector_dir, skip_bad)
        use_stored_index(self.det, detector_dir, index or None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, images = self.images(batch)
        if not images:
            return {"id": np.zeros(0, dtype=object), "score": np.zeros(0), "nearest_ids": np.zeros(0, dtype=object),
                    "nearest_similarities": np.zeros(0, dtype=object)}
        s = self.det.score(images, ids)
        gallery = self.det.gallery_ids
        return {"id": np.asarray(ids, dtype=object), "score": s.score.astype(np.float64),
                "nearest_ids": np.asarray([json.dumps([gallery[j] for j in row]) for row in s.nearest], dtype=object),
                "nearest_similarities": np.asarray([json.dumps([float(v) for v in row])
                                                    for row in s.nearest_similarity], dtype=object)}


@dataclass
class ScoreRayConfig:
    model: str = ""
    """A saved detector folder (the --out of `fingerprint fit` / `train`, or a registry download)."""
    data: str = ""
    """Test or benchmark folder whose real images are scored (as `fingerprint predict --data`)."""
    out: str = "runs/score-ray"
    """Output folder for submission.csv, scores.csv and scores.jsonl."""
    index: str = ""
    """A stored gallery index (`fingerprint embed`); empty: <model>/index when present, else the detector's own
    gallery."""
    threshold: float | None = None
    """Decision threshold; None uses the detector's."""
    batch_size: Annotated[int, Range(1)] = 64
    """Images per batch an actor scores."""
    workers: Annotated[int, Range(1)] = 2
    """Actors scoring in parallel (each loads the detector and the index once)."""
    cpus_per_worker: Annotated[float, Range(0, lo_open=True)] = 1.0
    """CPUs reserved per CPU actor (each reads, decodes and scores its own batches)."""
    gpu: Literal["auto", "yes", "no"] = "auto"
    """'auto': GPU actors when the cluster has GPUs; 'no' forces CPU actors."""
    skip_bad: bool = False
    """Skip unreadable image files (logged) instead of stopping."""

    def problems(self) -> list[str]:
        out = check_fields(self)
        for name, what in (("model", "a saved detector folder"), ("data", "a test or benchmark folder")):
            value = getattr(self, name)
            if not value:
                out.append(f"{flag(name)}: required, {what}")
            elif not Path(value).exists():
                out.append(f"{flag(name)}: '{value}' does not exist; give {what}")
        return out


def main(config: ScoreRayConfig) -> Path:
    """Score the real images of `config.data` on the cluster; return the submission file's path."""
    from fingerprint.commands.predict import _check_writable, resolve_detector
    from fingerprint.data.imagesets import benchmark_items
    from fingerprint.detectors import load_detector
    from fingerprint.index_store import use_stored_index
    from fingerprint.io import write_csv_atomic, write_text_atomic
    from jobs.train_ray import init_ray

    validate(config)
    t0 = time.perf_counter()
    out = Path(config.out)
    _check_writable(out)
    det_dir = resolve_detector(config.model)
    det = load_detector(det_dir)
    stored = use_stored_index(det, det_dir, config.index or None)  # checks the index before any actor starts
    items = benchmark_items(config.data, skip_bad=config.skip_bad)
    to_score = items.to_score()
    if not to_score:
        raise ConfigError([f"{flag('data')}: {config.data} holds no real images to score"])
    gen_ids = [it.id for it in items.generated]
    if stored is None and gen_ids != det.gallery_ids:
        raise ConfigError([f"{flag('data')}: its {len(gen_ids)} generated images are not the detector's gallery "
                           f"({len(det.gallery_ids)}); store an index of them first: fingerprint embed --model "
                           f"{config.model} --data {config.data}, or use `fingerprint predict`"])
    threshold = det.threshold if config.threshold is None else float(config.threshold)
    kind, signal = det.kind, det.meta.signal
    del det


    init_ray()
    gpus = None if config.gpu == "auto" else config.gpu == "yes"
    ds = listing(to_score, config.workers).map_batches(
        Scorer, fn_constructor_kwargs={"detector_dir": str(det_dir.resolve()),
                                       "index": str(Path(config.index).resolve()) if config.index else "",
                                       "skip_bad": config.skip_bad},
        batch_size=config.batch_size, batch_format="numpy",
        **pool_args(config.workers, config.cpus_per_worker, gpus))
    submission, table, lines = [], [], []
    last = time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, score, near, sims in zip(batch["id"], batch["score"], batch["nearest_ids"],
                                        batch["nearest_similarities"], strict=True):
            near, sims = json.loads(near), json.loads(sims)
            decision = int(score >= threshold)
            submission.append((str(i), decision))
            table.append((str(i), f"{score:.6f}", decision, ";".join(near), ";".join(f"{v:.4f}" for v in sims)))
            lines.append(json.dumps({"id": str(i), "score": float(score), "decision": decision,
                                     "threshold": threshold, "kind": kind, "signal": signal,
                                     "nearest_ids": near, "nearest_similarities": sims}) + "\n")
        if time.perf_counter() - last >= 5:
            last = time.perf_counter()
            log.info("scored %d/%d images", len(submission), len(to_score))
    write_csv_atomic(out / "scores.csv", table,
                     header=("id", "score", "decision", "nearest_ids", "nearest_similarities"))
    write_text_atomic(out / "scores.jsonl", "".join(lines))
    path = write_csv_atomic(out / "submission.csv", submission)
    seconds = time.perf_counter() - t0
    print(f"scored {len(submission)} images in {seconds:.1f}s ({len(submission) / seconds:.1f} images/s), "
          f"{sum(d for _, d in submission)} predicted used: {path}")
    return path


def command() -> Command:
    """Entry point for the `fingerprint.commands` group: `fingerprint score-ray`."""
    return Command(ScoreRayConfig, main, (__doc__ or "").strip().splitlines()[0])


if __name__ == "__main__":
    from jobs._cli import run_command

    raise SystemExit(run_command("score-ray", command))
