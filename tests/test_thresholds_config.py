"""Decision thresholds against brute force, and configuration checks derived from the field types."""

from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import pytest

from fingerprint.config import ConfigError, Range, ScoreConfig, TrainConfig, check_fields, validate
from fingerprint.evaluation.thresholds import (
    best_f1_threshold,
    false_positives,
    fpr_upper_bound,
    groups_needed,
    threshold_at_fpr,
    threshold_at_fpr_bound,
    threshold_max_f1,
)


def f1_at(y, s, t):
    d = s >= t
    tp, fp, fn = np.sum(d & (y == 1)), np.sum(d & (y == 0)), np.sum(~d & (y == 1))
    return 2 * tp / max(2 * tp + fp + fn, 1)


@pytest.mark.parametrize("seed", range(5))
def test_max_f1_threshold_reaches_the_best_f1_of_any_cut(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    y[:2] = [0, 1]
    s = np.round(rng.normal(size=60) + y, 1)  # rounding makes ties
    t = threshold_max_f1(y, s)
    best = max(f1_at(y, s, c) for c in np.r_[s, s.max() + 1])
    assert f1_at(y, s, t) == pytest.approx(best)
    assert t not in set(s.tolist())  # a midpoint, not a training score
    assert best_f1_threshold(y, s, np.sort(s)) in set(s.tolist())
    assert f1_at(y, s, best_f1_threshold(y, s, np.sort(s))) == pytest.approx(best)


def test_fpr_threshold_keeps_the_false_positive_rate():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(200, int), np.ones(50, int)]
    s = rng.normal(size=250) + y
    t = threshold_at_fpr(y, s, 0.05)
    assert np.mean(s[y == 0] >= t) <= 0.05


def test_the_false_positive_bound_is_scipys_clopper_pearson_and_counts_patients():
    from scipy.stats import binomtest

    for k, n in ((0, 10), (3, 40), (17, 120), (40, 40)):
        want = binomtest(k, n, alternative="less").proportion_ci(0.95).high
        assert float(fpr_upper_bound(k, n)) == pytest.approx(want)
    # Zero flagged of n bounds the rate by 1 - 0.05^(1/n): 59 groups are the fewest that can show 5%.
    assert groups_needed(0.05) == 59 and fpr_upper_bound(0, 59) <= 0.05 < fpr_upper_bound(0, 58)
    # Eight not-used images, four patients of two slices; the threshold flags both slices of one patient.
    y = np.r_[np.zeros(8, int), 1]
    s = np.array([0.1, 0.2, 0.9, 0.95, 0.3, 0.4, 0.5, 0.6, 2.0])
    g = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4])
    fp = false_positives(y, s, 0.8, g)
    assert (fp.not_used, fp.groups, fp.flagged, fp.flagged_groups, fp.rate) == (8, 4, 2, 1, 0.25)
    assert fp.bound == pytest.approx(max(float(fpr_upper_bound(1, 4)), float(fpr_upper_bound(2, 8))))
    # Without groups each image counts alone, so the same flags bound the rate lower: slices are not patients.
    assert false_positives(y, s, 0.8).bound < fp.bound
    assert "2 of 8 labelled not-used images" in fp.sentence() and "1 of 4 pseudo-patient groups" in fp.sentence()
    assert fp.threshold == 0.8 and "optimistic" not in fp.sentence()
    assert "optimistic" in false_positives(y, s, 0.8, g, in_sample=True).sentence()
    with pytest.raises(ValueError, match="1 of 9 scores are NaN"):
        false_positives(y, np.r_[s[:-1], np.nan], 0.8, g)
    with pytest.raises(ValueError, match="--target-fpr"):
        groups_needed(0.0)


def test_the_bounded_threshold_keeps_its_promise_on_correlated_slices():
    """Many draws of 80 patients of 3 correlated slices: the threshold set to bound the rate by 10% lets through
    more than 10% of a large fresh set of not-used patients in at most about 5% of draws; the observed-rate rule
    breaks its 10% far more often."""
    rng = np.random.default_rng(0)

    def patients(n):
        return np.repeat(rng.normal(size=n), 3) + rng.normal(0, 0.5, 3 * n), np.repeat(np.arange(n), 3)

    fresh, _ = patients(5000)
    broken = {"bound": 0, "rate": 0}
    draws = 200
    for _ in range(draws):
        s, g = patients(80)
        y = np.r_[np.zeros(s.size, int), 1]
        s, g = np.r_[s, 9.0], np.r_[g, 10**6]
        broken["bound"] += np.mean(fresh >= threshold_at_fpr_bound(y, s, 0.1, g)) > 0.1
        broken["rate"] += np.mean(fresh >= threshold_at_fpr(y, s, 0.1)) > 0.1
    assert broken["bound"] <= 0.08 * draws < 0.3 * draws <= broken["rate"]


