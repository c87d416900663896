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
def test_demo_sweeps_backbones_promotes_predicts_and_resumes(tmp_path, capsys):
    """The main job with two backbones: a Tune sweep of TorchTrainers, nested MLflow runs, a version per trial,
    the best as challenger then champion, predictions on the test part scored against its labels; run twice."""
    cfg = demo.DemoConfig(out=str(tmp_path / "demo"), backbones="resnet18,mobilenetv2_100", image_size=32,
                          epochs=1, triplets_per_epoch=32, patients=8)
    out = demo.main(cfg)
    printed = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri sqlite:///" in printed and "alias history" in printed

    # the sweep: one nested MLflow run and one registered version per backbone, the best one is challenger
    client = MlflowClient(out.tracking_uri)
    exp = client.get_experiment_by_name("fingerprint-sample")
    (parent,) = client.search_runs([exp.experiment_id], "tags.sweep != '' and params.n_trials = '2'")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.data.params["backbone"] for r in children} == {"resnet18", "mobilenetv2_100"}
    assert {r.data.tags[REGISTERED_TAG] for r in children} == {"1", "2"}
    best = max(children, key=lambda r: (r.data.metrics["selected_val_auc"], r.data.tags[REGISTERED_TAG]))
    challenger = registry.get_alias("fingerprint-sample", "challenger")
    assert registry.version_metrics(challenger)["val_auc"] == pytest.approx(best.data.metrics["selected_val_auc"])

    # promotion made it champion (the first one), and predictions + evaluation used it
    assert out.champion == challenger.version
    assert [e["alias"] for e in registry.alias_history("fingerprint-sample")] == ["challenger", "champion"]
    lines = out.submission.read_text().splitlines()
    assert len(lines) > 4 and all(line.split(",")[1] in ("0", "1") for line in lines)
    assert (tmp_path / "demo" / "evaluate" / "metrics.md").is_file() and 0 <= out.metrics["auc"] <= 1
    assert sorted(p.name for p in (tmp_path / "demo" / "sweep").glob("*.md")) == [f"{parent.info.run_name}.md"]

    # the same command again: the sweep is restored (nothing retrained or registered), promotion has nothing to do
    t0 = time.perf_counter()
    again = demo.main(cfg)
    assert again.champion == out.champion
    assert len(client.search_model_versions("name='fingerprint-sample'")) == 2
    assert len(client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 2
    assert [e["alias"] for e in registry.alias_history("fingerprint-sample")] == ["challenger", "champion"]
    assert "nothing to do" in capsys.readouterr().out
    assert time.perf_counter() - t0 < 90
