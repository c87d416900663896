"""The backbone sweep through Ray Tune (one TorchTrainer per trial) and the demo's whole loop, on a real local Ray
with a real sqlite MLflow store."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient
from ray_fixtures import ray_local  # noqa: F401  (fixture)

from fingerprint.config import ConfigError
from jobs import demo, registry, sweep
from jobs.train_ray import REGISTERED_TAG


def test_grid_and_names(tmp_path):
    cfg = sweep.SweepConfig(data=str(tmp_path), backbones="resnet18, mobilenetv2_100,resnet18", lrs="1e-4,3e-4",
                            embed_dims="16")
    grid = cfg.grid()
    assert grid == {"backbone": ["resnet18", "mobilenetv2_100"], "lr": [1e-4, 3e-4], "margin": [0.5],
                    "embed_dim": [16]}
    name = sweep.default_sweep_name(cfg)
    assert name == sweep.default_sweep_name(cfg) and name.startswith("sweep-")
    assert name != sweep.default_sweep_name(sweep.SweepConfig(data=str(tmp_path), backbones="resnet18"))
    assert sweep.trial_name(name, {"backbone": "resnet18", "lr": 3e-4, "margin": 0.5, "embed_dim": 16}) == \
        f"{name}-resnet18-lr0.0003-m0.5-d16"
    with pytest.raises(ConfigError) as e:
        sweep.main(sweep.SweepConfig(data=str(tmp_path), backbones=" ", lrs="fast", run_name="x"))
    assert "--lrs" in str(e.value) and "--run-name" in str(e.value)
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "mobilenetv2_100.safetensors").write_bytes(b"")
    assert sweep.weights_for("mobilenetv2_100", str(weights), "none") == str(weights / "mobilenetv2_100.safetensors")
    assert sweep.weights_for("resnet18", str(weights), "none") == "none"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_sweep_runs_each_backbone_tracks_nested_runs_and_resumes(sample_bench, tiny_train_kwargs, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = sweep.SweepConfig(data=str(sample_bench), out=str(tmp_path / "out"), storage_path=str(tmp_path / "ray"),
                            tracking_uri=uri, backbones="resnet18,mobilenetv2_100", num_workers=2,
                            **{**tiny_train_kwargs, "epochs": 1})
    result = sweep.main(cfg)
    assert [t["backbone"] for t in result.trials] == ["mobilenetv2_100", "resnet18"]
    assert all(t["status"] == "ok" and t["version"] for t in result.trials)

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fingerprint-sample")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(t["name"] for t in result.trials)
    assert {r.data.params["backbone"] for r in children} == {"resnet18", "mobilenetv2_100"}
    assert {r.data.tags[REGISTERED_TAG] for r in children} == {"1", "2"}
    challenger = registry.get_alias("fingerprint-sample", "challenger")
    assert challenger.version == result.best["version"]
    assert registry.version_metrics(challenger)["val_auc"] == pytest.approx(result.best["metric"])
    assert (tmp_path / "out" / f"{result.sweep_name}.md").is_file()

    # the same command restores the finished sweep: same names, nothing retrained or registered twice
    t0 = time.perf_counter()
    again = sweep.main(cfg)
    assert again.sweep_name == result.sweep_name and again.parent_run_id == result.parent_run_id
    assert [t["version"] for t in again.trials] == [t["version"] for t in result.trials]
    assert len(client.search_model_versions("name='fingerprint-sample'")) == 2
    assert time.perf_counter() - t0 < 60


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_demo_end_to_end_with_one_backbone(tmp_path, capsys):
    out = demo.main(demo.DemoConfig(out=str(tmp_path / "demo"), backbones="resnet18", image_size=32, epochs=1,
                                    triplets_per_epoch=32, patients=8))
    assert out.champion == "1"
    lines = out.submission.read_text().splitlines()
    assert lines and all(line.split(",")[1] in ("0", "1") for line in lines)
    assert (tmp_path / "demo" / "evaluate" / "metrics.md").is_file() and 0 <= out.metrics["auc"] <= 1
    printed = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri sqlite:///" in printed and "alias history" in printed
