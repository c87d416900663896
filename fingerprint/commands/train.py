"""`fingerprint train`: triplet fine-tuning on one machine, writing a triplet detector that `predict` and serving use.

    fingerprint train --data ../shared/bench/ctbench-s1 \
        --backbone tf_efficientnet_lite0 --weights ../shared/weights/tf_efficientnet_lite0.safetensors \
        --image-size 64 --epochs 3 --out runs/s1

Writes ``<out>/detector`` (the triplet kind of the detector protocol: network, gallery, threshold, validation
metrics), ``<out>/checkpoint`` (weights and optimizer state of the last epoch) and reports. The Ray Train job
(`fingerprint train-ray`, in jobs/) runs the same `fit` on several workers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fingerprint.config import TrainConfig, save_json, validate
from fingerprint.detectors.triplet.training import (
    EpochEnd,
    FitResult,
    TrainingData,
    final_detector,
    fit,
    load_training_data,
)
from fingerprint.evaluation import plots
from fingerprint.io import write_csv_atomic, write_text_atomic

log = logging.getLogger(__name__)


def write_reports(out: Path, result: FitResult, data: TrainingData) -> list[Path]:
    """Pictures and tables about a finished run: training curves, validation ROC, histogram, evidence."""
    out.mkdir(parents=True, exist_ok=True)
    written = [write_text_atomic(out / "history.json", json.dumps(result.history, indent=2))]
    written.append(plots.training_curves(result.history, out / "training_curves.png"))
    v = result.validation
    if v is None:
        return written
    s = v.scores
    written.append(plots.roc_plot({"validation": (v.labels, s.score)}, out / "val_roc.png", title="held-out dev"))
    written.append(plots.score_histogram(s.score, v.labels, out / "val_scores.png", threshold=v.threshold))
    written.append(plots.confusion_plot(v.labels, s.score >= v.threshold, out / "val_confusion.png"))
    rows = plots.evidence_rows(data.val_ids, data.val_images, data.gallery_ids, data.gallery, s.score, s.nearest,
                               s.nearest_similarity)
    written.append(plots.evidence_grid(rows, out / "val_evidence.png", title="highest-scoring held-out images"))
    written.append(write_csv_atomic(
        out / "val_scores.csv",
        [(data.val_ids[i], int(v.labels[i]), f"{s.score[i]:.6f}") for i in range(len(v.labels))],
        header=("id", "label", "score"),
    ))
    return written


def main(config: TrainConfig) -> Path:
    """Train, save the detector to `<out>/detector` and the checkpoint to `<out>/checkpoint`, write reports;
    return the detector folder."""
    validate(config)
    out = Path(config.out)
    data = load_training_data(config)
    log.info("training on %d generated anchors, %d used / %d not-used real images; %d held out",
             len(data.anchors), len(data.positives), len(data.negatives), len(data.val_images))
    save_json(config, out / "config.json")
    write_text_atomic(out / "split.json", json.dumps(data.split, indent=2))
    last: list[EpochEnd] = []
    result = fit(config, data, on_epoch=last.append)
    ckpt = last[-1].save(out / "checkpoint")
    detector = final_detector(result, data, config).save(out / "detector")
    write_reports(out, result, data)
    log.info("detector: %s (checkpoint %s)", detector, ckpt)
    return detector
