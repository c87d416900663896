"""Train, predict and evaluate end to end on tiny synthetic data, through the typed mains and the CLI."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fingerprint.commands import cli
from fingerprint.commands import evaluate as evaluate_cmd
from fingerprint.commands import predict as predict_cmd
from fingerprint.commands import train as train_cmd
from fingerprint.config import ConfigError, TrainConfig, field_docs
from fingerprint.detectors import load_detector
from fingerprint.detectors.triplet.checkpoint import load_checkpoint, load_training_state
from fingerprint.detectors.triplet.training import fit, load_training_data


@pytest.fixture(scope="module")
def trained(sample_bench, tiny_train_kwargs, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    ckpt = train_cmd.main(TrainConfig(data=str(sample_bench), out=str(out), **tiny_train_kwargs))
    return out, ckpt


def test_train_writes_detector_checkpoint_config_and_pictures(trained):
    out, detector = trained
    assert detector == out / "detector"
    meta = json.loads((detector / "meta.json").read_text())
    assert meta["kind"] == "triplet" and meta["settings"]["backbone"] == "resnet18"
    assert meta["extra"]["data_config"]["input_size"] == [1, 32, 32]
    assert set(meta["split"]) == {"train", "val"} and not set(meta["split"]["train"]) & set(meta["split"]["val"])
    assert 0.0 <= meta["metrics"]["val_auc"] <= 1.0
    ckpt = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert ckpt["epoch"] == 1 and ckpt["config"]["backbone"] == "resnet18"
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2 and all(0.0 <= h["active_fraction"] <= 1.0 for h in history)
    assert all(np.isfinite(h["loss"]) for h in history)
    for name in ("training_curves.png", "val_roc.png", "val_scores.png", "val_evidence.png", "config.json"):
        assert (out / name).stat().st_size > 0
    assert load_checkpoint(out / "checkpoint").threshold == meta["threshold"]
    assert load_detector(detector).threshold == meta["threshold"]


def test_predict_writes_submission_and_scores(trained, sample_bench, tmp_path):
    out, _ = trained
    sub = predict_cmd.main(predict_cmd.PredictConfig(model=str(out), data=str(sample_bench), out=str(tmp_path)))
    lines = sub.read_text().splitlines()
    ids = sorted(p.stem for p in (sample_bench / "test" / "real_unknown").glob("*.png"))
    assert sorted(line.split(",")[0] for line in lines) == ids
    assert {line.split(",")[1] for line in lines} <= {"0", "1"}
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert list(rows[0]) == ["id", "score", "decision", "nearest_ids", "nearest_similarities"]
    assert len(rows[0]["nearest_ids"].split(";")) == 3
    sims = [float(v) for v in rows[0]["nearest_similarities"].split(";")]
    assert sims == sorted(sims, reverse=True)
    jsonl = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [r["id"] for r in jsonl] == [r["id"] for r in rows] and jsonl[0]["kind"] == "triplet"
    assert jsonl[0]["nearest_ids"] == rows[0]["nearest_ids"].split(";")

    res = evaluate_cmd.main(evaluate_cmd.EvaluateConfig(
        scores=str(tmp_path / "scores.csv"), labels=str(sample_bench / "test_labels.csv"),
        out=str(tmp_path / "eval"), n_boot=200))
    for key in ("auc", "f1", "accuracy", "kappa", "tpr_at_1fpr"):
        point, low, high = res[key]
        assert low <= point <= high or key.startswith("tpr")
    assert (tmp_path / "eval" / "roc.png").stat().st_size > 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["auc"][0] == res["auc"][0]


def test_resume_continues_after_saved_epoch(sample_bench, tiny_train_kwargs, tmp_path):
    cfg = TrainConfig(data=str(sample_bench), out=str(tmp_path), **{**tiny_train_kwargs, "epochs": 3})
    data = load_training_data(cfg)
    saved = []
    full = fit(cfg, data, on_epoch=lambda e: saved.append(e.save(tmp_path / f"ep{e.epoch}")))
    state = load_training_state(tmp_path / "ep0")
    resumed_epochs = []
    resumed = fit(cfg, data, resume=state, on_epoch=lambda e: resumed_epochs.append(e.epoch))
    assert resumed_epochs == [1, 2]
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    # Same seeds, same triplets per (epoch, index): resuming reproduces the uninterrupted run.
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-4)


def test_config_errors_name_every_flag(tmp_path):
    bad = TrainConfig(data=str(tmp_path / "missing"), epochs=0, lr=-1, k=0, weights=str(tmp_path / "w.pt"))
    with pytest.raises(ConfigError) as e:
        from fingerprint.config import validate
        validate(bad)
    text = str(e.value)
    for f in ("--data", "--epochs", "--lr", "--k", "--weights"):
        assert f in text


def test_every_flag_has_help():
    docs = field_docs(TrainConfig)
    assert set(docs) == set(TrainConfig.__dataclass_fields__)
    assert all(len(d) > 10 for d in docs.values())
    for name in ("train", "predict", "evaluate", "sample-data"):
        out = subprocess.run([sys.executable, "-m", "fingerprint.commands.cli", name, "--help"], capture_output=True,
                             text=True, check=True).stdout
        assert "--out" in out


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    (tmp_path / "dev" / "used").mkdir(parents=True)
    code = cli.main(["train", "--data", str(tmp_path / "nope"), "--weights", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "--data" in err and "Traceback" not in err
    code = cli.main(["predict", "--model", str(tmp_path), "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
