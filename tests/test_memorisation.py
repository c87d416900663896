"""The memorisation test (group-level permutation test of the AUC) and its use by `fingerprint evaluate`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fingerprint.commands import evaluate as evaluate_cmd
from fingerprint.config import ConfigError
from fingerprint.evaluation import memorisation as mm
from fingerprint.evaluation.memorisation import MemorisationTest, memorisation_test


def _patients(seed: int, n_groups: int = 60, slices: int = 3, signal: float = 0.0, jitter: float = 0.02):
    """Half the patients used; each patient's slices share a score (plus a little jitter) and a label."""
    rng = np.random.default_rng(seed)
    label = rng.permutation(np.arange(n_groups) % 2)
    g = np.repeat(np.arange(n_groups), slices)
    s = (rng.normal(size=n_groups) + signal * label)[g] + jitter * rng.normal(size=g.size)
    return label[g], s, g


def test_random_scores_give_no_evidence() -> None:
    y, s, g = _patients(0)
    res = memorisation_test(y, s, g)
    assert isinstance(res, MemorisationTest)
    assert res.p_value > 0.05 and not res.evidence
    assert res.n_permutations == 2000 and res.n_groups == 60 and res.unit == "group"
    assert res.auc == pytest.approx(roc_auc_score(y, s))
    assert res.verdict.startswith("no evidence of memorisation (p = ")
    assert res.verdict.endswith("): per-image decisions cannot be told from chance on these labels; not an "
                                "all-clear: the test finds a separation reliably (80% power) only from AUC "
                                f"{res.detectable_auc:.2f}")
    assert 0.5 < res.detectable_auc < 1.0
    assert res == memorisation_test(y, s, g)  # seeded: reproducible


@pytest.mark.parametrize("slices", [1, 4])
def test_detectable_auc_is_found_about_four_times_in_five(slices: int) -> None:
    # Fixed labels and patients; scores = patient effect + signal * label (+ slice jitter). Set the signal so the
    # AUC between patients equals the detectable AUC of a null draw, then count how often the test finds it.
    from scipy.stats import norm

    y, s0, g = _patients(11, n_groups=50, slices=slices, jitter=0.3)
    detectable = memorisation_test(y, s0, g, n_permutations=1000).detectable_auc
    signal = np.sqrt(2) * norm.ppf(detectable)
    found = []
    for seed in range(120):
        rng = np.random.default_rng(1000 + seed)
        s = (rng.normal(size=50) + signal * y[::slices])[g] + 0.3 * rng.normal(size=g.size)
        found.append(memorisation_test(y, s, g, n_permutations=300, seed=seed).evidence)
    assert 0.65 <= np.mean(found) <= 0.95


def test_more_patients_detect_weaker_memorisation() -> None:
    small = memorisation_test(*_patients(12, n_groups=20)).detectable_auc
    large = memorisation_test(*_patients(12, n_groups=200)).detectable_auc
    assert 0.5 < large < small <= 1.0


def test_tied_scores_have_no_detectable_auc() -> None:
    y, _, g = _patients(13)
    res = memorisation_test(y, np.zeros(y.size), g)
    assert res.p_value == 1.0 and np.isnan(res.detectable_auc)
    assert "power cannot be estimated here" in res.verdict


def test_too_few_groups_can_detect_nothing() -> None:
    # 4 patients allow 6 label assignments: p never reaches 0.05, so no separation is detectable.
    res = memorisation_test([0, 0, 1, 1, 0, 1], [0.1, 0.2, 0.3, 0.4, 0.15, 0.35], ["a", "a", "b", "b", "c", "d"])
    assert res.detectable_auc == 1.0
    assert "would not reliably find even a perfect separation" in res.verdict


def test_p_values_are_roughly_uniform_under_h0() -> None:
    ps = np.array([memorisation_test(*_patients(seed), n_permutations=200, seed=seed).p_value
                   for seed in range(120)])
    assert 0.4 < ps.mean() < 0.6
    assert np.mean(ps <= 0.05) < 0.12
    assert 0.1 < np.mean(ps <= 0.2) < 0.3 and 0.4 < np.mean(ps <= 0.5) < 0.6


def test_separable_scores_give_the_smallest_p() -> None:
    y, s, g = _patients(1, signal=10.0)
    res = memorisation_test(y, s, g)
    assert res.auc == 1.0 and res.evidence
    assert res.p_value == pytest.approx(1 / 2001)
    assert res.verdict == f"the scores separate training members from non-members (AUC 1.000, p = {1 / 2001:.3g})"
    # One-sided: scores that rank members *below* non-members are no evidence.
    assert memorisation_test(y, -s, g).p_value == 1.0


def test_p_value_is_the_permutation_fraction() -> None:
    y, s, g = _patients(2, n_groups=20, signal=0.5)
    res = memorisation_test(y, s, g, n_permutations=300, seed=7)
    # The same permutations, scored one by one with scikit-learn.
    perms = mm._permuted_labels(y, np.unique(g, return_inverse=True)[1], 300, np.random.default_rng(7))
    aucs = np.array([roc_auc_score(p, s) for p in perms])
    assert res.p_value == pytest.approx((1 + np.sum(aucs >= res.auc - 1e-12)) / 301)


