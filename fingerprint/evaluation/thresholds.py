"""Decision thresholds: from labelled dev scores (max F1, target FPR) or without labels (real-to-real)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be 1-D of the same length")
    if not (np.any(labels == 1) and np.any(labels == 0)):
        raise ValueError("a threshold from labels needs both used (1) and not-used (0) images")
    if np.isnan(scores).any():
        raise ValueError(f"{int(np.isnan(scores).sum())} of {scores.size} scores are NaN: the detector failed on "
                         "those images; a threshold from them would be meaningless")
    return labels, scores


def threshold_max_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold t (decision: score >= t) that maximises F1 on these labelled scores.

    Returned halfway between the best score cut and the next lower distinct score: a midpoint generalises
    better to new images than a training score itself.
    """
    from sklearn.metrics import precision_recall_curve

    labels, scores = _check(labels, scores)
    precision, recall, cuts = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)[:-1]
    best = float(cuts[int(np.argmax(f1))])
    below = scores[scores < best]
    return (best + float(below.max())) / 2 if below.size else best - 1e-9


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray, candidates: np.ndarray) -> float:
    """The candidate threshold with the highest F1 on these labelled scores (first of equals)."""
    labels, scores = _check(labels, scores)
    dec = scores[None, :] >= np.asarray(candidates, dtype=np.float64)[:, None]
    tp = (dec & (labels == 1)).sum(1)
    fp = (dec & (labels == 0)).sum(1)
    fn = (~dec & (labels == 1)).sum(1)
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    return float(candidates[int(np.argmax(f1))])


def threshold_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """The lowest threshold whose false-positive rate on the not-used images is at most `fpr`."""
    labels, scores = _check(labels, scores)
    neg = np.sort(scores[labels == 0])[::-1]
    allowed = int(np.floor(fpr * neg.size + 1e-9))  # number of negatives allowed at or above t
    if allowed >= neg.size:
        return float(neg[-1])
    return float(np.nextafter(neg[allowed], np.inf))


def threshold_real_to_real(reference_scores: np.ndarray, quantile: float) -> float:
    """No labels: the `quantile` of scores that real images get against other real images.

    The best 2023 team's idea: a real image counts as used when it is closer to the generated images than real
    images typically are to each other.
    """
    ref = np.asarray(reference_scores, dtype=np.float64)
    if ref.size == 0:
        raise ValueError("real-to-real calibration needs reference scores from at least one real image")
    return float(np.quantile(ref, quantile))


FPR_CONFIDENCE = 0.95
"""Confidence of the false-positive bounds stored with every fitted detector."""


@dataclass
class FalsePositives:
    """How often a threshold flagged labelled not-used images, and what that shows about new ones."""

    threshold: float
    """The threshold this record is about; another threshold is not covered by it."""
    not_used: int
    """Labelled not-used images the threshold was checked on."""
    groups: int
    """Their pseudo-patient groups."""
    flagged: int
    """Not-used images scoring at or above the threshold."""
    flagged_groups: int
    """Groups with at least one flagged image."""
    rate: float
    """flagged / not_used: the observed false-positive rate."""
    bound: float
    """One-sided upper confidence bound on the false-positive rate for new not-used images drawn like these,
    scored against the same generated images. It counts groups, not images (a group is flagged when any of its
    images is), because neighbouring slices of one patient are not independent evidence: that bounds the rate
    averaged over patients, provided no patient is split across groups. It is never below the bound counting
    images, which guards the pooled rate when large groups are flagged (approximately: images of a group are not
    independent)."""
    confidence: float = FPR_CONFIDENCE
    """Confidence level of ``bound``."""
    in_sample: bool = False
    """True when the detector learnt from these very images (a kind that reads labels, with nothing held out):
    their scores are lower than new images' would be, so ``rate`` and ``bound`` are optimistic."""
    held_out: bool = False
    """True when these are the held-out validation images (not the ones the threshold was set on)."""

    def sentence(self) -> str:
        which = "held-out labelled not-used images" if self.held_out else "labelled not-used images"
        caveat = (" (optimistic: the detector learnt from those images, so new ones score higher)"
                  if self.in_sample else "")
        return (f"threshold {self.threshold:.4g} flagged {self.flagged} of {self.not_used} {which} "
                f"({self.rate:.1%}; {self.flagged_groups} of {self.groups} pseudo-patient groups), so with "
                f"{self.confidence:.0%} confidence its false-positive rate on new not-used images like those is at "
                f"most {self.bound:.1%}{caveat}")


def as_false_positives(value: FalsePositives | Mapping[str, Any]) -> FalsePositives:
    """A :class:`FalsePositives` from itself or from its JSON form (meta.json, a registry tag, an API reply)."""
    from fingerprint.config import from_dict

    return value if isinstance(value, FalsePositives) else from_dict(FalsePositives, dict(value))


