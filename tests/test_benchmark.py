"""`fingerprint benchmark` on the detector protocol: end to end on the tiny phantom benchmark (every family, tiny
settings), that its scores are the protocol's, that ensembles share the table's fitted members, that learning
detectors read only training-fold labels, its flag validation, and the command it records."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from fingerprint.commands import cli
from fingerprint.config import ConfigError, add_arguments, from_args, validate
from fingerprint.data import images as fpdata
from fingerprint.data.imagesets import load_fit_data
from fingerprint.detectors import FitData, RankEnsemble, create_detector, load_detector
from fingerprint.evaluation.benchmark import (
    BenchmarkConfig,
    Fitted,
    Run,
    build_detectors,
    command_line,
    evaluate_detector,
    family_of,
    goals,
    memorisation_warning,
    named,
    preset,
    summarise,
)

TINY = ["--image-size", "32", "--folds", "2", "--repeats", "2", "--n-boot", "50", "--backbones", "resnet18",
        "--weights-dir", "none", "--frozen-image-size", "32", "--train-image-size", "32", "--epochs", "1",
        "--triplets-per-epoch", "8", "--batch-size", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(sample_bench: Path) -> FitData:
    return load_fit_data(sample_bench, val_fraction=0.0)


def test_benchmark_end_to_end(sample_bench: Path, data: FitData, tmp_path: Path) -> None:
    out = tmp_path / "results"
    # 'all' also holds family f, whose shadows train generators (tests/test_zoo.py runs them on a tiny recipe).
    assert BenchmarkConfig(detectors="all").requested()[-2:] == ["shadow_gradient", "shadow_ensemble"]
    assert cli.main(["benchmark", "--data", str(sample_bench), "--out", str(out), "--detectors", "a,b,c,d,e",
                     *TINY]) == 0
    for name in ("results.md", "results.json", "roc.png", "roc_log.png", "dev_scores.csv", "submission.csv",
                 "scores.csv", "COMMAND.md", "detector/meta.json"):
        assert (out / name).is_file(), name

    res = json.loads((out / "results.json").read_text())
    names = [d["name"] for d in res["detectors"]]
    assert names == ["pixel_l2", "pixel_ncc", "ssim", "frozen_resnet18", "triplet_resnet18", "pixel_mass",
                     "subspace_mass", "gradient_nn", "pixel_ncc_cal", "gradient_cal", "ssim_cal", "cal_ensemble",
                     "domain_clf", "ab_rank", "best"]
    by_name = {d["name"]: d for d in res["detectors"]}
    assert [by_name[n]["family"] for n in names] == list("aabcdeeeeeeeeee")
    assert by_name["triplet_resnet18"]["kind"] == "triplet" and by_name["pixel_mass"]["kind"] == "pixel"
    assert by_name["domain_clf"]["signal"] == "distribution" and by_name["pixel_l2"]["signal"] == "per_image"
    assert by_name["ab_rank"]["signal"] == "mixed (domain_clf)"
    reps = {n: len(d["per_repeat"]) for n, d in by_name.items()}
    assert reps["triplet_resnet18"] == 1 and reps["best"] == 2 and reps["ssim"] == 2  # --trained-repeats 1
    for d in res["detectors"]:
        point, low, high = d["metrics"]["auc"]
        assert 0 <= low <= high <= 1 and 0 <= point <= 1
        assert len(d["thresholds"][0]) == 2  # one threshold per training fold
    assert sum(by_name["best"]["notes"]["chosen_on_training_folds"].values()) == 4  # 2 repeats x 2 folds
    assert {"best", "best_baseline", "margin_over_baselines", "signal_ci_above_chance"} <= set(res["goals"])
    assert res["submission"]["detector"] == "best" and res["submission"]["saved"] == "detector"
    # Intervals and the memorisation test move whole pseudo-patient groups; every detector has its test.
    assert res["bootstrap"]["unit"] == "group" and res["bootstrap"]["groups"] == len(np.unique(data.groups[data.train]))
    for d in res["detectors"]:
        mem = d["memorisation"]
        assert mem["unit"] == "group" and mem["n_permutations"] == 2000 and 0 < mem["p_value"] <= 1
        assert mem["n_groups"] == res["bootstrap"]["groups"] and mem["evidence"] == (mem["p_value"] <= 0.05)
    assert res["goals"]["memorisation"]["detector"] == "best"
    assert res["goals"]["memorisation"]["verdict"] == by_name["best"]["memorisation"]["verdict"]

    # Test files: every unlabelled real image once, plain ids, in the ImageCLEF format (no header) and as scores.
    test_ids = sorted(p.stem for p in (sample_bench / "test" / "real_unknown").glob("*.png"))
    rows = list(csv.reader((out / "submission.csv").open()))
    assert sorted(r[0] for r in rows) == test_ids and {r[1] for r in rows} <= {"0", "1"}
    assert all(len(r) == 2 for r in rows)
    scores = list(csv.DictReader((out / "scores.csv").open()))
    assert [r["id"] for r in scores] == [r[0] for r in rows]
    dev = list(csv.DictReader((out / "dev_scores.csv").open()))
    assert len(dev) == res["data"]["labelled"] and set(names) <= set(dev[0])
    assert all(r["id"].startswith("dev/") for r in dev)

    # The saved detector is the submission's: same threshold, same scores and decisions on the test images.
    det = load_detector(out / "detector")
    assert det.name == "best" and det.threshold == pytest.approx(res["submission"]["threshold"])
    assert det.meta.split["train"] == [data.real_ids[i] for i in data.train]
    s = det.score(data.real, data.real_ids)  # the whole pool in one batch, as the harness scored it
    where = {i: r for r, i in enumerate(data.real_ids)}
    got = s.score[[where[r["id"]] for r in scores]]
    np.testing.assert_allclose(got, [float(r["score"]) for r in scores], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal((got >= det.threshold).astype(int), [int(r[1]) for r in rows])

    md = (out / "results.md").read_text()
    assert "AUC [95% CI]" in md and "best of (a)-(c)" in md and "chosen for test" in md
    assert "| signal" in md and "distribution" in md and "--model <out>/detector" in md
    assert "p (memorisation)" in md and "detectable AUC" in md and "resampling unit: whole groups" in md
    assert "as a population" in md and "not by memorisation of individual images" in md
    assert f"Memorisation test on best (signal {by_name['best']['signal']}" in md
    assert res["goals"]["memorisation"]["verdict"] in md
    flagged = sum(r[1] == "1" for r in rows)
    assert re.search(r"Decisions of `best` \(threshold on the training folds: max F1\): out of fold, first repeat, "
                     r"they flag \d+ of \d+ dev not-used images \(\d+%, wrongly accused; in \d+ of \d+ pseudo-patient "
                     r"groups, so with 95% confidence these fold thresholds flag at most \d+% of new not-used images "
                     r"like them\) and \d+ of \d+ used ones "
                     rf"\(\d+%\)\. `submission.csv` flags {flagged} of {len(rows)} test images\.", md)
    command = (out / "COMMAND.md").read_text()
    assert "fingerprint benchmark" in command and "--weights-dir none" in command and "Runtime:" in command


def test_fpr_threshold_caps_the_false_accusations(sample_bench: Path, data: FitData, tmp_path: Path) -> None:
    out = tmp_path / "fpr"
    assert cli.main(["benchmark", "--data", str(sample_bench), "--out", str(out), "--detectors", "pixel_l2",
                     "--submit", "pixel_l2", "--threshold-method", "fpr", "--target-fpr", "0.1", *TINY]) == 0
    det = load_detector(out / "detector")
    assert det.meta.threshold_method == "fpr"
    lab = data.train
    y = data.labels[lab]
    flags = det.decide(det.score([data.real[i] for i in lab], [data.real_ids[i] for i in lab]))
    assert flags[y == 0].mean() <= 0.1  # on the labels the threshold came from
    md = (out / "results.md").read_text()
    assert "thresholds fitted on the training folds (flagging at most 10% of the not-used images)" in md
    assert "Decisions of `pixel_l2` (threshold on the training folds: flagging at most 10%" in md
    assert "--threshold-method fpr" in (out / "COMMAND.md").read_text()


def test_harness_scores_are_the_protocols_and_members_are_shared(sample_bench: Path, data: FitData) -> None:
    config = BenchmarkConfig(data=str(sample_bench), detectors="pixel_l2,gradient_nn,domain_clf,ab_rank,best",
                             image_size=32, folds=2, repeats=2)
    lab = data.train
    y = data.labels[lab]
    splits = fpdata.repeated_group_kfold(y, data.groups[lab], n_splits=2, n_repeats=2, seed=0)
    fitted = Fitted(data, config)
    runs = {d.name: evaluate_detector(d, data, splits, 2, 1, fitted) for d in build_detectors(config)}

    # A label-free detector: fitted once through the protocol, its out-of-fold scores are its scores, and each
    # threshold comes from the training folds' labels only.
    plain = create_detector("pixel", {"metric": "l2", "k": 1, "image_size": 32})
    plain.fit(data)
    want = plain.score(data.real, data.real_ids)
    run = runs["pixel_l2"]
    np.testing.assert_array_equal(run.full_scores.score, want.score)
    for r in range(2):
        np.testing.assert_array_equal(run.oof[r], want.score[lab])
        for f, (tr, _) in enumerate(splits[2 * r : 2 * r + 2]):
            t = plain.choose_threshold(y[tr], want.take(lab[tr]), "max_f1", 0.05)
            assert run.thresholds[r][f] == pytest.approx(t)

    # The ensembles use the members fitted for the table; members the table lacks are fitted once, on demand.
    ab = runs["ab_rank"].detector
    assert isinstance(ab, RankEnsemble)
    assert [m is fitted.by_name[n] for m, n in zip(ab.members, ab.names, strict=True)] == [True, True]
    assert set(fitted.by_name) == {"pixel_l2", "gradient_nn", "domain_clf", "ab_rank", "pixel_ncc", "pixel_mass",
                                   "subspace_mass"}
    assert runs["best"].detector.learns and runs["best"].full_scores is None


def test_learning_detectors_read_only_training_fold_labels(sample_bench: Path, data: FitData) -> None:
    config = BenchmarkConfig(data=str(sample_bench), detectors="best", image_size=32)
    lab = data.train
    tr, te = fpdata.group_kfold(data.labels[lab], data.groups[lab], n_splits=2, seed=0)[0]
    flipped = data.labels.copy()
    flipped[lab[te]] = 1 - flipped[lab[te]]
    other = dataclasses.replace(data, labels=flipped)
    oof = []
    for d in (data, other):
        [best] = build_detectors(config)
        run = evaluate_detector(best, d, [(tr, te)], 1, 1, Fitted(d, config))
        oof.append(run.oof[0][te])
    np.testing.assert_array_equal(oof[0], oof[1])


def test_problems_name_the_flags(tmp_path: Path) -> None:
    cfg = BenchmarkConfig(data=str(tmp_path / "missing"), detectors="pixel,frozen", folds=1, submit="nope",
                          image_size=8)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    text = str(e.value)
    for expected in ("--data", "unknown pixel", "--weights-dir", "--folds", "--submit", "--image-size"):
        assert expected in text, expected
    assert BenchmarkConfig(detectors="a, e").requested() == [
        "pixel_l2", "pixel_ncc", "pixel_mass", "subspace_mass", "gradient_nn", "pixel_ncc_cal", "gradient_cal",
        "ssim_cal", "cal_ensemble", "domain_clf", "ab_rank", "best"]
    # The old name of gradient_nn is still accepted.
    old = BenchmarkConfig(data=str(tmp_path), detectors="grad_nn,domain_clf", submit="grad_nn")
    assert old.requested() == ["gradient_nn", "domain_clf"] and old.problems() == []
    # Named backbones must have a weights file in the folder.
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "resnet18.safetensors").write_bytes(b"")
    ok = BenchmarkConfig(data=str(tmp_path), detectors="c", weights_dir=str(weights), backbones="resnet18",
                         submit="frozen_resnet18")
    assert ok.problems() == []
    [frozen] = build_detectors(BenchmarkConfig(detectors="c", weights_dir=str(weights)))
    assert frozen.name == "frozen_resnet18" and family_of(frozen) == "c"
    assert frozen.meta.settings["weights"] == str(weights / "resnet18.safetensors")
    bad = BenchmarkConfig(data=str(tmp_path), detectors="c", weights_dir=str(weights), backbones="mobilenetv2_100",
                          submit="none")
    assert any("mobilenetv2_100" in p for p in bad.problems())


def test_command_line_reproduces_the_config(sample_bench: Path) -> None:
    cfg = BenchmarkConfig(data=str(sample_bench), out="x/y", detectors="a,e", repeats=2, skip_bad=True,
                          device="cpu")
    text = command_line(cfg)
    parser = argparse.ArgumentParser()
    add_arguments(parser, BenchmarkConfig)
    argv = text.replace("\\\n", " ").split()[2:]  # drop "fingerprint benchmark"
    assert from_args(BenchmarkConfig, parser.parse_args(argv)) == cfg


def test_no_signal_submission_is_flagged(data: FitData) -> None:
    # Random out-of-fold scores: the memorisation test finds nothing and the submission is flagged.
    lab = data.train
    y, groups = data.labels[lab], data.groups[lab]
    rng = np.random.default_rng(0)
    runs = []
    for name, scores in (("pixel_l2", rng.normal(size=y.size)), ("best", y + 0.01 * rng.normal(size=y.size))):
        det = named(*preset(name, BenchmarkConfig()), name)
        run = Run(det, [scores], [(scores > 0).astype(np.int64)], [[0.0]], 0.0)
        summarise(run, y, 50, 0, groups=groups)
        runs.append(run)
    noise, signal = runs
    assert noise.memorisation.unit == "group" and noise.memorisation.n_groups == len(np.unique(groups))
    g = goals(runs, "best", submitted="pixel_l2")
    assert g["memorisation"]["detector"] == "pixel_l2" and g["memorisation"]["submitted"]
    assert g["memorisation"]["p_value"] == noise.memorisation.p_value
    assert noise.memorisation.p_value > 0.05 and not g["memorisation"]["evidence"]
    warning = memorisation_warning(g)
    assert warning.startswith("WARNING: pixel_l2 shows no evidence of memorisation")
    assert "submission's per-image decisions" in warning and "not supported by evidence" in warning
    assert f"reliably (80% power) only from AUC {noise.memorisation.detectable_auc:.2f}" in warning
    # Perfectly separating scores: as much evidence as the groups allow, and no warning.
    assert signal.memorisation.auc == 1.0
    assert goals(runs, "best")["memorisation"]["detector"] == "best"
    fake = {"memorisation": {**signal.memorisation.to_dict(), "detector": "best", "evidence": True}}
    assert memorisation_warning(fake) is None and memorisation_warning({}) is None
