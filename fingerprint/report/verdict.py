"""The report's verdict: one sentence a data custodian can act on, with its uncertainty.

Two questions, answered in this order:

1. Do the scores separate the generator's training images (members) from other real images at all? The group
   permutation test of :mod:`fingerprint.evaluation.memorisation`; without evidence (p > 0.05) nothing else is
   claimed and per-image decisions are shown as what they are: not distinguishable from chance on these labels
   (which is not an all-clear either: the verdict gives the AUC the test would have detected on these labels).
2. How many training images would an attacker identify without accusing innocent ones? The true-positive rate
   at a 1% false-positive rate, with a group bootstrap interval (:func:`fingerprint.evaluation.metrics.bootstrap_ci`).

A detector whose signal is ``distribution`` measures how generated-like an image looks overall: its separation can
come from any difference between the training patients and the others, so it is never reported as memorisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from fingerprint.evaluation.memorisation import (
    ALPHA,
    N_PERMUTATIONS,
    MemorisationTest,
    format_p,
    memorisation_test,
    power_text,
)
from fingerprint.evaluation.metrics import bootstrap_ci, resampling_unit

Level = Literal["memorises", "separates", "population", "no_evidence", "no_labels"]

FALSE_ACCUSATION_RATE = 0.01
"""The operating point of the headline: at most 1% of non-members wrongly accused."""


@dataclass(frozen=True)
class Evidence:
    """What labelled scores say: every metric with its interval and the memorisation test."""

    metrics: dict[str, tuple[float, float, float]]
    """bootstrap_ci's {metric: (point, low, high)}; the threshold metrics are those of the given decisions."""
    memorisation: MemorisationTest
    n_members: int
    n_non_members: int
    unit: str
    """What the bootstrap resampled (resampling_unit's sentence)."""
    grouped: bool
    """True when whole groups (patients) were resampled and permuted, False for single images."""
    n_boot: int

    @property
    def false_positive_rate(self) -> tuple[float, float, float]:
        """(point, low, high) share of non-members the decisions accuse: 1 - specificity."""
        p, lo, hi = self.metrics["specificity"]
        return 1.0 - p, 1.0 - hi, 1.0 - lo


def assess(labels: ArrayLike, scores: ArrayLike, decisions: ArrayLike, groups: ArrayLike | None = None,
           n_boot: int = 1000, seed: int = 0, n_permutations: int = N_PERMUTATIONS,
           memorisation: MemorisationTest | None = None) -> Evidence:
    """Intervals and the memorisation test for labelled scores (labels 1 = member, 0 = non-member).

    ``groups`` (one patient id per image) makes the bootstrap and the permutations move whole patients: without
    them neighbouring slices count as independent evidence. A ``memorisation`` result already computed on the same
    scores (the harness's) is reused instead of run again.
    """
    y = np.asarray(labels)
    ci = bootstrap_ci(y, scores, decisions=decisions, n_boot=n_boot, seed=seed, groups=groups)
    mem = memorisation if memorisation is not None else memorisation_test(
        y, scores, groups, n_permutations=n_permutations, seed=seed)
    n_pos = int((y == 1).sum())
    return Evidence(ci, mem, n_pos, int(y.size - n_pos), resampling_unit(groups), groups is not None, n_boot)


@dataclass(frozen=True)
class Verdict:
    """The report's headline and what follows from it."""

    level: Level
    headline: str
    """One sentence with its uncertainty."""
    details: list[str] = field(default_factory=list)
    """Caveats and how the numbers were obtained, one sentence each."""
    findings: bool = False
    """Whether per-image decisions may be presented as findings (False: shown de-emphasised, with a warning)."""
    warning: str = ""
    """Shown above the per-image table when ``findings`` is False."""


def pct(value: float) -> str:
    """A rate as a whole percentage (62%); below 1% with one decimal, so 0.4% does not read as 0%."""
    if math.isnan(value):
        return "n/a"
    v = 100.0 * value
    return f"{v:.1f}%" if 0 < v < 1 else f"{v:.0f}%"


def pct_ci(triple: tuple[float, float, float]) -> str:
    """``62% [48%, 75%]``."""
    p, lo, hi = triple
    return f"{pct(p)} [{pct(lo)}, {pct(hi)}]"


