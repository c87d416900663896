"""fingerprint.evaluation.metrics against scikit-learn, on random data with many ties."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn import metrics as skm

from fingerprint.evaluation import metrics as fm

SEEDS = [0, 1, 2, 3, 4, 5]


def _data(seed: int, n: int = 300, n_levels: int | None = 12) -> tuple[np.ndarray, np.ndarray]:
    """Labels with a class imbalance that varies by seed, scores quantised so ties are common."""
    rng = np.random.default_rng(seed)
    p_member = 0.2 + 0.6 * rng.random()
    y = (rng.random(n) < p_member).astype(int)
    y[:2] = [0, 1]  # both classes always present
    s = rng.normal(size=n) + 0.8 * y
    if n_levels is not None:
        s = np.round(s * n_levels / 6.0) / (n_levels / 6.0)
    return y, s


def _sk_tpr_at_fpr(y: np.ndarray, s: np.ndarray, target: float) -> float:
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    return float(tpr[fpr <= target + 1e-12].max())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_levels", [4, 12, None])
def test_auc_and_roc_match_sklearn(seed: int, n_levels: int | None) -> None:
    y, s = _data(seed, n_levels=n_levels)
    assert fm.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, thr = fm.roc_curve(y, s)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_array_equal(thr, sk_thr)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("target", [0.0, 0.001, 0.01, 0.05, 0.1, 0.5, 1.0])
def test_tpr_at_fpr_matches_sklearn_curve(seed: int, target: float) -> None:
    y, s = _data(seed, n=400)
    assert fm.tpr_at_fpr(y, s, target) == pytest.approx(_sk_tpr_at_fpr(y, s, target))


def test_tpr_at_fpr_step_convention() -> None:
    # Negatives at 0.9 and 0.1; positives at 0.95, 0.9 (tied with a negative), 0.5.
    y = np.array([1, 1, 0, 1, 0])
    s = np.array([0.95, 0.9, 0.9, 0.5, 0.1])
    # FPR 0: only the threshold above the tie is allowed -> 1 of 3 positives; no interpolation into the tie.
    assert fm.tpr_at_fpr(y, s, 0.0) == pytest.approx(1 / 3)
    assert fm.tpr_at_fpr(y, s, 0.49) == pytest.approx(1 / 3)
    # FPR exactly 0.5 is admissible (<=).
    assert fm.tpr_at_fpr(y, s, 0.5) == pytest.approx(1.0)
    # Top-scoring sample is a negative -> nothing achievable at FPR 0 but the (0, 0) point.
    assert fm.tpr_at_fpr([0, 1, 1], [0.9, 0.5, 0.4], 0.0) == 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_metrics_match_sklearn(seed: int) -> None:
    y, s = _data(seed)
    d = (s >= np.median(s)).astype(int)
    got = fm.binary_metrics(y, d)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, d))
    assert got["precision"] == pytest.approx(skm.precision_score(y, d, zero_division=0))
    assert got["recall"] == pytest.approx(skm.recall_score(y, d, zero_division=0))
    assert got["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - d, zero_division=0))
    assert got["f1"] == pytest.approx(skm.f1_score(y, d, zero_division=0))
    assert got["kappa"] == pytest.approx(skm.cohen_kappa_score(y, d))
    c = fm.confusion(y, d)
    tn, fp, fn, tp = skm.confusion_matrix(y, d, labels=[0, 1]).ravel()
    assert c == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


@pytest.mark.parametrize(
    ("y", "d"),
    [
        ([0, 0, 1, 1], [0, 0, 0, 0]),  # nothing predicted positive: precision 0/0
        ([0, 0, 0, 0], [0, 0, 0, 0]),  # no positives at all: recall and kappa 0/0
        ([1, 1, 1], [1, 1, 1]),  # no negatives: specificity and kappa 0/0
        ([0, 1, 0, 1], [1, 0, 1, 0]),  # all wrong: f1 has 0 numerator
    ],
)
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_zero_division_is_zero_like_sklearn(y: list[int], d: list[int]) -> None:
    got = fm.binary_metrics(y, d)
    assert got["precision"] == skm.precision_score(y, d, zero_division=0)
    assert got["recall"] == skm.recall_score(y, d, zero_division=0)
    assert got["f1"] == skm.f1_score(y, d, zero_division=0)
    assert got["kappa"] == pytest.approx(
        skm.cohen_kappa_score(y, d, labels=[0, 1], replace_undefined_by=0.0)
    )
    assert all(np.isfinite(v) for v in got.values())


def test_all_metrics_keys_and_threshold() -> None:
    y, s = _data(0)
    only_scores = fm.all_metrics(y, s)
    assert set(only_scores) == {"auc", "tpr_at_01fpr", "tpr_at_1fpr", "tpr_at_5fpr"}
    assert only_scores["tpr_at_1fpr"] == pytest.approx(_sk_tpr_at_fpr(y, s, 0.01))
    assert only_scores["tpr_at_01fpr"] == pytest.approx(_sk_tpr_at_fpr(y, s, 0.001))
    with_thr = fm.all_metrics(y, s, threshold=0.3)
    assert with_thr == fm.all_metrics(y, s, decisions=s >= 0.3)
    assert set(with_thr) == set(only_scores) | {"accuracy", "precision", "recall", "specificity", "f1",
                                                 "kappa"}
    assert with_thr["f1"] == pytest.approx(skm.f1_score(y, s >= 0.3))


@pytest.mark.parametrize("stratified", [True, False])
def test_bootstrap_contains_point_and_narrows(stratified: bool) -> None:
    y, s = _data(3, n=200)
    small = fm.bootstrap_ci(y, s, threshold=0.4, n_boot=400, seed=1, stratified=stratified)
    point = fm.all_metrics(y, s, threshold=0.4)
    assert set(small) == set(point)
    for key, (pt, lo, hi) in small.items():
        assert pt == pytest.approx(point[key])
        assert lo <= hi
    for key in ("auc", "accuracy", "f1", "kappa", "precision", "recall", "specificity", "tpr_at_5fpr"):
        pt, lo, hi = small[key]
        assert lo <= pt <= hi, key

    # Four times the data should roughly halve the width; ask for a clear narrowing only.
    y4, s4 = np.tile(y, 4), np.tile(s, 4)
    big = fm.bootstrap_ci(y4, s4, threshold=0.4, n_boot=400, seed=1, stratified=stratified)
    for key in ("auc", "accuracy", "f1"):
        assert big[key][0] == pytest.approx(small[key][0])
        assert big[key][2] - big[key][1] < 0.75 * (small[key][2] - small[key][1]), key


def test_bootstrap_auc_distribution_matches_direct_computation() -> None:
    # The vectorised per-resample AUC / TPR@FPR must equal recomputing them on each resample.
    y, s = _data(5, n=60, n_levels=4)
    codes = np.unique(s, return_inverse=True)[1]
    rng = np.random.default_rng(0)
    idx = rng.integers(0, y.size, size=(50, y.size))
    batch = fm._score_metrics_batch(codes, y, idx, int(codes.max()) + 1)
    for b in range(idx.shape[0]):
        yb, sb = y[idx[b]], s[idx[b]]
        if yb.min() == yb.max():
            assert np.isnan(batch["auc"][b])
            continue
        assert batch["auc"][b] == pytest.approx(skm.roc_auc_score(yb, sb), abs=1e-12)
        for key, target in fm.FPR_TARGETS.items():
            assert batch[key][b] == pytest.approx(_sk_tpr_at_fpr(yb, sb, target)), key


def test_bootstrap_is_reproducible_and_fast() -> None:
    y, s = _data(7, n=200)
    start = time.perf_counter()
    a = fm.bootstrap_ci(y, s, threshold=0.0, n_boot=1000, seed=3)
    elapsed = time.perf_counter() - start
    assert a == fm.bootstrap_ci(y, s, threshold=0.0, n_boot=1000, seed=3)
    # Generous bound for a shared, busy CI machine; the target is well under a second.
    assert elapsed < 2.0, elapsed


def test_format_table() -> None:
    rows = [
        {"method": "loss", "auc": 0.91234, "n": 200, "ci": (0.9, 0.85, 0.95)},
        {"method": "a|b", "auc": 0.5, "n": 20},
    ]
    text = fm.format_table(rows, ["method", ("auc", "AUC"), "n", ("ci", "AUC 95% CI")])
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].split("|")[1].strip() == "method"
    assert "AUC 95% CI" in lines[0]
    assert "0.912" in lines[2] and "0.900 [0.850, 0.950]" in lines[2]
    assert "a\\|b" in lines[3]
    # Every row has the same number of unescaped column separators.
    assert {line.replace("\\|", "").count("|") for line in lines} == {5}
    with pytest.raises(ValueError, match="columns"):
        fm.format_table(rows, [])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: fm.roc_auc([0, 1, 1], [0.1, 0.2]), "different lengths"),
        (lambda: fm.roc_auc([0, 1, 2], [0.1, 0.2, 0.3]), "only 0 and 1"),
        (lambda: fm.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]), "single class"),
        (lambda: fm.roc_curve([0, 0], [0.1, 0.2]), "single class"),
        (lambda: fm.tpr_at_fpr([0, 1], [0.1, 0.2], 1.5), r"\[0, 1\]"),
        (lambda: fm.roc_auc([0, 1], [0.1, float("nan")]), "NaN"),
        (lambda: fm.roc_auc([], []), "empty"),
        (lambda: fm.roc_auc([[0, 1]], [[0.1, 0.2]]), "1-D"),
        (lambda: fm.binary_metrics([0, 1], [1]), "different lengths"),
        (lambda: fm.binary_metrics([0, 1], [0.5, 1]), "decisions must contain only 0 and 1"),
        (lambda: fm.all_metrics([0, 1], [0.1, 0.2], decisions=[0, 1], threshold=0.5), "not both"),
        (lambda: fm.bootstrap_ci([0, 1], [0.1, 0.2], n_boot=0), "n_boot"),
        (lambda: fm.bootstrap_ci([0, 1], [0.1, 0.2], alpha=1.0), "alpha"),
        (lambda: fm.bootstrap_ci([1, 1], [0.1, 0.2]), "single class"),
    ],
)
def test_bad_input_raises(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_bool_labels_accepted() -> None:
    y, s = _data(2)
    assert fm.roc_auc(y.astype(bool), s) == fm.roc_auc(y, s)
    assert fm.roc_auc(y.astype(float), s) == fm.roc_auc(y, s)


# --------------------------------------------------------------------------------------- group bootstrap


def _grouped(seed: int, n_groups: int = 60, copies: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each group (patient) is one label and one score repeated ``copies`` times: near-duplicate slices."""
    y, s = _data(seed, n=n_groups)
    g = np.repeat(np.arange(n_groups), copies)
    return y[g], s[g], g


