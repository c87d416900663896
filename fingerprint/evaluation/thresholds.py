"""Decision thresholds: from labelled dev scores (max F1, target FPR) or without labels (real-to-real)."""

from __future__ import annotations

import numpy as np


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be 1-D of the same length")
    if not (np.any(labels == 1) and np.any(labels == 0)):
        raise ValueError("a threshold from labels needs both used (1) and not-used (0) images")
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