def test_duplicated_slices_do_not_make_p_smaller() -> None:
    # One slice per patient, then the same data with every slice repeated 5 times (near-duplicate neighbours).
    y1, s1, _ = _patients(3, n_groups=40, slices=1, signal=0.5, jitter=0.0)
    one = memorisation_test(y1, s1, np.arange(y1.size))
    g = np.repeat(np.arange(y1.size), 5)
    y5, s5 = y1[g], s1[g]
    grouped = memorisation_test(y5, s5, g)
    assert grouped.auc == pytest.approx(one.auc)
    assert grouped.p_value >= one.p_value - 1e-12
    assert grouped.p_value == pytest.approx(one.p_value)  # the same test: copies add no evidence
    assert grouped.detectable_auc == pytest.approx(one.detectable_auc)  # nor power
    # Treating the copies as independent images overstates the evidence.
    as_images = memorisation_test(y5, s5)
    assert as_images.unit == "image" and as_images.n_groups == 200
    assert as_images.p_value < one.p_value
    assert as_images.detectable_auc < one.detectable_auc


def test_mixed_groups_move_whole_label_vectors() -> None:
    y, s, g = _patients(4, n_groups=30, slices=4)
    y = y.copy()
    y[[0, 5, 40, 41]] = 1 - y[[0, 5, 40, 41]]  # groups 0, 1 and 10 now hold both labels
    perms = mm._permuted_labels(y, g, 200, np.random.default_rng(0))
    mixed = [0, 1, 10]
    vectors = {tuple(y[g == j]) for j in mixed}
    for p in perms:
        assert p.sum() == y.sum()
        for j in range(30):
            part = p[g == j]
            if j in mixed:
                assert tuple(part) in vectors
            else:
                assert part.min() == part.max()  # a pure group stays pure
    # Mixed groups do exchange their vectors, and pure groups their labels.
    assert len({tuple(p[g == 0]) for p in perms}) > 1
    assert len({tuple(p[g == 2]) for p in perms}) == 2
    assert 0 <= memorisation_test(y, s, g).p_value <= 1


def test_few_groups_say_p_cannot_be_small() -> None:
    res = memorisation_test([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], ["a", "a", "b", "b"])
    assert res.auc == 1.0 and res.p_value > 0.05
    assert "only 2 distinct label assignments" in res.verdict


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"labels": [0, 1, 2, 1]}, "labels must contain only 0 and 1"),
        ({"labels": [1, 1, 1, 1]}, "labels contain a single class"),
        ({"scores": [0.1, 0.2, float("nan"), 0.4]}, "scores contain 1 NaN"),
        ({"scores": [0.1, 0.2]}, "labels and scores have different lengths"),
        ({"groups": [0, 1, 1]}, "labels and groups have different lengths"),
        ({"groups": [[0, 1], [1, 0]]}, "groups must be a 1-D array"),
        ({"n_permutations": 0}, "n_permutations must be a positive integer"),
        ({"n_permutations": 2.5}, "n_permutations"),
    ],
)
def test_bad_input_names_the_argument(kwargs: dict, match: str) -> None:
    args = {"labels": [0, 1, 0, 1], "scores": [0.1, 0.2, 0.3, 0.4], "groups": None, **kwargs}
    with pytest.raises(ValueError, match=match):
        memorisation_test(**args)


# ------------------------------------------------------------------------------------ fingerprint evaluate


def _write_scores(path: Path, bench: Path, signal: float) -> None:
    """Scores for the sample's test images: members get ``signal`` more, patients share a score."""
    labels = {r["id"]: int(r["label"]) for r in csv.DictReader((bench / "test_labels.csv").open())}
    groups = {r["id"]: int(r["group"]) for r in csv.DictReader((bench / "groups.csv").open())}
    rng = np.random.default_rng(0)
    patient = rng.normal(size=max(groups.values()) + 1)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "score", "decision"])
        for i, lab in labels.items():
            score = patient[groups[i]] + signal * lab + 0.01 * rng.normal()
            w.writerow([i, f"{score:.6f}", int(score > 0)])


