"""`fingerprint benchmark` end to end on a tiny phantom benchmark (every detector family, tiny settings), its
flag validation, and the command it records."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fingerprint import cli
from fingerprint.benchmark import BenchmarkConfig, build_detectors, command_line, load_pool
from fingerprint.config import ConfigError, add_arguments, from_args, validate
from fingerprint.phantoms import make_sample_dataset


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "tiny"
    make_sample_dataset(root, n_patients=12, slices_per_patient=3, size=32, n_generated_dev=30,
                        n_generated_test=30, n_reference_patients=6, memorisation=0.95, seed=1)
    return root


TINY = ["--image-size", "32", "--folds", "2", "--repeats", "2", "--n-boot", "50", "--backbones", "resnet18",
        "--weights-dir", "none", "--frozen-image-size", "32", "--train-image-size", "32", "--epochs", "1",
        "--triplets-per-epoch", "8", "--batch-size", "4", "--device", "cpu"]


def test_benchmark_end_to_end(bench: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    assert cli.main(["benchmark", "--data", str(bench), "--out", str(out), *TINY]) == 0
    for name in ("results.md", "results.json", "roc.png", "roc_log.png", "dev_scores.csv", "submission.csv",
                 "scores.csv", "COMMAND.md"):
        assert (out / name).is_file(), name

    res = json.loads((out / "results.json").read_text())
    names = [d["name"] for d in res["detectors"]]
    assert names == ["pixel_l2", "pixel_ncc", "ssim", "frozen_resnet18", "triplet_resnet18", "pixel_mass",
                     "subspace_mass", "grad_nn", "domain_clf", "ab_rank", "best"]
    reps = {d["name"]: len(d["per_repeat"]) for d in res["detectors"]}
    assert reps["triplet_resnet18"] == 1 and reps["best"] == 2 and reps["ssim"] == 2  # --trained-repeats 1
    for d in res["detectors"]:
        point, low, high = d["metrics"]["auc"]
        assert 0 <= low <= high <= 1 and 0 <= point <= 1
        assert len(d["thresholds"][0]) == 2  # one threshold per training fold
    best = next(d for d in res["detectors"] if d["name"] == "best")
    assert sum(best["notes"]["chosen_on_training_folds"].values()) == 4  # 2 repeats x 2 folds
    assert {"best", "best_baseline", "margin_over_baselines", "signal_ci_above_chance"} <= set(res["goals"])
    assert res["submission"]["detector"] == "best"

    # Test files: every unlabelled real image once, in the ImageCLEF format (no header) and as scores.
    test_ids = sorted(p.stem for p in (bench / "test" / "real_unknown").glob("*.png"))
    rows = list(csv.reader((out / "submission.csv").open()))
    assert sorted(r[0] for r in rows) == test_ids and {r[1] for r in rows} <= {"0", "1"}
    assert all(len(r) == 2 for r in rows)
    scores = list(csv.DictReader((out / "scores.csv").open()))
    assert [r["id"] for r in scores] == [r[0] for r in rows]
    assert all(np.isfinite(float(r["score"])) for r in scores)
    dev = list(csv.DictReader((out / "dev_scores.csv").open()))
    assert len(dev) == res["data"]["labelled"] and set(names) <= set(dev[0])

    md = (out / "results.md").read_text()
    assert "AUC [95% CI]" in md and "best of (a)-(c)" in md and "chosen for test" in md
    command = (out / "COMMAND.md").read_text()
    assert "fingerprint benchmark" in command and "--weights-dir none" in command and "Runtime:" in command


def test_problems_name_the_flags(tmp_path: Path) -> None:
    cfg = BenchmarkConfig(data=str(tmp_path / "missing"), detectors="pixel,frozen", folds=1, submit="nope",
                          image_size=8)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    text = str(e.value)
    for expected in ("--data", "unknown pixel", "--weights-dir", "--folds", "--submit", "--image-size"):
        assert expected in text, expected
    assert BenchmarkConfig(detectors="a, e").requested() == ["pixel_l2", "pixel_ncc", "pixel_mass", "subspace_mass",
                                                              "grad_nn", "domain_clf", "ab_rank", "best"]
    # Named backbones must have a weights file in the folder.
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "resnet18.safetensors").write_bytes(b"")
    ok = BenchmarkConfig(data=str(tmp_path), detectors="c", weights_dir=str(weights), backbones="resnet18",
                         submit="frozen_resnet18")
    assert ok.problems() == []
    assert [d.name for d in build_detectors(BenchmarkConfig(detectors="c", weights_dir=str(weights)))] == [
        "frozen_resnet18"]
    bad = BenchmarkConfig(data=str(tmp_path), detectors="c", weights_dir=str(weights), backbones="mobilenetv2_100",
                          submit="none")
    assert any("mobilenetv2_100" in p for p in bad.problems())


def test_command_line_reproduces_the_config(bench: Path) -> None:
    cfg = BenchmarkConfig(data=str(bench), out="x/y", detectors="a,e", repeats=2, skip_bad=True, device="cpu")
    text = command_line(cfg)
    parser = argparse.ArgumentParser()
    add_arguments(parser, BenchmarkConfig)
    argv = text.replace("\\\n", " ").split()[2:]  # drop "fingerprint benchmark"
    assert from_args(BenchmarkConfig, parser.parse_args(argv)) == cfg


def test_pool_puts_labelled_images_first(bench: Path) -> None:
    loaded = load_pool(BenchmarkConfig(data=str(bench), image_size=32))
    pool = loaded.pool
    lab = pool.labelled
    assert lab.tolist() == list(range(len(lab)))  # dev used + not_used, then the unlabelled test images
    assert loaded.n_test == int((pool.labels < 0).sum()) > 0
    assert pool.real.shape[1:] == (32, 32) and pool.generated_source.tolist().count(0) == 30
    assert "average-linkage" in loaded.groups_from
