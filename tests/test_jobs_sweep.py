"""The sweep over detector kinds through Ray Tune (a TorchTrainer per triplet trial, a Ray task per other kind),
`fingerprint fit-ray`, and the demo's whole loop, on a real local Ray with a real sqlite MLflow store."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from ray_fixtures import ray_local  # noqa: F401  (fixture)

from fingerprint.config import ConfigError
from fingerprint.detectors import load_detector
from jobs import demo, fit_ray, registry, sweep
from jobs.train_ray import REGISTERED_TAG


def test_specs_and_names(tmp_path):
    cfg = sweep.SweepConfig(data=str(tmp_path), presets="triplet,frozen,pixel_ncc,triplet",
                            backbones="resnet18, mobilenetv2_100,resnet18", lrs="1e-4,3e-4", embed_dims="16")
    specs = cfg.specs()
    assert [s["trial"] for s in specs] == [
        "triplet-resnet18-lr0.0001-m0.5-d16", "triplet-resnet18-lr0.0003-m0.5-d16",
        "triplet-mobilenetv2_100-lr0.0001-m0.5-d16", "triplet-mobilenetv2_100-lr0.0003-m0.5-d16",
        "frozen-resnet18", "frozen-mobilenetv2_100", "pixel_ncc"]
    assert [s["mode"] for s in specs] == ["train"] * 4 + ["task"] * 3
    assert specs[-1]["kind"] == "pixel" and specs[-1]["settings"] == {"metric": "ncc", "k": 1}
    name = sweep.default_sweep_name(cfg)
    assert name == sweep.default_sweep_name(cfg) and name.startswith("sweep-")
    assert name != sweep.default_sweep_name(sweep.SweepConfig(data=str(tmp_path), presets="pixel_ncc"))
    assert sweep.trial_name(name, specs[1]) == f"{name}-triplet-resnet18-lr0.0003-m0.5-d16"
    with pytest.raises(ConfigError) as e:
        sweep.main(sweep.SweepConfig(data=str(tmp_path), presets="triplet,nope", lrs="fast", run_name="x"))
    text = str(e.value)
    assert "--lrs" in text and "--run-name" in text and "--presets: unknown nope" in text
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "mobilenetv2_100.safetensors").write_bytes(b"")
    assert sweep.weights_for("mobilenetv2_100", str(weights), "none") == str(weights / "mobilenetv2_100.safetensors")
    assert sweep.weights_for("resnet18", str(weights), "none") == "none"
    with pytest.raises(ConfigError, match="--presets: unknown preset 'nope'"):
        fit_ray.main(fit_ray.FitRayConfig(data=str(tmp_path), presets="pixel_ncc,nope"))


@pytest.mark.ray
@pytest.mark.usefixtures("ray_local")
def test_fit_ray_fits_tasks_tracks_registers_and_reuses(sample_bench, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = fit_ray.FitRayConfig(data=str(sample_bench), presets="pixel_ncc,gradient_nn", out=str(tmp_path / "out"),
                               tracking_uri=uri)
    rows = fit_ray.main(cfg)
    assert sorted(r["kind"] for r in rows) == ["gradient", "pixel"]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fingerprint-sample")
    runs = client.search_runs([exp.experiment_id])
    assert {r.data.params["kind"] for r in runs} == {"pixel", "gradient"}
    pixel = next(r for r in runs if r.data.params["kind"] == "pixel")
    assert pixel.data.params["settings.metric"] == "ncc" and "val_auc" in pixel.data.metrics
    versions = client.search_model_versions("name='fingerprint-sample'")
    assert len(versions) == 2 and len({v.tags[registry.SPLIT_TAG] for v in versions}) == 1  # one locked split
    for r in rows:
        assert load_detector(r["path"]).meta.metrics == pytest.approx(r["metrics"])
    best = max(rows, key=lambda r: r["metrics"]["val_auc"])
    assert registry.get_alias("fingerprint-sample", "challenger").version == best["version"]
    assert "best:" in capsys.readouterr().out

    # the same command again reuses the registered detectors: no refit, no new version
    again = fit_ray.main(cfg)
    assert all(r.get("reused") for r in again)
    assert len(client.search_model_versions("name='fingerprint-sample'")) == 2


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_demo_sweeps_kinds_promotes_predicts_and_resumes(tmp_path, capsys):
    """The main job: a Tune sweep over a triplet (Ray Train) and two label-free kinds (Ray tasks), nested MLflow
    runs, a version per trial, the best as challenger then champion, predictions on the test part scored against
    its labels; run twice."""
    cfg = demo.DemoConfig(out=str(tmp_path / "demo"), presets="triplet,pixel_ncc,gradient_nn", backbones="resnet18",
                          image_size=32, epochs=1, triplets_per_epoch=32, patients=8)
    out = demo.main(cfg)
    printed = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri sqlite:///" in printed and "alias history" in printed
    assert "mlflow models serve -m models:/fingerprint-sample@champion" in printed

    # the sweep: one nested MLflow run and one registered version per detector, all on one split
    client = MlflowClient(out.tracking_uri)
    exp = client.get_experiment_by_name("fingerprint-sample")
    (parent,) = client.search_runs([exp.experiment_id], "tags.sweep != '' and params.n_trials = '3'")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["kind"] for r in children) == ["gradient", "pixel", "triplet"]
    assert sorted(r.data.tags[REGISTERED_TAG] for r in children) == ["1", "2", "3"]
    # the audit report of the champion's predictions, archived with the sweep's run
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "audit")] == ["audit/report.html"]
    assert (tmp_path / "demo" / "predict" / "report.html").is_file()
    versions = client.search_model_versions("name='fingerprint-sample'")
    assert len({v.tags[registry.SPLIT_TAG] for v in versions}) == 1
    best = max(versions, key=lambda v: (registry.version_metrics(v)["val_auc"], -int(v.version)))
    challenger = registry.get_alias("fingerprint-sample", "challenger")
    assert registry.version_metrics(challenger)["val_auc"] == pytest.approx(registry.version_metrics(best)["val_auc"])

    # promotion made it champion (the first one), and predictions + evaluation used its detector folder
    assert out.champion == challenger.version and load_detector(out.detector).kind == challenger.tags["kind"]
    history = registry.alias_history("fingerprint-sample")
    assert [e["alias"] for e in history] == ["challenger", "champion"] and "kind" in history[0]["reason"]
    lines = out.submission.read_text().splitlines()
    assert len(lines) > 4 and all(line.split(",")[1] in ("0", "1") for line in lines)
    assert (tmp_path / "demo" / "evaluate" / "metrics.md").is_file() and out.metrics["auc"] > 0.5
    assert sorted(p.name for p in (tmp_path / "demo" / "sweep").glob("*.md")) == [f"{parent.info.run_name}.md"]

    # the same command again: the sweep is restored (nothing refitted or registered), promotion has nothing to do
    again = demo.main(cfg)
    assert again.champion == out.champion
    assert len(client.search_model_versions("name='fingerprint-sample'")) == 3
    assert len(client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 3
    assert [e["alias"] for e in registry.alias_history("fingerprint-sample")] == ["challenger", "champion"]
    assert "nothing to do" in capsys.readouterr().out
