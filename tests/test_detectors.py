"""Detectors of the benchmark harness: SSIM against a direct implementation, features, and that unsupervised
detectors never read labels. Tiny data from the phantom sample benchmark; no downloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from fingerprint import detectors as det
from fingerprint.benchmark import BenchmarkConfig, load_pool
from fingerprint.phantoms import make_sample_dataset


def _ssim_direct(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. SSIM with a full-image Gaussian filter (11 taps, sigma 1.5), then the valid region's mean."""

    def f(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, 1.5, truncate=3.5, mode="reflect")  # radius 5 = 11 taps

    c1, c2 = 0.01**2, 0.03**2
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s[5:-5, 5:-5].mean())


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> det.Pool:
    root = tmp_path_factory.mktemp("det") / "bench"
    make_sample_dataset(root, n_patients=12, slices_per_patient=3, size=32, n_generated_dev=30,
                        n_generated_test=30, n_reference_patients=6, memorisation=0.95, seed=1)
    return load_pool(BenchmarkConfig(data=str(root), image_size=32)).pool


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    d = s[y == 1][:, None] - s[y == 0][None, :]
    return float((d > 0).mean() + 0.5 * (d == 0).mean())


def test_ssim_matrix_matches_direct_formula() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((3, 24, 24))
    b = np.concatenate([np.clip(a[:2] + rng.normal(0, 0.1, (2, 24, 24)), 0, 1), rng.random((2, 24, 24))])
    got = det.ssim_matrix(a, b, block_pairs=3)  # odd blocks exercise the chunk edges
    want = np.array([[_ssim_direct(x, y) for y in b] for x in a])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.shape == (3, 4) and got.dtype == np.float32
    np.testing.assert_allclose(np.diag(det.ssim_matrix(a, a)), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="window"):
        det.ssim_matrix(a[:, :8, :8], b[:, :8, :8])


def test_features_are_ncc_and_area_means() -> None:
    rng = np.random.default_rng(1)
    x = rng.random((4, 16, 16))
    np.testing.assert_allclose(det.area_resize(x, 8), x.reshape(4, 8, 2, 8, 2).mean(axis=(2, 4)))
    f = det.gradient_features(x, 16)
    assert f.shape == (4, 2 * 16 * 16)
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0)
    # Brightness and contrast changes do not move a normalised cross-correlation.
    np.testing.assert_allclose(det.gradient_features(0.5 * x + 0.2, 16), f, atol=1e-12)
    s = rng.random((5, 9))
    np.testing.assert_allclose(det.topk_mean(s, 3), np.sort(s, axis=1)[:, -3:].mean(axis=1))
    np.testing.assert_allclose(det.topk_mean(s, 1), s.max(axis=1))


def test_pixel_nn_finds_a_copy(pool: det.Pool) -> None:
    copy = det.Pool(generated=np.concatenate([pool.generated, pool.real[:1]]), real=pool.real,
                    labels=pool.labels, groups=pool.groups,
                    generated_source=np.r_[pool.generated_source, 1], real_ids=pool.real_ids,
                    generated_ids=[*pool.generated_ids, "copy"])
    ncc = det.PixelNN("ncc").score(copy)
    l2 = det.PixelNN("l2").score(copy)
    assert ncc[0] == pytest.approx(1.0) and np.argmax(ncc) == 0
    assert l2[0] == pytest.approx(0.0, abs=1e-6) and np.argmax(l2) == 0
    with pytest.raises(ValueError, match="metric"):
        det.PixelNN("cosine")


def test_unsupervised_detectors_ignore_labels(pool: det.Pool) -> None:
    shuffled = det.Pool(generated=pool.generated, real=pool.real, labels=np.random.default_rng(0).permutation(
        pool.labels), groups=pool.groups, generated_source=pool.generated_source, real_ids=pool.real_ids,
        generated_ids=pool.generated_ids)
    for d in (det.PixelNN("ncc"), det.GradientNN(size=32), det.DomainClassifier(size=16, folds=4),
              det.RankEnsemble([det.GradientNN(size=32), det.DomainClassifier(size=16, folds=4)])):
        assert not d.needs_labels
        s = d.score(pool)
        assert s.shape == (len(pool.real),) and np.all(np.isfinite(s))
        np.testing.assert_array_equal(s, d.score(shuffled))


