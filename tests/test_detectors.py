"""The detector protocol (fingerprint.detectors): every registered kind fits, scores, saves and loads; the k-NN kinds
against brute force; the domain classifier's cross-fitting; the ensembles' ranks and what they read; and the
errors for unknown kinds and bad settings. Tiny phantom data (the shared ``sample_bench``), no downloads."""

from __future__ import annotations

import dataclasses
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression

from fingerprint.config import ConfigError
from fingerprint.data.imagesets import load_fit_data
from fingerprint.detectors import (
    PRESETS,
    FitData,
    create_detector,
    fit_detector,
    kinds,
    load_detector,
)
from fingerprint.evaluation.metrics import roc_auc
from fingerprint.features.handcrafted import gradient_features, images_to_array, ssim_matrix

NET = {"backbone": "resnet18", "weights": "none", "image_size": 32, "device": "cpu"}
SMALL: dict[str, dict] = {
    "pixel": {"image_size": 32, "metric": "l2", "k": 3},
    "gradient": {"image_size": 32, "feature_size": 16, "k": 3},
    "subspace": {"image_size": 32, "variance": 0.9, "k": 3},
    "domain": {"image_size": 32, "feature_size": 16, "folds": 3, "k": 2},
    "ssim": {"image_size": 32, "quantiles": 5},
    "frozen": dict(NET),
    "triplet": {**NET, "embed_dim": 8, "epochs": 1, "triplets_per_epoch": 8, "train_batch_size": 4, "k": 3},
    "rank_ensemble": {"members": "pixel_ncc,gradient_nn"},
    "selected_ensemble": {"members": "pixel_ncc,pixel_mass,gradient_nn"},
    "shadow": {"features": "pixel_ncc", "image_size": 32, "k": 2, "family": "ae_gmm", "generator_size": 16,
               "generator_settings": '{"steps": 5, "width": 4, "latent_dim": 4, "components": 2}', "samples": 24},
}
"""Small settings per kind; a kind registered later is fitted with its defaults."""


@pytest.fixture(scope="module")
def data(sample_bench: Path) -> FitData:
    return load_fit_data(sample_bench, val_fraction=0.3, seed=0)


def _relabel(data: FitData, rows: np.ndarray, labels: np.ndarray) -> FitData:
    new = data.labels.copy()
    new[rows] = labels
    return dataclasses.replace(data, labels=new)