def test_evaluate_reports_groups_and_the_verdict(sample_bench: Path, tmp_path: Path, capsys) -> None:
    scores = tmp_path / "scores.csv"
    _write_scores(scores, sample_bench, signal=5.0)
    cfg = dict(scores=str(scores), labels=str(sample_bench / "test_labels.csv"), n_boot=200)
    ci = evaluate_cmd.main(evaluate_cmd.EvaluateConfig(**cfg, groups=str(sample_bench / "groups.csv"),
                                                      out=str(tmp_path / "grouped")))
    printed = capsys.readouterr().out
    got = json.loads((tmp_path / "grouped" / "metrics.json").read_text())
    assert got["auc"] == list(ci["auc"]) and got["auc"][0] == 1.0
    assert got["bootstrap"]["unit"] == "group"
    mem = got["memorisation"]
    assert mem["unit"] == "group" and mem["n_permutations"] == 2000 and mem["n_groups"] == 4
    md = (tmp_path / "grouped" / "metrics.md").read_text()
    assert "resampling unit: whole groups (4 groups" in md and mem["verdict"] in md and mem["verdict"] in printed
    # Four patients allow only 6 label assignments: the test says it cannot give a small p.
    assert not mem["evidence"] and "cannot fall below" in mem["verdict"]

    evaluate_cmd.main(evaluate_cmd.EvaluateConfig(**cfg, out=str(tmp_path / "images")))
    got = json.loads((tmp_path / "images" / "metrics.json").read_text())
    assert got["bootstrap"]["unit"] == "image" and got["memorisation"]["unit"] == "image"
    assert got["memorisation"]["evidence"]  # slices as independent images: p looks small
    md = (tmp_path / "images" / "metrics.md").read_text()
    assert "too narrow" in md and f"--groups {sample_bench / 'groups.csv'}" in md


def test_evaluate_groups_problems_name_the_flag(sample_bench: Path, tmp_path: Path) -> None:
    scores = tmp_path / "scores.csv"
    _write_scores(scores, sample_bench, signal=0.0)
    base = dict(scores=str(scores), labels=str(sample_bench / "test_labels.csv"), out=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="--groups"):
        evaluate_cmd.main(evaluate_cmd.EvaluateConfig(**base, groups=str(tmp_path / "missing.csv")))
    partial = tmp_path / "groups.csv"
    partial.write_text("id,group\nreal_unknown_0001,3\n")
    with pytest.raises(ConfigError, match="--groups.*no group for"):
        evaluate_cmd.main(evaluate_cmd.EvaluateConfig(**base, groups=str(partial)))
    # Dev ids of a benchmark match the plain stems that groups.csv holds.
    assert evaluate_cmd.groups_of(sample_bench / "groups.csv", ["dev/used_0001", "used_0001"])[0] == \
        evaluate_cmd.groups_of(sample_bench / "groups.csv", ["used_0001"])[0]


def test_null_calibration_counts_false_alarms_on_null_splits(sample_bench, tmp_path):
    """`fingerprint null-calibration`: null splits drawn as the zoo's null controls, a perfect memoriser of the
    hidden training set as the score, and the share of splits the memorisation test rejects, with its interval."""
    from fingerprint.commands import cli
    from fingerprint.evaluation.null_calibration import NullCalibrationConfig, main, rejection_rates

    real = sorted(p for d in ("dev/used", "dev/not_used", "test/real_unknown") for p in (sample_bench / d).glob("*"))
    manifest = tmp_path / "pool.csv"  # 12 patients of 3 slices: enough groups for labelled, hidden and held-out sets
    manifest.write_text("path,role,group\n" + "".join(f"{p},real_unknown,{i // 3}\n" for i, p in enumerate(real)))
    out = tmp_path / "out"
    result = main(NullCalibrationConfig(pool=str(manifest), out=str(out), members=6, splits=4, n_permutations=20))
    rows = result["splits"]
    assert [(r["seed"], r["side"]) for r in rows] == [(s, side) for s in range(300, 304) for side in ("dev", "test")]
    assert all(0 < r["p"] <= 1 and 0 <= r["auc"] <= 1 and r["used"] > 0 and r["not_used"] > 0 for r in rows)
    for rate in result["rates"]:
        ps = np.array([r["p"] for r in rows if r["side"] == rate["side"]])
        assert rate["rejected"] == int((ps <= rate["level"]).sum()) and rate["rate"] == rate["rejected"] / len(ps)
        low, high = (float(v) for v in rate["ci"].strip("[]").split(","))
        assert low <= rate["rate"] <= high
    assert json.loads((out / "null_calibration.json").read_text())["rates"] == result["rates"]
    assert "rejection rate" in (out / "null_calibration.md").read_text()
    # The false-positive bound: set on the dev side, checked against the share of test images flagged.
    bounds = result["bounds"]
    assert [b["seed"] for b in bounds] == list(range(300, 304))
    assert all(b["bound"] >= b["bound_images"] >= b["dev_rate"] and 0 <= b["test_rate"] <= 1 for b in bounds)
    held = {c["limit"]: c["held"] for c in result["bound_coverage"]}
    assert held["recorded bound (patients and images)"] == sum(b["test_rate"] <= b["bound"] for b in bounds)
    assert held["bound counting images only"] <= held["recorded bound (patients and images)"]
    assert "The false-positive bound" in (out / "null_calibration.md").read_text()
    # Every split rejected: the interval is one-sided at the top.
    assert rejection_rates([{"side": s, "p": 0.01} for s in ("dev", "test")] * 3)[0]["ci"].endswith("1.000]")
    assert cli.main(["null-calibration", "--out", str(tmp_path / "x")]) == 2  # --pool missing, named, no traceback
