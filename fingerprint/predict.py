"""`fingerprint predict`: score every real image of a test set and write the ImageCLEF submission.

    fingerprint predict --model runs/s1/checkpoint --data ../shared/bench/ctbench-s1 --out runs/s1/test

Writes `submission.csv` (one `<id>,<0|1>` line per real image, no header, as ImageCLEF expects), `scores.csv`
(`id,score,decision,nearest_ids,nearest_similarities`) and pictures of the evidence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from fingerprint import data as fpdata
from fingerprint import plots
from fingerprint.checkpoint import Checkpoint, load_checkpoint
from fingerprint.config import ConfigError, ScoreConfig, flag, from_dict, validate
from fingerprint.embedding import embed_images, resolve_device
from fingerprint.io import write_csv_atomic
from fingerprint.scoring import Scores, membership_scores
from fingerprint.transforms import Preprocess

log = logging.getLogger(__name__)


@dataclass
class PredictConfig:
    model: str = ""
    """Checkpoint folder written by `fingerprint train` (its <out>/checkpoint, or <out> itself)."""
    data: str = ""
    """Test folder with generated/ and real_unknown/, or a benchmark folder with dev/ and test/ (then the test
    set's real images are scored and all generated images, dev and test, form the gallery)."""
    out: str = "runs/predict"
    """Output folder for submission.csv, scores.csv and pictures."""
    threshold: float | None = None
    """Decision threshold; None uses the one saved in the checkpoint."""
    k: int | None = None
    """Nearest generated images per score; None uses the checkpoint's."""
    batch_size: int = 64
    """Images per forward pass."""
    device: str = "auto"
    """auto, cpu or cuda."""
    skip_bad: bool = False
    """Skip unreadable image files (listed in the log) instead of stopping."""

    def problems(self) -> list[str]:
        out = []
        if not self.model:
            out.append(f"{flag('model')}: required, the checkpoint folder of `fingerprint train`")
        elif not Path(self.model).exists():
            out.append(f"{flag('model')}: '{self.model}' does not exist")
        if not self.data:
            out.append(f"{flag('data')}: required, a test folder or benchmark folder")
        elif not Path(self.data).exists():
            out.append(f"{flag('data')}: '{self.data}' does not exist")
        if self.k is not None and self.k < 1:
            out.append(f"{flag('k')}: must be >= 1")
        if self.batch_size < 1:
            out.append(f"{flag('batch_size')}: must be >= 1")
        return out


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    return path / "checkpoint" if (path / "checkpoint" / "meta.json").is_file() else path


@dataclass
class Prediction:
    ids: list[str]
    scores: Scores
    threshold: float
    gallery_ids: list[str]
    images: list[Image.Image]
    gallery: list[Image.Image]

    @property
    def decisions(self) -> np.ndarray:
        return (self.scores.score >= self.threshold).astype(int)


def score_set(ckpt: Checkpoint, real: list[fpdata.ImageItem], generated: list[fpdata.ImageItem],
              reference: list[fpdata.ImageItem], score_config: ScoreConfig, threshold: float,
              batch_size: int = 64, device: str = "auto", skip_bad: bool = False) -> Prediction:
    """Embed and score `real` against `generated`, calibrated on the `reference` real pool."""
    dev = resolve_device(device)
    model = ckpt.model.to(dev)
    tf = Preprocess(ckpt.meta["data_config"])
    images, real, _ = fpdata.load_images(real, skip_bad=skip_bad)
    gen_images, generated, _ = fpdata.load_images(generated, skip_bad=skip_bad)
    ref_images, _, _ = fpdata.load_images(reference, skip_bad=True)
    emb = embed_images(model, images, tf, batch_size, dev, progress="embed real")
    gal = embed_images(model, gen_images, tf, batch_size, dev, progress="embed generated")
    ref = embed_images(model, ref_images, tf, batch_size, dev, progress="embed reference") if ref_images else None
    scores = membership_scores(emb, gal, score_config, ref)
    return Prediction([it.id for it in real], scores, threshold, [it.id for it in generated], images, gen_images)


def write_prediction(pred: Prediction, out: Path) -> list[Path]:
    s = pred.scores
    written = [write_csv_atomic(out / "submission.csv", zip(pred.ids, pred.decisions, strict=True))]
    written.append(write_csv_atomic(
        out / "scores.csv",
        [
            (i, f"{s.score[n]:.6f}", int(pred.decisions[n]),
             ";".join(pred.gallery_ids[j] for j in s.nearest[n]),
             ";".join(f"{v:.4f}" for v in s.nearest_similarity[n]))
            for n, i in enumerate(pred.ids)
        ],
        header=("id", "score", "decision", "nearest_ids", "nearest_similarities"),
    ))
    written.append(plots.score_histogram(s.score, [None] * len(pred.ids), out / "scores.png",
                                         threshold=pred.threshold, title="test scores"))
    rows = plots.evidence_rows(pred.ids, pred.images, pred.gallery_ids, pred.gallery, s.score, s.nearest,
                               s.nearest_similarity)
    written.append(plots.evidence_grid(rows, out / "evidence.png", title="highest-scoring real images"))
    return written


def main(config: PredictConfig) -> Path:
    """Score the real images of `config.data`; return the submission file's path."""
    validate(config)
    ckpt = load_checkpoint(resolve_checkpoint(config.model))
    score_config = from_dict(ScoreConfig, ckpt.meta["score"])
    if config.k is not None:
        score_config.k = config.k
    dev, test = fpdata.open_benchmark(config.data, skip_bad=config.skip_bad)
    target = test if test is not None else dev
    real = target.role("real_unknown") or target.real
    if not real:
        raise ConfigError([f"{flag('data')}: {target.root} holds no real images to score ({target.summary()})"])
    # Dev and test generated files share names (gen_00001.png in both): qualify the dev ones in the evidence.
    generated = target.generated + (
        [replace(it, id=f"dev/{it.id}") for it in dev.generated] if test is not None else []
    )
    reference = real + (dev.real if test is not None else [])
    threshold = ckpt.threshold if config.threshold is None else config.threshold
    log.info("scoring %d real images against %d generated (k=%d, threshold=%.4f)",
             len(real), len(generated), score_config.k, threshold)
    pred = score_set(ckpt, real, generated, reference, score_config, threshold, config.batch_size,
                     config.device, config.skip_bad)
    out = Path(config.out)
    write_prediction(pred, out)
    log.info("wrote %s (%d lines, %d predicted used)", out / "submission.csv", len(pred.ids),
             int(pred.decisions.sum()))
    return out / "submission.csv"
