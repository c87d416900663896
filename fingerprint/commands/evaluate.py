"""`fingerprint evaluate`: metrics with bootstrap 95% intervals for a scores file against a labels file.

    fingerprint evaluate --scores runs/s1/test/scores.csv --labels labels.csv --out runs/s1/eval
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np

from fingerprint.config import ConfigError, Range, check_fields, flag, validate
from fingerprint.evaluation import plots
from fingerprint.evaluation.metrics import bootstrap_ci, format_table
from fingerprint.io import read_csv, write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    scores: str = ""
    """CSV with columns id,score[,decision] (the scores.csv of `fingerprint predict`)."""
    labels: str = ""
    """CSV with columns id,label (1 = used for training, 0 = not used)."""
    out: str = "runs/evaluate"
    """Output folder for metrics.json, metrics.md and pictures."""
    threshold: float | None = None
    """Decide score >= threshold; None uses the scores file's decision column."""
    n_boot: Annotated[int, Range(10)] = 1000
    """Bootstrap resamples for the 95% intervals."""
    seed: int = 0
    """Bootstrap seed."""

    def problems(self) -> list[str]:
        out = check_fields(self)
        for name in ("scores", "labels"):
            value = getattr(self, name)
            if not value:
                out.append(f"{flag(name)}: required")
            elif not Path(value).is_file():
                out.append(f"{flag(name)}: '{value}' is not a file")
        return out


def read_labels(path: str | Path) -> dict[str, int]:
    rows = read_csv(path, ("id", "label"))
    out = {}
    for n, r in enumerate(rows, start=2):
        if r["label"].strip() not in ("0", "1"):
            raise ValueError(f"{path}: line {n}: label must be 0 or 1, got {r['label']!r}")
        out[r["id"].strip()] = int(r["label"])
    return out


def main(config: EvaluateConfig) -> dict[str, tuple[float, float, float]]:
    """Print and save every metric with its interval; return {metric: (point, low, high)}."""
    validate(config)
    rows = read_csv(config.scores, ("id", "score"))
    labels = read_labels(config.labels)
    missing = [r["id"] for r in rows if r["id"] not in labels]
    if missing:
        raise ConfigError([f"{flag('labels')}: no label for {len(missing)} scored id(s), e.g. {missing[:3]}"])
    y = np.array([labels[r["id"]] for r in rows])
    s = np.array([float(r["score"]) for r in rows])
    if config.threshold is not None:
        dec = s >= config.threshold
    elif rows and "decision" in rows[0]:
        dec = np.array([int(r["decision"]) for r in rows]).astype(bool)
    else:
        raise ConfigError([f"{flag('threshold')}: the scores file has no decision column; give a threshold"])
    ci = bootstrap_ci(y, s, decisions=dec, n_boot=config.n_boot, seed=config.seed)
    out = Path(config.out)
    table = format_table([{"metric": k, "value [95% CI]": v} for k, v in ci.items()], ["metric", "value [95% CI]"])
    write_text_atomic(out / "metrics.md", table + "\n")
    write_text_atomic(out / "metrics.json", json.dumps({k: list(v) for k, v in ci.items()}, indent=2))
    plots.roc_plot({"scores": (y, s)}, out / "roc.png")
    plots.roc_plot({"scores": (y, s)}, out / "roc_log.png", log_fpr=True)
    plots.score_histogram(s, y, out / "histogram.png", threshold=config.threshold)
    plots.confusion_plot(y, dec, out / "confusion.png")
    print(table)
    return ci
