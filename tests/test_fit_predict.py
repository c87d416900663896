"""`fingerprint fit` then `predict` and `evaluate` for kinds other than the triplet model, through mains and CLI."""

import csv
import json
import shutil

import pytest

from fingerprint.commands import cli
from fingerprint.commands import evaluate as evaluate_cmd
from fingerprint.commands import fit as fit_cmd
from fingerprint.commands import predict as predict_cmd
from fingerprint.config import ConfigError
from fingerprint.data.imagesets import load_fit_data
from fingerprint.detectors import load_detector


@pytest.fixture(scope="module")
def fitted(sample_bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "best"
    det = fit_cmd.main(fit_cmd.FitConfig(data=str(sample_bench), out=str(out), preset="best"))
    return out, det


def test_fit_saves_a_detector_with_validation_metrics_on_a_locked_split(fitted, sample_bench, tmp_path):
    out, det = fitted
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "selected_ensemble" and meta["extra"]["name"] == "best"
    assert set(meta["extra"]["chosen"]) <= {"pixel_ncc", "pixel_mass", "subspace_mass", "gradient_nn", "domain_clf"}
    assert json.loads((out / "metrics.json").read_text()) == meta["metrics"] and "val_auc" in meta["metrics"]
    # Another kind with the same --val-fraction and --seed is validated on exactly the same images.
    other = fit_cmd.main(fit_cmd.FitConfig(data=str(sample_bench), out=str(tmp_path / "pix"), preset="pixel_ncc"))
    assert other.meta.split == det.meta.split
    assert set(det.meta.split["train"]).isdisjoint(det.meta.split["val"])
    # What the threshold did to the training not-used images is saved with it and loads back typed.
    fp = load_detector(out).meta.false_positives
    assert fp == det.meta.false_positives and meta["false_positives"]["bound"] == fp.bound >= fp.rate
    # 'best' chooses its members on the training labels: its record comes from the held-out images instead.
    assert fp.held_out and not fp.in_sample and fp.threshold == det.threshold
    cfg = fit_cmd.FitConfig()
    data = load_fit_data(str(sample_bench), cfg.val_fraction, cfg.seed)
    assert fp.not_used == int((data.labels[data.val] == 0).sum()) > 0
    # A detector saved before the record existed still loads, without one.
    old = tmp_path / "old"
    shutil.copytree(out, old)
    meta.pop("false_positives")
    (old / "meta.json").write_text(json.dumps(meta))
    assert load_detector(old).meta.false_positives is None


def test_fit_with_a_bounded_false_positive_rate_or_a_clear_refusal(sample_bench, tmp_path, capsys):
    base = ["fit", "--data", str(sample_bench), "--preset", "pixel_l2", "--threshold-method", "fpr_bound"]
    det = fit_cmd.main(fit_cmd.FitConfig(data=str(sample_bench), out=str(tmp_path / "a"), preset="pixel_l2",
                                         threshold_method="fpr_bound", target_fpr=0.7))
    assert det.meta.threshold_method == "fpr_bound" and det.meta.false_positives.bound <= 0.7
    assert "with 95% confidence its false-positive rate" in capsys.readouterr().out
    # The sample's few not-used patients cannot show 5%: the error says how many it would take, and nothing is saved.
    assert cli.main([*base, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "--threshold-method fpr_bound" in err and "at least 59 groups" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_predict_and_evaluate_any_kind(fitted, sample_bench, tmp_path):
    out, _ = fitted
    sub = predict_cmd.main(predict_cmd.PredictConfig(model=str(out), data=str(sample_bench), out=str(tmp_path)))
    ids = sorted(p.stem for p in (sample_bench / "test" / "real_unknown").glob("*.png"))
    assert sorted(line.split(",")[0] for line in sub.read_text().splitlines()) == ids
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    gallery = set(load_detector(out).gallery_ids)
    assert all(set(r["nearest_ids"].split(";")) <= gallery for r in rows)
    assert (tmp_path / "evidence.png").stat().st_size > 0
    res = evaluate_cmd.main(evaluate_cmd.EvaluateConfig(
        scores=str(tmp_path / "scores.csv"), labels=str(sample_bench / "test_labels.csv"),
        out=str(tmp_path / "eval"), n_boot=200))
    # The sample generator memorises strongly: a working detector separates its test images.
    assert res["auc"][0] > 0.9


def test_predict_reindexes_on_other_generated_images(sample_bench, tmp_path):
    det = fit_cmd.main(fit_cmd.FitConfig(data=str(sample_bench), out=str(tmp_path / "g"), preset="gradient_nn"))
    test_only = tmp_path / "test_only"
    shutil.copytree(sample_bench / "test", test_only)
    for p in sorted((test_only / "generated").glob("*.png"))[::2]:
        p.unlink()
    predict_cmd.main(predict_cmd.PredictConfig(model=str(tmp_path / "g"), data=str(test_only), out=str(tmp_path / "p")))
    kept = {p.stem for p in (test_only / "generated").glob("*.png")}
    rows = list(csv.DictReader((tmp_path / "p" / "scores.csv").open()))
    assert {i for r in rows for i in r["nearest_ids"].split(";")} <= kept
    assert len(det.gallery_ids) > len(kept)


def test_fit_settings_errors_name_the_field(sample_bench, tmp_path):
    with pytest.raises(ConfigError, match="--k"):
        fit_cmd.main(fit_cmd.FitConfig(data=str(sample_bench), out=str(tmp_path), kind="pixel", settings='{"k": 0}'))
    with pytest.raises(ConfigError, match="unknown setting"):
        fit_cmd.main(fit_cmd.FitConfig(data=str(sample_bench), out=str(tmp_path), kind="pixel",
                                       settings='{"colour": 1}'))
    with pytest.raises(ConfigError, match="--kind: unknown kind 'nope'; known: .*triplet"):
        fit_cmd.main(fit_cmd.FitConfig(data=str(sample_bench), out=str(tmp_path), kind="nope"))
    with pytest.raises(ConfigError, match="--settings"):
        fit_cmd.main(fit_cmd.FitConfig(data=str(sample_bench), out=str(tmp_path), settings="[1]"))
    assert not any(tmp_path.iterdir())


def test_cli_fit_and_predict_errors_without_traceback(sample_bench, tmp_path, capsys):
    code = cli.main(["fit", "--data", str(sample_bench), "--preset", "nope", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "--preset" in err and "Traceback" not in err
    code = cli.main(["predict", "--model", str(tmp_path), "--data", str(sample_bench)])
    err = capsys.readouterr().err
    assert code == 2 and "--model" in err and "no saved detector" in err


def test_predict_checks_the_output_folder_before_working(fitted, sample_bench, tmp_path):
    out, _ = fitted
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="--out"):
        predict_cmd.main(predict_cmd.PredictConfig(model=str(out), data=str(sample_bench), out=str(blocker / "o")))
