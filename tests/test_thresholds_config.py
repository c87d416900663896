"""Decision thresholds against brute force, and configuration checks derived from the field types."""

from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import pytest

from fingerprint.config import ConfigError, Range, ScoreConfig, TrainConfig, check_fields, validate
from fingerprint.evaluation.thresholds import best_f1_threshold, threshold_at_fpr, threshold_max_f1


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