def test_selected_ensemble_picks_the_best_subset_on_training_labels(pool: det.Pool) -> None:
    members = [det.PixelNN("ncc"), det.GradientNN(size=32), det.DomainClassifier(size=16, folds=4)]
    best = det.SelectedEnsemble(members)
    assert best.needs_labels and not best.costly
    with pytest.raises(ValueError, match="training indices"):
        best.score(pool)
    lab = pool.labelled
    train = lab[::2]
    s = best.score(pool, train)
    ranks = {m.name: det.RankEnsemble([m]).score(pool) for m in members}
    aucs = {c: _auc(pool.labels[train], np.mean([ranks[n] for n in c], axis=0)[train]) for c in best.subsets()}
    assert len(aucs) == 7 and best.chosen[-1] in aucs
    assert aucs[best.chosen[-1]] == max(aucs.values())
    np.testing.assert_allclose(s, np.mean([ranks[n] for n in best.chosen[-1]], axis=0))
    # The phantom generator memorises strongly (0.95): the chosen scores must see it on the other images.
    held = lab[1::2]
    assert _auc(pool.labels[held], s[held]) > 0.7
    with pytest.raises(ValueError, match="unsupervised"):
        det.SelectedEnsemble([best])


def test_ssim_threshold_is_a_real_to_real_quantile(pool: det.Pool) -> None:
    d = det.SSIMNN(quantiles=(0.25, 0.5, 0.75))
    with pytest.raises(RuntimeError, match="score"):
        d.threshold(pool, np.zeros(len(pool.real)), pool.labelled)
    s = d.score(pool)
    assert d.reference is not None and d.reference.shape == s.shape
    t = d.threshold(pool, s, pool.labelled)
    assert t in [float(np.quantile(d.reference, q)) for q in (0.25, 0.5, 0.75)]


def test_neural_detectors_run_offline(pool: det.Pool) -> None:
    frozen = det.FrozenNN("resnet18", "none", image_size=32, device="cpu")
    s = frozen.score(pool)
    assert s.shape == (len(pool.real),) and np.all(np.abs(s) <= 1 + 1e-6)
    settings = det.TripletSettings(image_size=32, embed_dim=8, epochs=1, triplets_per_epoch=8, batch_size=4,
                                   device="cpu")
    trip = det.TripletNN("resnet18", "none", settings)
    assert trip.needs_labels
    with pytest.raises(ValueError, match="training indices"):
        trip.score(pool)
    train = pool.labelled[::2]
    s = trip.score(pool, train)
    assert s.shape == (len(pool.real),) and np.all(np.isfinite(s))
    assert det.weights_file(Path("/nonexistent"), "resnet18") is None


@pytest.mark.parametrize("subspace", [False, True])
def test_generated_mass_matches_brute_force(pool: det.Pool, subspace: bool) -> None:
    d = det.GeneratedMass(k=3, subspace=subspace, variance=0.9)
    got = d.score(pool)
    q = pool.real.reshape(len(pool.real), -1).astype(np.float64)
    g = pool.generated.reshape(len(pool.generated), -1).astype(np.float64)
    if subspace:
        mu = g.mean(0)
        _, sv, vt = np.linalg.svd(g - mu, full_matrices=False)
        m = int(np.argmax(np.cumsum(sv**2) / np.sum(sv**2) >= 0.9)) + 1
        q, g = (q - mu) @ vt[:m].T, (g - mu) @ vt[:m].T
    for i in range(len(q)):
        dist = np.sort(((g - q[i]) ** 2).sum(1))[:3]
        assert got[i] == pytest.approx(-dist.mean(), rel=1e-6, abs=1e-9)
    # Memorising sample data: members have more generated mass nearby.
    lab = pool.labelled
    assert _auc(pool.labels[lab], got[lab]) > 0.8
