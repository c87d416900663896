"""Membership scores: how close a real image sits to the generated images, and the evidence for it.

A real image's score is the reduced similarity to its k nearest generated images. With calibration, the same
statistic against the other real images is subtracted: a k-NN log density ratio in spirit (generated mass near
the image versus real mass near it), so images that are close to everything (plain, typical slices) are not
mistaken for members. That is the GAN-Leaks calibration idea, with the real pool as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fingerprint.config import ScoreConfig


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def topk_similarity(
    queries: np.ndarray, gallery: np.ndarray, k: int, exclude_self: bool = False, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine similarity (sims, indices), each (N, k), best first; batched as matrix products.

    With `exclude_self`, queries and gallery are the same set and each row ignores its own entry.
    """
    q, g = normalize(queries), normalize(gallery)
    k = min(k, g.shape[0] - (1 if exclude_self else 0))
    if k < 1:
        raise ValueError("the gallery must hold at least one image other than the query")
    sims_out = np.empty((q.shape[0], k), dtype=np.float32)
    idx_out = np.empty((q.shape[0], k), dtype=np.int64)
    for s in range(0, q.shape[0], chunk):
        sim = q[s : s + chunk] @ g.T
        if exclude_self:
            rows = np.arange(sim.shape[0])
            sim[rows, s + rows] = -np.inf
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        part_sims = np.take_along_axis(sim, part, axis=1)
        order = np.argsort(-part_sims, axis=1, kind="stable")
        idx_out[s : s + chunk] = np.take_along_axis(part, order, axis=1)
        sims_out[s : s + chunk] = np.take_along_axis(part_sims, order, axis=1)
    return sims_out, idx_out


def reduce(sims: np.ndarray, how: str) -> np.ndarray:
    if how == "mean":
        return sims.mean(axis=1)
    if how == "max":
        return sims.max(axis=1)
    if how == "median":
        return np.median(sims, axis=1)
    raise ValueError(f"--reduction: unknown reduction '{how}'; use mean, max or median")


@dataclass
class Scores:
    score: np.ndarray
    """Membership score per real image: higher = more likely in the generator's training set."""
    generated_similarity: np.ndarray
    """Reduced similarity to the k nearest generated images."""
    real_similarity: np.ndarray | None
    """Reduced similarity to the k nearest other real images (None without calibration)."""
    nearest: np.ndarray
    """(N, k) indices of the nearest generated images: the evidence."""
    nearest_similarity: np.ndarray
    """(N, k) their cosine similarities."""


def membership_scores(
    real: np.ndarray, generated: np.ndarray, config: ScoreConfig, reference: np.ndarray | None = None
) -> Scores:
    """Score each row of `real` (embeddings) against the `generated` gallery.

    `reference` is the real pool used for calibration; by default `real` itself (each image excluding itself).
    Pass a larger unlabelled pool when scoring few images.
    """
    sims, idx = topk_similarity(real, generated, config.k)
    gen = reduce(sims, config.reduction)
    if not config.calibrate:
        return Scores(gen, gen, None, idx, sims)
    if reference is None:
        ref_sims, _ = topk_similarity(real, real, config.k, exclude_self=True)
    else:
        ref_sims = _reference_similarity(real, reference, config.k)
    ref = reduce(ref_sims, config.reduction)
    return Scores(gen - ref, gen, ref, idx, sims)


def _reference_similarity(real: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    # A query that is itself in the reference pool would find itself at similarity 1; drop exact self-matches.
    sims, _ = topk_similarity(real, reference, k + 1)
    self_match = sims[:, :1] > 1.0 - 1e-6
    return np.where(self_match, sims[:, 1:], sims[:, :-1])