def fpr_upper_bound(flagged: int | np.ndarray, total: int, confidence: float = FPR_CONFIDENCE) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound on a rate with ``flagged`` of ``total`` (1.0 when all are flagged).

    The Beta quantile scipy's ``binomtest(alternative='less').proportion_ci`` computes, vectorised over
    ``flagged`` because the bounded threshold scans every count.
    """
    from scipy.stats import beta

    k = np.asarray(flagged, dtype=np.float64)
    return np.where(k >= total, 1.0, beta.ppf(confidence, k + 1, np.maximum(total - k, 1)))


def _group_maxima(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Per not-used group, its highest score (each image its own group when ``groups`` is None)."""
    neg = labels == 0
    s = scores[neg]
    if groups is None:
        return s
    g = np.asarray(groups)
    if g.shape != labels.shape:
        raise ValueError(f"groups {g.shape} must match labels {labels.shape}")
    _, inv = np.unique(g[neg], return_inverse=True)
    out = np.full(inv.max() + 1, -np.inf)
    np.maximum.at(out, inv, s)
    return out


def _bound(flagged: np.ndarray, n: int, flagged_groups: np.ndarray, g: int, confidence: float) -> np.ndarray:
    # Counting groups guards against correlated slices; counting images guards against one large flagged group
    # (a random new image is more likely to come from a large group). The larger bound covers both.
    return np.maximum(fpr_upper_bound(flagged_groups, g, confidence), fpr_upper_bound(flagged, n, confidence))


def false_positives(labels: np.ndarray, scores: np.ndarray, threshold: float, groups: np.ndarray | None = None,
                    confidence: float = FPR_CONFIDENCE, **facts: bool) -> FalsePositives:
    """What ``threshold`` (decision: score >= threshold) does to the labelled not-used images, with its bound;
    ``facts``: ``in_sample``, ``held_out``."""
    labels, scores = _check(labels, scores)
    gmax = _group_maxima(labels, scores, groups)
    flagged, fg = int((scores[labels == 0] >= threshold).sum()), int((gmax >= threshold).sum())
    n = int((labels == 0).sum())
    return FalsePositives(threshold=float(threshold), not_used=n, groups=len(gmax), flagged=flagged,
                          flagged_groups=fg, rate=flagged / n,
                          bound=float(_bound(np.array(flagged), n, np.array(fg), len(gmax), confidence)),
                          confidence=confidence, **facts)


def groups_needed(target_fpr: float, confidence: float = FPR_CONFIDENCE) -> int:
    """Fewest not-used groups that can bound the false-positive rate by ``target_fpr`` (none of them flagged)."""
    if not 0 < target_fpr < 1:
        raise ValueError(f"--target-fpr: must be in (0, 1) (got {target_fpr})")
    # Zero flagged of n bounds the rate by 1 - (1 - confidence)^(1/n).
    return int(np.ceil(np.log(1 - confidence) / np.log(1 - target_fpr) - 1e-9))


def require_groups_for_bound(labels: np.ndarray, groups: np.ndarray | None, target_fpr: float,
                             confidence: float = FPR_CONFIDENCE) -> None:
    """Raise the ``fpr_bound`` refusal before any work when these labels have too few not-used groups for it."""
    labels = np.asarray(labels)
    neg = labels == 0
    n = int(neg.sum())
    g = n if groups is None else len(np.unique(np.asarray(groups)[neg]))
    need = groups_needed(target_fpr, confidence)
    if g < need:
        raise ValueError(
            f"--threshold-method fpr_bound: {n} labelled not-used images in {g} pseudo-patient groups cannot show "
            f"a false-positive rate of at most {target_fpr:.2g} with {confidence:.0%} confidence even if none is "
            f"flagged; that needs at least {need} groups. Label more not-used images, raise --target-fpr, or use "
            "--threshold-method fpr (which sets the observed rate only)")


def threshold_at_fpr_bound(labels: np.ndarray, scores: np.ndarray, target_fpr: float,
                           groups: np.ndarray | None = None, confidence: float = FPR_CONFIDENCE) -> float:
    """The lowest threshold whose upper confidence bound on the false-positive rate is at most ``target_fpr``.

    Stricter than :func:`threshold_at_fpr`, which sets the observed rate: a small set of not-used images
    cannot show that a rate is low, so this refuses (``ValueError``) when even flagging none would not.
    """
    labels, scores = _check(labels, scores)
    require_groups_for_bound(labels, groups, target_fpr, confidence)
    neg = np.sort(scores[labels == 0])
    gmax = np.sort(_group_maxima(labels, scores, groups))
    # Candidates: just above each not-used score, highest first (the first flags none).
    cuts = np.nextafter(np.unique(neg)[::-1], np.inf)
    flagged = neg.size - np.searchsorted(neg, cuts, side="left")
    flagged_groups = gmax.size - np.searchsorted(gmax, cuts, side="left")
    ok = _bound(flagged, neg.size, flagged_groups, gmax.size, confidence) <= target_fpr
    if not ok[0]:  # only at the rounding edge of groups_needed
        raise ValueError(f"--threshold-method fpr_bound: {gmax.size} not-used groups cannot show {target_fpr:.2g}; "
                         "raise --target-fpr or label more not-used images")
    return float(cuts[int(np.flatnonzero(ok).max())])  # valid cuts are a prefix: the bound falls as t rises