def judge(evidence: Evidence | None, signal: str = "per_image", n_scored: int = 0) -> Verdict:
    """The verdict for ``evidence`` (None: no labels) from a detector with ``signal`` ('per_image',
    'distribution', or the harness's 'mixed (<members>)')."""
    if evidence is None:
        return Verdict(
            "no_labels",
            "No labels: a verdict needs labelled members and non-members (give an id,label CSV of the scored "
            "images); the scores below rank the images but prove nothing on their own.",
            details=[f"{n_scored} real images were scored. Without knowing which of them trained the generator, "
                     "neither the separation of members from non-members nor the rate of false accusations can "
                     "be measured."],
            findings=False,
            warning="No labels: these decisions are the detector's ranking at its threshold, not findings. Their "
                    "false-accusation rate is unknown.",
        )
    mem = evidence.memorisation
    p = format_p(mem.p_value)
    tpr = evidence.metrics["tpr_at_1fpr"]
    auc = evidence.metrics["auc"]
    over = "patients" if evidence.grouped else "images"
    details = [
        f"Memorisation test: labels permuted {mem.n_permutations} times among {mem.n_groups} {mem.unit}s "
        f"(one-sided on the AUC, AUC {auc[0]:.3f} [{auc[1]:.3f}, {auc[2]:.3f}], p = {p}).",
        f"Intervals: 95% bootstrap ({evidence.n_boot} resamples) over {evidence.unit}; "
        f"{evidence.n_members} member and {evidence.n_non_members} non-member images.",
    ]
    if not evidence.grouped:
        details.append("No patient groups were given: neighbouring slices of one patient count as independent "
                       "images, so the intervals are too narrow and p too small.")
    if "[only" in mem.verdict:
        # Few groups: the permutation test cannot reach a small p whatever the scores; say so beside the verdict.
        details.append(mem.verdict[mem.verdict.index("[only") + 1:].rstrip("]").capitalize() + ".")
    if evidence.n_non_members < 1 / FALSE_ACCUSATION_RATE:
        details.append(f"With {evidence.n_non_members} non-members, a 1% false-accusation rate allows no false "
                       "accusation at all.")
    if signal.startswith("mixed"):
        details.append(f"Signal {signal}: part of the score measures how generated-like an image looks overall "
                       "(a population difference), not closeness to particular generated images.")
    if not mem.evidence:
        power = power_text(mem.detectable_auc)
        return Verdict(
            "no_evidence",
            f"No evidence of memorisation (p = {p}): per-image decisions cannot be told from chance on these "
            f"labels; not an all-clear: {power}.",
            details=details, findings=False,
            warning=f"No evidence of memorisation (p = {p} > {ALPHA}): the decisions below cannot be told from chance "
                    f"on these labels and must not be read as accusations; nor does this clear the generator: "
                    f"{power}.")
    if signal == "distribution":
        return Verdict(
            "population",
            f"The scores separate the generator's training images from other real images as a population "
            f"(AUC {auc[0]:.2f} [{auc[1]:.2f}, {auc[2]:.2f}], p = {p}), but this detector measures a distribution "
            "signal: any difference between the training patients and the others raises it, so it is no evidence "
            "that single images were memorised.",
            details=details, findings=False,
            warning="Distribution signal: a high score says an image looks like the generator's output overall, "
                    "not that it was memorised; the decisions below are not accusations.")
    if tpr[0] <= 0.0:
        return Verdict(
            "separates",
            f"The scores separate training images from non-members (AUC {auc[0]:.2f} [{auc[1]:.2f}, "
            f"{auc[2]:.2f}], p = {p}), but at a 1% false-accusation rate an attacker identifies "
            f"{pct_ci(tpr)} of the training images: single accusations are unreliable.",
            details=details, findings=True)
    return Verdict(
        "memorises",
        f"The generator memorises its training images: at a 1% false-accusation rate an attacker identifies "
        f"{pct_ci(tpr)} of the training images (95% interval over {over}; memorisation test p = {p}).",
        details=details, findings=True)


def threshold_sentence(threshold: float | None, evidence: Evidence | None, how: str = "",
                       fitted: Mapping[str, Any] | None = None) -> str:
    """What the decision threshold means: the share of non-members (and members) it flags, with intervals;
    without labels, what it did to the detector's training not-used images (``fitted``: its false_positives)."""
    if threshold is None:
        head = "Decisions out of fold, from thresholds fitted on the training folds"
    else:
        head = f"Threshold {threshold:.4g}"
    if how:
        head += f" ({how})"
    if evidence is None:
        if fitted and threshold is not None:
            from fingerprint.evaluation.thresholds import as_false_positives

            return (f"{head}: these images have no labels; when the detector was fitted, "
                    f"{as_false_positives(fitted).sentence()}.")
        return head + ": its false-positive rate is unknown without labels."
    fpr = evidence.false_positive_rate
    rec = evidence.metrics["recall"]
    return (f"{head}: it flags {pct_ci(fpr)} of the non-members (false-positive rate) and {pct_ci(rec)} of the "
            "members (true-positive rate); 95% intervals over " + ("patients." if evidence.grouped else "images."))


def to_dict(v: Verdict, evidence: Evidence | None) -> dict[str, Any]:
    """The verdict and its numbers, for machines (report.json)."""
    out: dict[str, Any] = {"level": v.level, "headline": v.headline, "findings": v.findings}
    if evidence is not None:
        out["metrics"] = {k: list(t) for k, t in evidence.metrics.items()}
        out["memorisation"] = evidence.memorisation.to_dict()
        out["false_positive_rate"] = list(evidence.false_positive_rate)
    return out
