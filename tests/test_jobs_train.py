"""Ray Train job on a real local Ray with a real sqlite MLflow store: train, track, register the triplet detector
(an MLflow pyfunc), resume."""

from __future__ import annotations

import base64
import dataclasses
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from ray_fixtures import ray_local  # noqa: F401  (fixture)

from fingerprint.config import ConfigError, field_docs
from fingerprint.data.images import load_image
from fingerprint.detectors import load_detector
from fingerprint.detectors.triplet.checkpoint import load_checkpoint
from jobs import registry, train_ray
from jobs.train_ray import RayTrainConfig


def test_config_problems_name_flags(tmp_path):
    cfg = RayTrainConfig(data=str(tmp_path), num_workers=0, min_workers=3, cpus_per_worker=0, max_failures=-2,
                         run_name="bad name", device="cuda")
    with pytest.raises(ConfigError) as e:
        train_ray.main(cfg)
    text = str(e.value)
    for f in ("--num-workers", "--min-workers", "--cpus-per-worker", "--max-failures", "--run-name", "--device"):
        assert f in text
    docs = field_docs(RayTrainConfig)
    assert "storage" in docs["storage_path"] and docs["backbone"]  # inherited fields keep their --help text


def test_run_names_are_stable_and_follow_the_settings(tmp_path):
    a = train_ray.resolved(RayTrainConfig(data=str(tmp_path / "bench"), backbone="resnet18", out="x"))
    b = train_ray.resolved(RayTrainConfig(data=str(tmp_path / "bench"), backbone="resnet18", out="y",
                                          storage_path="elsewhere", max_failures=5))
    c = train_ray.resolved(RayTrainConfig(data=str(tmp_path / "bench"), backbone="resnet18", lr=3e-4))
    assert a.run_name == b.run_name != c.run_name and a.run_name.startswith("resnet18-")
    assert a.experiment == a.registered_model == "fingerprint-bench"
    assert a.tracking_uri == f"sqlite:///{(tmp_path.cwd() / 'mlflow.db').resolve()}"


@pytest.mark.ray
@pytest.mark.usefixtures("ray_local")
def test_an_unmeetable_decision_rule_is_refused_before_any_run(sample_bench, tiny_train_kwargs, tmp_path):
    cfg = train_ray.resolved(RayTrainConfig(
        data=str(sample_bench), out=str(tmp_path / "out"), storage_path=str(tmp_path / "ray"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", threshold_method="fpr_bound", **tiny_train_kwargs))
    with pytest.raises(ValueError, match=r"fpr_bound: .* at least 59 groups"):
        train_ray.run_training(cfg)  # before Ray Train or MLflow are touched: neither is started here
    assert not any(tmp_path.iterdir())


def test_train_ray_tracks_registers_and_resumes(sample_bench, tiny_train_kwargs, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = RayTrainConfig(data=str(sample_bench), out=str(tmp_path / "out"), storage_path=str(tmp_path / "ray"),
                         tracking_uri=uri, num_workers=2, **tiny_train_kwargs)
    out = train_ray.main(cfg)

    # checkpoint (internal) and the triplet detector built from it (what is registered), on the shared split
    ckpt = load_checkpoint(out.checkpoint)
    assert ckpt.meta["config"]["num_workers"] == 2
    assert out.metrics["world_size"] == 2 and 0 <= out.metrics["val_auc"] <= 1
    det = load_detector(out.detector)
    assert det.kind == "triplet" and det.settings.backbone == "resnet18" and det.meta.split["val"]
    assert out.detector_metrics == det.meta.metrics and 0 <= det.meta.metrics["val_auc"] <= 1
    # the selected epoch's reported val_auc is the same detector's, validated the same way
    assert out.metrics["val_auc"] == pytest.approx(det.meta.metrics["val_auc"], abs=1e-6)
    run_dir = tmp_path / "out" / out.run_name
    for name in ("training_curves.png", "val_roc.png", "val_scores.png", "val_confusion.png", "val_evidence.png",
                 "split.json", "history.json"):
        assert (run_dir / name).stat().st_size > 0, name
    assert len(json.loads((run_dir / "history.json").read_text())) == 2  # the whole run, not just the epoch kept

    # MLflow: one experiment per dataset, full config as params, per-epoch metrics, reports, model version
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fingerprint-sample")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == out.run_name and run.info.status == "FINISHED"
    assert run.data.params["backbone"] == "resnet18" and run.data.params["num_workers"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1]
    # val_auc: rank 0's per epoch, then the registered detector's (linked to its LoggedModel) after the last one
    val_auc = sorted(client.get_metric_history(run.info.run_id, "val_auc"), key=lambda m: m.step)
    assert [m.step for m in val_auc] == [0, 1, 2] and val_auc[-1].value == pytest.approx(det.meta.metrics["val_auc"])
    model_id = client.get_model_version("fingerprint-sample", "1").source.removeprefix("models:/")
    assert {m.key: m.value for m in client.get_logged_model(model_id).metrics}["val_auc"] == val_auc[-1].value
    reports = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/val_roc.png", "reports/val_evidence.png", "reports/split.json"} <= reports
    assert "config.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert out.model_version == "1" and run.data.tags[registry.SPLIT_TAG]
    challenger = registry.get_alias("fingerprint-sample", "challenger")
    assert challenger.version == "1" and challenger.run_id == run.info.run_id
    assert challenger.tags["kind"] == "triplet" and challenger.tags["backbone"] == "resnet18"
    assert registry.version_metrics(challenger)["val_auc"] == pytest.approx(det.meta.metrics["val_auc"])
    assert challenger.tags[registry.SPLIT_TAG] == registry.split_digest(det.meta.split)

    # the registered pyfunc scores images as the detector folder does
    files = sorted((sample_bench / "test" / "real_unknown").glob("*.png"))[:3]
    ids = [f.stem for f in files]
    mlflow.set_tracking_uri(uri)
    try:
        got = mlflow.pyfunc.load_model("models:/fingerprint-sample/1").predict(
            pd.DataFrame({"id": ids, "image": [base64.b64encode(f.read_bytes()).decode() for f in files]}))
    finally:
        mlflow.set_tracking_uri(None)
    want = det.score([load_image(f) for f in files], ids)
    np.testing.assert_allclose(got["score"].to_numpy(dtype=float), want.score, rtol=0, atol=1e-6)

    # the same settings again (another output folder) resume the finished run: no new epochs, no twin version,
    # same MLflow run, whose params keep their first values
    again = train_ray.main(dataclasses.replace(cfg, out=str(tmp_path / "out2")))
    assert (tmp_path / "out2" / out.run_name / "checkpoint" / "model.pt").is_file()
    assert (tmp_path / "out2" / out.run_name / "detector" / "meta.json").is_file()
    assert client.get_run(run.info.run_id).data.params["out"] == str(tmp_path / "out")
    assert again.run_name == out.run_name and again.model_version == "1"
    assert again.mlflow_run_id == run.info.run_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1]
    assert len(client.search_model_versions("name='fingerprint-sample'")) == 1