def test_group_bootstrap_is_wider_than_image_bootstrap_for_near_duplicates() -> None:
    y, s, g = _grouped(11)
    image = fm.bootstrap_ci(y, s, threshold=0.4, n_boot=600, seed=2)
    group = fm.bootstrap_ci(y, s, threshold=0.4, n_boot=600, seed=2, groups=g)
    for key in ("auc", "accuracy", "f1"):
        assert group[key][0] == image[key][0], key  # same point estimate
        # Five copies make the image bootstrap about sqrt(5) times too narrow; ask for a clear widening.
        assert group[key][2] - group[key][1] > 1.5 * (image[key][2] - image[key][1]), key
    # A group of identical copies counts as one observation: the same intervals as one image per group.
    once = fm.bootstrap_ci(y[::5], s[::5], threshold=0.4, n_boot=600, seed=2)
    for key, (pt, lo, hi) in group.items():
        assert (pt, lo, hi) == pytest.approx(once[key], abs=1e-9), key


@pytest.mark.parametrize("stratified", [True, False])
def test_group_bootstrap_with_singleton_groups_is_the_image_bootstrap(stratified: bool) -> None:
    y, s = _data(4, n=150)
    image = fm.bootstrap_ci(y, s, threshold=0.2, n_boot=400, seed=5, stratified=stratified)
    # Singleton groups numbered as the images draw exactly the same resamples.
    assert fm.bootstrap_ci(y, s, threshold=0.2, n_boot=400, seed=5, stratified=stratified,
                           groups=np.arange(y.size)) == image
    # Named in another order (string ids, shuffled), the draws differ but the distribution is the same.
    names = np.array([f"patient-{i}" for i in np.random.default_rng(0).permutation(y.size)])
    other = fm.bootstrap_ci(y, s, threshold=0.2, n_boot=2000, seed=6, stratified=stratified, groups=names)
    ref = fm.bootstrap_ci(y, s, threshold=0.2, n_boot=2000, seed=6, stratified=stratified)
    for key in ("auc", "accuracy", "f1", "kappa", "tpr_at_5fpr"):
        assert other[key][0] == ref[key][0]
        assert other[key][1] == pytest.approx(ref[key][1], abs=0.03), key
        assert other[key][2] == pytest.approx(ref[key][2], abs=0.03), key


