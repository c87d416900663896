"""`fingerprint report`: the audit report, one self-contained HTML file, from the scores of `fingerprint predict`.

    fingerprint report --scores runs/best/test --data data/sample --model runs/best --out runs/best/test/report.html

It leads with a verdict in one sentence with its uncertainty (with labels: the memorisation test, then how many
training images an attacker identifies at a 1% false-accusation rate; without labels it says that nothing can be
concluded), then the data, the threshold and what it implies, ROC curves and histograms, every image beside its
nearest generated images in a table that sorts and filters, and the provenance (configuration, detector, data
hashes, package versions). Pictures are inlined: the file opens offline and can be archived as it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fingerprint.config import Range, check_fields, flag, path_problems, to_dict, validate
from fingerprint.report import write_audit

log = logging.getLogger(__name__)


@dataclass
class ReportConfig:
    scores: str = ""
    """The --out folder of `fingerprint predict` (its scores.jsonl), or a scores.jsonl / scores.csv file."""
    data: str = ""
    """The data folder that was scored: thumbnails, counts and hashes come from it, and its test_labels.csv and
    groups.csv are used when --labels / --groups are not given. Empty: no thumbnails."""
    labels: str = ""
    """CSV id,label (1 = used to train the generator, 0 = not used) of the scored images; empty: <data>/
    test_labels.csv when present. Without labels the report says that no verdict is possible."""
    groups: str = ""
    """CSV id,group (the patient of each image); empty: <data>/groups.csv, else near-duplicate clusters. Intervals
    and the memorisation test then move whole patients."""
    model: str = ""
    """The detector that made the scores (its folder), for its name, settings and validation metrics; empty:
    the kind and signal recorded in scores.jsonl."""
    out: str = ""
    """The report file (.html) or a folder for report.html; empty: report.html beside the scores."""
    generator: str = ""
    """What made the generated images (model, version, training run), shown in the data summary."""
    threshold: float | None = None
    """Decide score >= threshold; None keeps the decisions in the scores file."""
    n_boot: Annotated[int, Range(10)] = 1000
    """Bootstrap resamples for the 95% intervals."""
    seed: int = 0
    """Seed of the bootstrap and of the memorisation test's permutations."""
    thumbnails: Annotated[int, Range(0)] = 100
    """Images (highest scores first) shown with thumbnails of themselves and their nearest generated images."""
    neighbours: Annotated[int, Range(0)] = 4
    """Nearest generated images shown per image."""

    def problems(self) -> list[str]:
        out = check_fields(self) + path_problems(self, "scores", "the --out folder of `fingerprint predict` or "
                                                 "its scores.jsonl")
        for name, what in (("data", "the data folder that was scored"), ("labels", "a CSV id,label"),
                           ("groups", "a CSV id,group"), ("model", "a saved detector folder")):
            if getattr(self, name) and not Path(getattr(self, name)).exists():
                out.append(f"{flag(name)}: '{getattr(self, name)}' does not exist; give {what} or leave it empty")
        return out


def main(config: ReportConfig) -> Path:
    """Write the report; return its path."""
    validate(config)
    scores = Path(config.scores)
    out = Path(config.out) if config.out else (scores if scores.is_dir() else scores.parent)
    path = write_audit(out, scores, config.data or None, labels=config.labels or None, groups=config.groups or None,
                       model=config.model or None, generator=config.generator, threshold=config.threshold,
                       command="fingerprint report", config=to_dict(config), n_boot=config.n_boot,
                       seed=config.seed, thumbnails=config.thumbnails, neighbours=config.neighbours)
    print(f"wrote {path}")
    return path