@pytest.mark.parametrize("name", sorted(kinds()))
def test_every_kind_fits_scores_and_round_trips(name: str, data: FitData, tmp_path: Path) -> None:
    torch.manual_seed(0)  # network kinds with weights 'none' start from random weights
    d = fit_detector(name, SMALL.get(name, {}), data)
    assert d.kind == name and d.name == name and np.isfinite(d.threshold)
    assert d.meta.split["val"] == [data.real_ids[i] for i in data.val]
    assert 0.0 <= d.meta.metrics["val_auc"] <= 1.0
    n, g = len(data.real), len(data.generated)
    s = d.score(data.real, data.real_ids)
    assert s.score.shape == (n,) and s.score.dtype == np.float64 and np.all(np.isfinite(s.score))
    assert s.nearest.shape == s.nearest_similarity.shape and s.nearest.shape[0] == n
    assert s.nearest.min() >= 0 and s.nearest.max() < g
    assert np.all(np.diff(s.nearest_similarity, axis=1) <= 1e-6)  # most similar first
    assert len(d.gallery_ids) == g and d.reference_ids == data.real_ids
    # Images without ids (an upload) are scored too.
    assert d.score(data.real[:2]).score.shape == (2,)

    loaded = load_detector(d.save(tmp_path / name))
    assert loaded.kind == name and loaded.meta.settings == d.meta.settings and loaded.threshold == d.threshold
    assert loaded.gallery_ids == d.gallery_ids and loaded.reference_ids == d.reference_ids
    s2 = loaded.score(data.real, data.real_ids)
    np.testing.assert_allclose(s2.score, s.score, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(s2.nearest, s.nearest)
    np.testing.assert_array_equal(loaded.decide(s2), d.decide(s))

    if not d.learns:
        # Label-free kinds never read labels: shuffled labels give the same scores.
        lab = np.concatenate([data.train, data.val])
        shuffled = _relabel(data, lab, np.random.default_rng(0).permutation(data.labels[lab]))
        again = create_detector(name, SMALL.get(name, {}))
        torch.manual_seed(0)
        again.fit(shuffled)
        np.testing.assert_allclose(again.score(data.real, data.real_ids).score, s.score, rtol=0, atol=1e-6)


def test_pixel_and_gradient_scores_equal_brute_force(data: FitData) -> None:
    q = images_to_array(data.real, 32).reshape(len(data.real), -1).astype(np.float64)
    g = images_to_array(data.generated, 32).reshape(len(data.generated), -1).astype(np.float64)

    def ncc(x: np.ndarray) -> np.ndarray:
        x = x - x.mean(axis=1, keepdims=True)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    grad_q = gradient_features(q.reshape(-1, 32, 32), 16)
    grad_g = gradient_features(g.reshape(-1, 32, 32), 16)
    cases = [
        ("pixel", {"image_size": 32, "metric": "l2", "k": 3}, -((q[:, None] - g[None]) ** 2).sum(-1)),
        ("pixel", {"image_size": 32, "metric": "ncc", "k": 2}, ncc(q) @ ncc(g).T),
        ("gradient", {"image_size": 32, "feature_size": 16, "k": 4}, grad_q @ grad_g.T),
    ]
    for name, settings, sim in cases:
        d = create_detector(name, settings)
        d.fit(data)
        s = d.score(data.real, data.real_ids)
        order = np.argsort(-sim, axis=1, kind="stable")[:, : settings["k"]]
        top = np.take_along_axis(sim, order, axis=1)
        np.testing.assert_allclose(s.score, top.mean(axis=1), rtol=1e-4, atol=1e-4, err_msg=str(settings))
        np.testing.assert_allclose(s.nearest_similarity, top, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(s.nearest, order)


def test_domain_classifier_scores_with_the_fold_model_that_did_not_see_the_group(data: FitData) -> None:
    d = create_detector("domain", {"image_size": 32, "feature_size": 16, "folds": 3, "c": 0.05})
    d.fit(data)
    fold = d.reference_fold
    # Whole groups share a fold, so no model saw a near-duplicate of an image it scores.
    for grp in np.unique(data.groups):
        assert len(np.unique(fold[data.groups == grp])) == 1
    xg = d.features(data.generated).astype(np.float64)
    xr = d.features(data.real).astype(np.float64)

    def refit(f: int) -> LogisticRegression:
        keep = fold != f
        x = np.concatenate([xg, xr[keep]])
        t = np.r_[np.ones(len(xg)), np.zeros(int(keep.sum()))]
        return LogisticRegression(C=0.05, max_iter=3000, class_weight="balanced").fit(x, t)

    models = {f: refit(f) for f in np.unique(fold)}
    s = d.score(data.real, data.real_ids).score
    want = np.array([models[fold[i]].decision_function(xr[i : i + 1])[0] for i in range(len(xr))])
    np.testing.assert_allclose(s, want, rtol=1e-5, atol=1e-5)
    # Without its id an image is scored by the mean of the fold models (a fold without images keeps its model).
    no_id = d.score(data.real).score
    mean = np.mean([models[f].decision_function(xr) if f in models else xr @ d.coef[f] + d.intercept[f]
                    for f in range(3)], axis=0)
    np.testing.assert_allclose(no_id, mean, rtol=1e-5, atol=1e-5)
    assert d.signal == "distribution" and d.meta.signal == "distribution"


def test_rank_ensemble_ranks_and_reuses_prefitted_members(data: FitData) -> None:
    kind_name, settings = PRESETS["gradient_nn"]
    pre = create_detector(kind_name, settings)
    pre.meta.extra["name"] = "gradient_nn"
    pre.fit(data)
    ens = create_detector("rank_ensemble", {"members": "pixel_l2,gradient_nn"})
    ens.prefitted = {"gradient_nn": pre}
    ens.fit(data)
    assert ens.members[1] is pre and ens.members[0].name == "pixel_l2"
    s = ens.score(data.real, data.real_ids).score
    member = [m.score(data.real, data.real_ids).score for m in ens.members]
    want = np.mean([rankdata(m) / len(m) for m in member], axis=0)
    np.testing.assert_allclose(s, want, rtol=0, atol=1e-12)
    # A member fitted on other images is not reused.
    fewer = FitData(data.generated, data.generated_ids, data.real[:-1], data.real_ids[:-1], data.labels[:-1],
                    data.groups[:-1], train=data.train)
    other = create_detector("rank_ensemble", {"members": "gradient_nn"})
    other.prefitted = {"gradient_nn": pre}
    other.fit(fewer)
    assert other.members[0] is not pre


def test_selected_ensemble_reads_only_training_labels(data: FitData) -> None:
    settings = {"members": "pixel_ncc,pixel_mass,gradient_nn"}
    a = create_detector("selected_ensemble", settings)
    assert a.learns and not a.costly
    a.fit(data)
    # It chose the subset with the best rank-average AUC on the training images.
    ranks = np.array([rankdata(m.score(data.real, data.real_ids).score) / len(data.real) for m in a.members])
    y = data.labels[data.train]
    subsets = [c for r in range(3, 0, -1) for c in combinations(range(3), r)]
    aucs = {c: roc_auc(y, ranks[list(c)][:, data.train].mean(axis=0)) for c in subsets}
    assert aucs[a.chosen] == max(aucs.values())
    # Other labels of the validation and unlabelled images change nothing.
    unknown = np.flatnonzero(data.labels < 0)
    changed = _relabel(_relabel(data, data.val, 1 - data.labels[data.val]), unknown,
                       np.random.default_rng(0).integers(0, 2, len(unknown)))
    b = create_detector("selected_ensemble", settings)
    b.prefitted = {m.name: m for m in a.members}
    b.fit(changed)
    assert b.chosen == a.chosen and b.meta.extra["chosen"] == a.meta.extra["chosen"]
    np.testing.assert_array_equal(b.score(data.real, data.real_ids).score, a.score(data.real, data.real_ids).score)
    with pytest.raises(ConfigError, match="learns"):
        create_detector("rank_ensemble", {"members": "best"}).fit(data)


def test_unknown_kinds_and_bad_settings_name_the_problem(data: FitData) -> None:
    with pytest.raises(ConfigError) as e:
        fit_detector("no_such_kind", {}, data)
    assert "no_such_kind" in str(e.value) and all(k in str(e.value) for k in kinds())
    for name, settings, expected in [
        ("pixel", {"k": 0}, r"pixel: --k\b"),
        ("pixel", {"metric": "cosine"}, r"pixel: --metric\b"),
        ("gradient", {"kk": 3}, "kk"),
        ("domain", {"c": -1.0}, r"domain: --c\b"),
        ("triplet", {"mining": "hardest"}, r"triplet: --mining\b"),
        ("rank_ensemble", {"members": "pixel_ncc,nope"}, "nope"),
        ("rank_ensemble", {"member_settings": "[1]"}, "--member-settings: a JSON object"),
        ("rank_ensemble", {"member_settings": '{"ssim": {"k": 2}}'}, "--member-settings: ssim not among"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            create_detector(name, settings)


def test_calibration_subtracts_the_nearest_real_images_of_other_patients(data: FitData) -> None:
    """Brute force: the real side is the mean of the k best similarities to reference images of other groups."""
    d = create_detector("calibrated", {"features": "pixel_ncc", "k": 3, "image_size": 32})
    d.fit(data)
    s = d.score(data.real, data.real_ids)
    f = d.inner.features(data.real)
    sim = f @ f.T  # NCC rows are unit vectors: cosine = dot product
    groups = np.asarray(data.groups)
    expected = [np.sort(sim[i][groups != groups[i]])[::-1][:3].mean() for i in range(len(f))]
    np.testing.assert_allclose(s.real_similarity, expected, atol=1e-5)
    np.testing.assert_allclose(s.score, s.generated_similarity - s.real_similarity, atol=1e-12)
    # An image from outside the pool (no id) is compared with every reference image.
    alone = d.score(data.real[:1]).real_similarity[0]
    assert alone == pytest.approx(np.sort(sim[0])[::-1][:3].mean(), abs=1e-5)


def test_ssim_calibration_subtracts_the_best_ssim_with_other_patients(data: FitData, tmp_path: Path) -> None:
    """SSIM has no embedding: the calibrated kind searches the reference pool by SSIM itself (brute force here)."""
    d = create_detector("calibrated", {"features": "ssim", "k": 1, "image_size": 32})
    d.fit(data)
    s = d.score(data.real, data.real_ids)
    px = d.inner.features(data.real)
    rr = ssim_matrix(px, px)
    groups = np.asarray(data.groups)
    expected = [rr[i][groups != groups[i]].max() for i in range(len(px))]
    np.testing.assert_allclose(s.real_similarity, expected, atol=1e-5)
    gen = ssim_matrix(px, d.inner.features(data.generated)).max(axis=1)
    np.testing.assert_allclose(s.generated_similarity, gen, atol=1e-5)
    np.testing.assert_allclose(s.score, gen - np.asarray(expected), atol=1e-5)
    # Saved and loaded, it scores the same.
    back = load_detector(d.save(tmp_path / "ssim_cal"))
    np.testing.assert_allclose(back.score(data.real, data.real_ids).score, s.score, atol=1e-6)


@pytest.mark.parametrize("name", ["pixel_ncc", "subspace_mass", "gradient_nn", "domain_clf", "ssim", "ab_rank",
                                  "gradient_cal", "ssim_cal", "cal_ensemble"])
def test_an_image_scores_the_same_alone_as_in_a_batch(name: str, data: FitData) -> None:
    kind_name, settings = PRESETS[name]
    d = create_detector(kind_name, {**settings, **({"image_size": 32} if "members" not in settings else {})})
    d.fit(data)
    together = d.score(data.real, data.real_ids).score
    alone = np.array([d.score(data.real[i : i + 1], data.real_ids[i : i + 1]).score[0] for i in (0, 5, 30)])
    x = np.random.default_rng(0).random((3, 8, 8))
    per_image = np.concatenate([gradient_features(x[i : i + 1], 8) for i in range(3)])
    np.testing.assert_allclose(gradient_features(x, 8), per_image, atol=1e-12)
    np.testing.assert_allclose(alone, together[[0, 5, 30]], rtol=1e-5, atol=1e-6)


def test_shadow_calibration_subtracts_the_shadows_that_never_saw_the_image(data: FitData, tmp_path: Path) -> None:
    """Brute force: shadows come in complementary halves of whole groups, and each image's baseline is its mean
    similarity to the samples of the shadows that left it out (all of them for an image from outside the pool)."""
    from fingerprint.detectors.shadow import shadow_halves

    groups = np.asarray(data.groups)
    halves = shadow_halves(groups, 4, seed=3)
    assert np.array_equal(halves[0], ~halves[1]) and np.array_equal(halves[2], ~halves[3])
    for h in halves:  # no group on both sides, and the halves differ by at most one group's size
        assert not set(groups[h]) & set(groups[~h]) and abs(h.sum() - (~h).sum()) <= np.bincount(groups).max()

    d = fit_detector("shadow", SMALL["shadow"], data)
    assert d.members.shape == (4, len(data.real)) and np.array_equal(d.members, shadow_halves(groups, 4, 0))
    s = d.score(data.real, data.real_ids)
    f = d.inner.features(data.real)
    mean2 = lambda sim: np.sort(sim, axis=1)[:, ::-1][:, :2].mean(axis=1)  # noqa: E731
    gen = mean2(f @ d.inner.features(data.generated).T)
    per_shadow = np.stack([mean2(f @ d.inner.features(
        [Image.fromarray(p, mode="L") for p in block]).T) for block in d._shadow_pixels], axis=1)
    left_out = ~d.members.T
    expected = (per_shadow * left_out).sum(axis=1) / left_out.sum(axis=1)
    np.testing.assert_allclose(s.generated_similarity, gen, atol=1e-5)
    np.testing.assert_allclose(s.real_similarity, expected, atol=1e-5)
    np.testing.assert_allclose(s.score, gen - expected, atol=1e-5)
    alone = d.score(data.real[:1])  # no id: no shadow saw it
    assert alone.real_similarity[0] == pytest.approx(per_shadow[0].mean(), abs=1e-5)
    back = load_detector(d.save(tmp_path / "shadow"))
    np.testing.assert_allclose(back.score(data.real, data.real_ids).score, s.score, atol=1e-6)
    assert back.meta.settings["family"] == "ae_gmm"


class _Copier:
    """A stand-in generator that remembers its training images and samples them back: a shadow's samples then
    contain exactly the images it trained on."""

    def __init__(self) -> None:
        self.images = np.zeros((0, 1, 1), np.float32)

    def check_size(self, size: int) -> None:
        return None

    def fit(self, images: np.ndarray, seed: int = 0, progress: bool = False) -> list:
        self.images = np.array(images)
        return []

    def sample(self, n: int, seed: int = 0, temperature: float = 1.0) -> np.ndarray:
        return self.images[np.arange(n) % len(self.images)]


def test_shadow_baseline_never_comes_from_a_shadow_that_saw_the_image(data: FitData, monkeypatch) -> None:
    """With shadows that copy their training images, an image is found exactly (NCC 1) by the shadows that trained
    on it and never by those its baseline comes from, wherever it sits in the query (ids drive the lookup)."""
    import fingerprint.zoo.base as zoo_base

    monkeypatch.setattr(zoo_base, "create_generator", lambda name, settings=None: _Copier())
    d = create_detector("shadow", {**SMALL["shadow"], "k": 1, "generator_size": 32, "samples": len(data.real)})
    d.fit(data)
    f = d.inner.features(data.real)
    best = np.stack([(f @ d.inner.features([Image.fromarray(p, mode="L") for p in block]).T).max(axis=1)
                     for block in d._shadow_pixels], axis=1)  # (R, shadows)
    assert np.allclose(best[d.members.T], 1.0, atol=1e-4)  # a shadow that trained on an image holds it
    s = d.score(data.real, data.real_ids)
    expected = np.where(d.members.T, 0.0, best).sum(axis=1) / (~d.members.T).sum(axis=1)
    np.testing.assert_allclose(s.real_similarity, expected, atol=1e-5)
    assert np.all(s.real_similarity < 1 - 1e-3)  # the image itself never enters its own baseline
    perm = np.random.default_rng(0).permutation(len(data.real))[: len(data.real) // 2]
    part = d.score([data.real[i] for i in perm], [data.real_ids[i] for i in perm])
    np.testing.assert_allclose(part.score, s.score[perm], atol=1e-6)


def test_shadows_are_reproducible_and_halves_handle_lopsided_pools(data: FitData) -> None:
    from fingerprint.detectors.shadow import shadow_halves

    a, b = (fit_detector("shadow", SMALL["shadow"], data) for _ in range(2))
    assert np.array_equal(a._shadow_pixels, b._shadow_pixels)
    # Lopsided pools, in every order the groups may come in: a big group stays whole and the halves differ by at
    # most the largest group's size (two big groups go to different sides).
    for seed in range(6):
        halves = shadow_halves(np.array([1, 2] + [0] * 7 + [3]), 2, seed)
        assert abs(halves[0].sum() - halves[1].sum()) <= 7 and len(set(halves[0][2:9])) == 1
        halves = shadow_halves(np.repeat([0, 1, 2], [45, 10, 45]), 2, seed)
        assert sorted([halves[0].sum(), halves[1].sum()]) == [45, 55]
    # One group: no half without the other side, so fitting says what to do instead of failing inside training.
    one = dataclasses.replace(data, groups=np.zeros(len(data.real), dtype=np.int64))
    with pytest.raises(ConfigError, match=r"shadow\.shadows: a shadow would train on 0 image"):
        create_detector("shadow", SMALL["shadow"]).fit(one)


@pytest.mark.parametrize(("settings", "expected"), [
    ({"family": "stylegan"}, r"shadow\.family: unknown generator family 'stylegan'"),
    ({"generator_settings": "{steps: 5}"}, r"shadow\.generator_settings: not a JSON object"),
    ({"generator_settings": '{"stepz": 5}'}, r"shadow\.generator_settings: unknown dcgan setting\(s\) stepz"),
    ({"shadows": 3}, r"shadow\.shadows: must be even"),
    ({"seed": -1}, r"shadow: --seed\b"),
])
def test_shadow_settings_errors_name_the_setting(settings: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        create_detector("shadow", settings)