@pytest.mark.parametrize("stratified", [True, False])
def test_group_resamples_keep_whole_groups(monkeypatch: pytest.MonkeyPatch, stratified: bool) -> None:
    # Groups of sizes 1-4, every image a distinct score; group 6 is mixed (a used and a not-used slice).
    sizes = [1, 2, 3, 4, 2, 3, 2, 1]
    g = np.repeat(np.arange(len(sizes)), sizes)
    group_label = np.array([1, 1, 1, 0, 0, 0, -1, 0])
    y = group_label[g]
    y[g == 6] = [1, 0]
    s = np.arange(g.size) / g.size
    seen: list[np.ndarray] = []
    real = fm._score_metrics_weighted

    def spy(codes, labels, weights, n_codes):
        np.testing.assert_array_equal(codes, np.arange(g.size))  # distinct scores: a code names one image
        seen.append(weights.copy())
        return real(codes, labels, weights, n_codes)

    monkeypatch.setattr(fm, "_score_metrics_weighted", spy)
    fm.bootstrap_ci(y, s, threshold=0.5, n_boot=25, seed=0, groups=g, stratified=stratified)
    w = np.concatenate(seen)
    assert w.shape == (25, g.size)
    for j in range(len(sizes)):
        # Every image of a group is drawn as often as the others: groups are never split.
        members = w[:, g == j]
        assert (members == members[:, :1]).all(), j
    per_group = w[:, np.searchsorted(g, np.arange(len(sizes)))]  # the first image of each group
    assert (per_group.sum(axis=1) == len(sizes)).all()  # as many groups as the data
    if stratified:
        # Within each class stratum: used-only, not-used-only and mixed groups keep their numbers.
        for members in ([0, 1, 2], [3, 4, 5, 7], [6]):
            assert (per_group[:, members].sum(axis=1) == len(members)).all()
        assert (per_group[:, 6] == 1).all()
    assert fm.group_strata(y, g)[0][2].tolist() == [6]


@pytest.mark.parametrize(
    ("groups", "match"),
    [
        ([0, 1, 2], "labels and groups have different lengths"),
        ([[0, 1], [2, 3]], "groups must be a 1-D array"),
        ([0.0, 1.0, float("nan"), 2.0], "groups contains 1 NaN"),
        (np.array(["a", None, "b", "c"], dtype=object), "groups contains missing values"),
    ],
)
def test_group_bootstrap_bad_groups_name_the_argument(groups, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fm.bootstrap_ci([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], n_boot=10, groups=groups)


def test_resampling_unit_text() -> None:
    assert "too narrow" in fm.resampling_unit(None)
    assert fm.resampling_unit(["a", "a", "b"]).startswith("whole groups (2 groups")
