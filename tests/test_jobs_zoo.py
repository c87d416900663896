"""`fingerprint zoo-ray`: generators built as Ray tasks on a real local Ray, each logged to a real sqlite MLflow."""

import json

import pytest
from mlflow.tracking import MlflowClient
from ray_fixtures import ray_local  # noqa: F401  (fixture)

TINY = {
    "ae_gmm": {"steps": 6, "batch_size": 8, "width": 8, "latent_dim": 4, "components": 3},
    "vae": {"steps": 6, "batch_size": 8, "width": 8, "latent_dim": 4},
}


@pytest.mark.ray
def test_each_generator_is_a_task_and_a_tracked_run(ray_local, sample_bench, tmp_path):  # noqa: F811
    from jobs.zoo_ray import ZooRayConfig, main

    spec = tmp_path / "zoo.yaml"
    spec.write_text(f"""
pool: [{sample_bench}]
defaults: {{image_size: 16, dev_generated: 20, test_generated: 20, members: 12}}
entries:
  - {{name: a, family: ae_gmm, settings: {json.dumps(TINY["ae_gmm"])}, seed: 1}}
  - {{name: b, family: vae, settings: {json.dumps(TINY["vae"])}, temperature: 0.5}}
""")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = ZooRayConfig(spec=str(spec), out=str(tmp_path / "zoo"), tracking_uri=uri)
    rows = main(config)
    assert [r["name"] for r in rows] == ["a", "b"] and {r["family"] for r in rows} == {"ae_gmm", "vae"}
    for name in ("a", "b"):
        folder = tmp_path / "zoo" / name
        assert (folder / "zoo.json").is_file() and (folder / "test_labels.csv").is_file()
        assert any((folder / "dev" / "generated").glob("*.png"))

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fingerprint-zoo")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"a", "b"}
    a = runs["a"]
    assert a.data.params["family"] == "ae_gmm" and a.data.params["settings.components"] == "3"
    assert "nn_l2_auc_dev" in a.data.metrics and "loss" in a.data.metrics
    assert len(client.get_metric_history(a.info.run_id, "loss")) >= 1
    arts = {f.path for f in client.list_artifacts(a.info.run_id)}
    assert {"zoo.json", "split.json", "samples.png", "generator"} <= arts

    # A rerun keeps the benchmarks and logs nothing twice.
    before = (tmp_path / "zoo" / "a" / "zoo.json").stat().st_mtime_ns
    losses = len(client.get_metric_history(a.info.run_id, "loss"))
    main(config)
    assert (tmp_path / "zoo" / "a" / "zoo.json").stat().st_mtime_ns == before
    assert len(client.search_runs([exp.experiment_id])) == 2
    assert len(client.get_metric_history(a.info.run_id, "loss")) == losses


def test_unknown_entry_names_the_flag(tmp_path):
    from fingerprint.config import ConfigError
    from jobs.zoo_ray import ZooRayConfig, main

    with pytest.raises(ConfigError, match="--only: no entry named nope"):
        main(ZooRayConfig(spec="benchmarks/zoo/suite.yaml", out=str(tmp_path), only="nope", tracking_uri="none"))
    with pytest.raises(ConfigError, match="--spec"):
        main(ZooRayConfig(spec=str(tmp_path / "missing.yaml"), out=str(tmp_path)))