@pytest.mark.parametrize("seed", range(3))
def test_the_bounded_threshold_is_the_lowest_cut_whose_bound_meets_the_target(seed):
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(400, int), np.ones(60, int)]
    g = np.r_[np.arange(400) // 2, 1000 + np.arange(60)]
    s = rng.normal(size=460) + 2 * y
    s[1:400:2] = s[0:400:2] + rng.normal(0, 0.1, 200)  # two correlated slices per patient
    t = threshold_at_fpr_bound(y, s, 0.05, g)
    assert false_positives(y, s, t, g).bound <= 0.05
    # Brute force over every cut: none lower keeps the bound, and the observed-rate rule sits lower still.
    lower = [c for c in np.sort(s[y == 0]) if c < t]
    assert all(false_positives(y, s, c, g).bound > 0.05 for c in lower)
    assert threshold_at_fpr(y, s, 0.05) < t


def test_the_bounded_threshold_refuses_too_few_patients_and_says_how_many():
    y = np.r_[np.zeros(80, int), np.ones(10, int)]
    s = np.arange(90, dtype=float)
    with pytest.raises(ValueError, match=r"fpr_bound: 80 labelled not-used images in 40 pseudo-patient groups.*"
                                         r"at least 59 groups.*--target-fpr"):
        threshold_at_fpr_bound(y, s, 0.05, np.r_[np.arange(80) // 2, 100 + np.arange(10)])
    assert threshold_at_fpr_bound(y, s, 0.05) > s[y == 0].max()  # 80 single images: flag none of them


@dataclass
class Example:
    k: Annotated[int, Range(1)] = 5
    p: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.5
    mode: Literal["a", "b"] = "a"
    size: Annotated[int | None, Range(16)] = None
    flag: bool = True


def test_checks_come_from_the_types():
    assert check_fields(Example()) == []
    problems = check_fields(Example(k=0, p=1.0, mode="c", size=8, flag="yes"))
    assert [p.split(":")[0] for p in problems] == ["--k", "--p", "--mode", "--size", "--flag"]
    assert "must be >= 1 (got 0)" in problems[0] and "(0, 1)" in problems[1] and "one of a, b" in problems[2]
    assert check_fields(Example(k=2.5)) == ["--k: must be an integer (got 2.5)"]


def test_library_configs_use_them():
    with pytest.raises(ConfigError) as e:
        validate(ScoreConfig(k=0, threshold_method="nope", target_fpr=2))
    assert {"--k", "--threshold-method", "--target-fpr"} <= {p.split(":")[0] for p in e.value.problems}
    with pytest.raises(ConfigError, match="--in-chans"):
        validate(TrainConfig(data=".", weights="none", in_chans=2))


def test_the_product_flags_at_a_set_false_accusation_rate_by_default(sample_bench) -> None:
    from fingerprint.commands.fit import FitConfig
    from fingerprint.data.imagesets import load_fit_data
    from fingerprint.detectors import fit_detector

    assert ScoreConfig().threshold_method == TrainConfig().threshold_method == FitConfig().threshold_method == "fpr"
    data = load_fit_data(str(sample_bench), 0.0, 0)
    y = data.labels[data.train]
    for kind, settings in (("pixel", {"image_size": 32}), ("ssim", {"image_size": 32})):
        det = fit_detector(kind, settings, data)
        assert det.meta.threshold_method == "fpr"
        s = det.score([data.real[i] for i in data.train], [data.real_ids[i] for i in data.train])
        # The training not-used images set the threshold: at most 5% of them are flagged (SSIM included: under
        # 'fpr' its real-to-real calibration is not used).
        assert det.decide(s)[y == 0].mean() <= 0.05
        assert det.threshold == pytest.approx(threshold_at_fpr(y, s.score, 0.05))
        # Every fitted detector records what its threshold did to those images, and the bound that shows.
        fp = det.meta.false_positives
        want = false_positives(y, s.score, det.threshold, data.groups[data.train])
        assert fp == want and fp.rate <= 0.05 <= fp.bound
