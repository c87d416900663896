"""k-NN scoring, calibration and thresholds against direct computations."""

import numpy as np
import pytest

from fingerprint.config import ScoreConfig
from fingerprint.metrics import binary_metrics, roc_auc
from fingerprint.scoring import membership_scores, topk_similarity
from fingerprint.thresholds import threshold_at_fpr, threshold_max_f1, threshold_real_to_real


def _unit(rng, n, d=8):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_topk_is_exact(k):
    rng = np.random.default_rng(k)
    q, g = _unit(rng, 13), _unit(rng, 40)
    sims, idx = topk_similarity(q, g, k, chunk=4)  # small chunks exercise the batching
    full = q @ g.T
    for i in range(len(q)):
        order = np.argsort(-full[i])[:k]
        assert np.allclose(sims[i], full[i][order], atol=1e-6)
        assert set(idx[i]) == set(order)


def test_topk_exclude_self_never_returns_self():
    rng = np.random.default_rng(0)
    x = _unit(rng, 20)
    _, idx = topk_similarity(x, x, 5, exclude_self=True)
    assert all(i not in row for i, row in enumerate(idx))


def test_calibration_subtracts_real_neighbour_similarity():
    rng = np.random.default_rng(1)
    real, gen = _unit(rng, 30), _unit(rng, 50)
    cfg = ScoreConfig(k=3, reduction="mean", calibrate=True)
    s = membership_scores(real, gen, cfg)
    full_g, full_r = real @ gen.T, real @ real.T
    np.fill_diagonal(full_r, -np.inf)
    g = np.sort(full_g, axis=1)[:, ::-1][:, :3].mean(1)
    r = np.sort(full_r, axis=1)[:, ::-1][:, :3].mean(1)
    assert np.allclose(s.score, g - r, atol=1e-5)
    # A larger reference pool that contains the queries: each query must not match itself.
    pool = np.concatenate([real, _unit(rng, 10)])
    s2 = membership_scores(real, gen, cfg, reference=pool)
    full_p = real @ pool.T
    full_p[np.arange(30), np.arange(30)] = -np.inf
    r2 = np.sort(full_p, axis=1)[:, ::-1][:, :3].mean(1)
    assert np.allclose(s2.score, g - r2, atol=1e-5)


def test_members_near_generated_copies_score_higher():
    rng = np.random.default_rng(2)
    members, others = _unit(rng, 20), _unit(rng, 20)
    gen = np.concatenate([members + 0.05 * rng.normal(size=members.shape), _unit(rng, 30)])
    real = np.concatenate([members, others])
    raw = membership_scores(real, gen, ScoreConfig(k=1, calibrate=False))
    assert raw.score[:20].min() > raw.score[20:].max()
    calibrated = membership_scores(real, gen, ScoreConfig(k=1, calibrate=True))
    assert roc_auc(np.r_[np.ones(20), np.zeros(20)], calibrated.score) > 0.95


def test_thresholds():
    rng = np.random.default_rng(3)
    labels = np.r_[np.ones(50, int), np.zeros(50, int)]
    scores = np.r_[rng.normal(1, 1, 50), rng.normal(0, 1, 50)]
    t = threshold_max_f1(labels, scores)
    best = binary_metrics(labels, scores >= t)["f1"]
    for c in np.unique(scores):
        assert binary_metrics(labels, scores >= c)["f1"] <= best + 1e-12
    for fpr in (0.0, 0.05, 0.2):
        t = threshold_at_fpr(labels, scores, fpr)
        assert (scores[labels == 0] >= t).mean() <= fpr + 1e-12
    assert threshold_real_to_real(np.arange(11.0), 0.5) == 5.0
    with pytest.raises(ValueError, match="both used"):
        threshold_max_f1(np.ones(4, int), np.arange(4.0))
