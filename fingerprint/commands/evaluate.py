"""`fingerprint evaluate`: metrics with bootstrap 95% intervals for a scores file against a labels file, and the
memorisation test (is there any evidence that the scores separate members from non-members?).

    fingerprint evaluate --scores runs/s1/test/scores.csv --labels data/sample/test_labels.csv \
        --groups data/sample/groups.csv --out runs/s1/eval

With ``--groups`` (``id,group``: the patient of each image, as the sample data's ``groups.csv``) the bootstrap
and the permutation test move whole groups; without it they move single images, which gives too narrow
intervals and too small p-values when neighbouring slices of one patient are among the images.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np

from fingerprint.config import ConfigError, Range, check_fields, flag, to_dict, validate
from fingerprint.evaluation import plots
from fingerprint.evaluation.memorisation import N_PERMUTATIONS, memorisation_test
from fingerprint.evaluation.metrics import bootstrap_ci, format_table, resampling_unit
from fingerprint.io import lookup_ids, read_csv, read_groups, read_labels, write_text_atomic
from fingerprint.report import write_audit

log = logging.getLogger(__name__)



@dataclass
class EvaluateConfig:
    scores: str = ""
    """CSV with columns id,score[,decision] (the scores.csv of `fingerprint predict`)."""
    labels: str = ""
    """CSV with columns id,label (1 = used for training, 0 = not used)."""
    groups: str = ""
    """CSV with columns id,group (the patient of each image, e.g. the sample data's groups.csv): the bootstrap and
    the memorisation test then resample / permute whole groups. Empty: single images, whose intervals are too
    narrow when neighbouring slices of one patient are among them."""
    out: str = "runs/evaluate"
    """Output folder for metrics.json, metrics.md and pictures."""
    threshold: float | None = None
    """Decide score >= threshold; None uses the scores file's decision column."""
    n_boot: Annotated[int, Range(10)] = 1000
    """Bootstrap resamples for the 95% intervals."""
    seed: int = 0
    """Seed of the bootstrap and of the memorisation test's permutations."""
    data: str = ""
    """The data folder that was scored: the audit report (report.html) then shows each image beside its nearest
    generated images. Empty: the report lists their ids and similarities only."""

    def problems(self) -> list[str]:
        out = check_fields(self)
        for name in ("scores", "labels"):
            value = getattr(self, name)
            if not value:
                out.append(f"{flag(name)}: required")
            elif not Path(value).is_file():
                out.append(f"{flag(name)}: '{value}' is not a file")
        if self.data and not Path(self.data).exists():
            out.append(f"{flag('data')}: '{self.data}' does not exist; give the folder that was scored or leave it "
                       "empty")
        if self.groups and not Path(self.groups).is_file():
            out.append(f"{flag('groups')}: '{self.groups}' is not a file (a CSV with columns id,group)")
        return out


def groups_of(path: str | Path, ids: list[str]) -> list[str]:
    """The group of each of ``ids`` from an ``id,group`` CSV (dev ids also match their plain file stem)."""
    try:
        found = lookup_ids(read_groups(path), ids)
    except ValueError as e:
        raise ConfigError([f"{flag('groups')}: {e}"]) from None
    missing = [i for i, g in zip(ids, found, strict=True) if g is None]
    if missing:
        raise ConfigError([f"{flag('groups')}: {path} has no group for {len(missing)} scored id(s), e.g. "
                           f"{missing[:3]}"])
    return found


def main(config: EvaluateConfig) -> dict[str, tuple[float, float, float]]:
    """Print and save every metric with its interval and the memorisation verdict; return {metric: (point, low,
    high)} (the verdict is in metrics.json/metrics.md)."""
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
    groups = groups_of(config.groups, [r["id"] for r in rows]) if config.groups else None
    ci = bootstrap_ci(y, s, decisions=dec, n_boot=config.n_boot, seed=config.seed, groups=groups)
    mem = memorisation_test(y, s, groups, n_permutations=N_PERMUTATIONS, seed=config.seed)
    out = Path(config.out)
    table = format_table([{"metric": k, "value [95% CI]": v} for k, v in ci.items()], ["metric", "value [95% CI]"])
    unit = resampling_unit(groups)
    notes = [f"95% bootstrap intervals ({config.n_boot} resamples); resampling unit: {unit}."]
    if groups is None:
        hint = Path(config.labels).parent / "groups.csv"
        notes.append("Intervals resample single images and are too narrow if neighbouring slices of one patient "
                     "are among them; give " + (f"{flag('groups')} {hint}" if hint.is_file() else
                                               f"{flag('groups')} (a CSV id,group)") + " to resample patients.")
    notes.append(f"Memorisation test ({mem.n_permutations} permutations of the labels among {mem.n_groups} "
                 f"{mem.unit}s, one-sided on the AUC): {mem.verdict}.")
    text = table + "\n" + "\n".join(notes) + "\n"
    write_text_atomic(out / "metrics.md", text)
    write_text_atomic(out / "metrics.json", json.dumps(
        {**{k: list(v) for k, v in ci.items()},
         "bootstrap": {"unit": "group" if groups is not None else "image", "description": unit,
                       "n_boot": config.n_boot},
         "memorisation": mem.to_dict()}, indent=2))
    plots.roc_plot({"scores": (y, s)}, out / "roc.png")
    plots.roc_plot({"scores": (y, s)}, out / "roc_log.png", log_fpr=True)
    plots.score_histogram(s, y, out / "histogram.png", threshold=config.threshold)
    plots.confusion_plot(y, dec, out / "confusion.png")
    write_audit(out, config.scores, config.data or None, labels=config.labels, groups=config.groups or None,
                threshold=config.threshold, command="fingerprint evaluate", config=to_dict(config),
                n_boot=config.n_boot, seed=config.seed, memorisation=mem)
    print(text, end="")
    return ci
