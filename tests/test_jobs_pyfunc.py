"""A registered detector as an MLflow pyfunc: `load_model(...).predict` and `mlflow models serve` give the scores
`load_detector(folder).score` gives (real sqlite store, real server process, no mocks)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from fingerprint.data.images import load_image
from fingerprint.data.imagesets import load_fit_data
from fingerprint.detectors import PRESETS, fit_detector, load_detector
from jobs import registry
from jobs.pyfunc import OUTPUT_COLUMNS
from jobs.tracking import setup_experiment


@pytest.fixture(scope="module")
def detector_dir(sample_bench, tmp_path_factory) -> Path:
    kind, settings = PRESETS["gradient_nn"]
    det = fit_detector(kind, settings, load_fit_data(sample_bench, 0.25, 0))
    det.meta.extra["name"] = "gradient_nn"
    return det.save(tmp_path_factory.mktemp("pyfunc") / "detector")


@pytest.fixture(scope="module")
def store(tmp_path_factory, detector_dir):
    """A sqlite store holding one registered version of the detector."""
    root = tmp_path_factory.mktemp("pyfunc-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    # Artifacts beside the sqlite file, not in ./mlruns of the working folder.
    mlflow.set_experiment(experiment_id=setup_experiment(uri, "pyfunc-test"))
    with mlflow.start_run():
        mv = registry.log_detector(detector_dir, "fp")
    yield uri, mv
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def queries(sample_bench) -> tuple[list[str], list[Path]]:
    """Test images with their ids, one dev image whose id is in the reference pool, and a JPEG."""
    files = sorted((sample_bench / "test" / "real_unknown").glob("*.png"))[:5]
    ids = [f.stem for f in files]
    used = sorted((sample_bench / "dev" / "used").glob("*.png"))[0]
    return [*ids, f"dev/{used.stem}"], [*files, used]


def frame(ids: list[str], files: list[Path]) -> pd.DataFrame:
    return pd.DataFrame({"id": ids, "image": [base64.b64encode(f.read_bytes()).decode() for f in files]})


def expected(detector_dir: Path, ids: list[str], files: list[Path]):
    det = load_detector(detector_dir)
    return det, det.score([load_image(f) for f in files], ids)


def check_same(out: pd.DataFrame, det, scores, ids: list[str]) -> None:
    assert list(out.columns) == list(OUTPUT_COLUMNS) and list(out["id"]) == ids
    np.testing.assert_allclose(out["score"].to_numpy(dtype=float), scores.score, rtol=0, atol=1e-6)
    assert list(out["decision"]) == list(det.decide(scores))
    assert np.allclose(out["threshold"].to_numpy(dtype=float), det.threshold)
    for row, nearest, sims in zip(out.itertuples(), scores.nearest, scores.nearest_similarity, strict=True):
        assert json.loads(row.nearest_ids) == [det.gallery_ids[j] for j in nearest]
        np.testing.assert_allclose(json.loads(row.nearest_similarities), sims, atol=1e-6)


def test_version_carries_kind_metrics_split_and_description(store, detector_dir):
    _, mv = store
    meta = json.loads((detector_dir / "meta.json").read_text())
    assert mv.version == "1" and mv.tags["kind"] == "gradient" and mv.tags["detector"] == "gradient_nn"
    assert mv.tags[registry.SPLIT_TAG] == registry.split_digest(meta["split"]) != ""
    assert float(mv.tags["threshold"]) == pytest.approx(meta["threshold"])
    assert registry.version_metrics(mv)["val_auc"] == pytest.approx(meta["metrics"]["val_auc"])
    assert "kind gradient" in mv.description and "val_auc=" in mv.description
    assert f"{len(meta['split']['val'])} validation images" in mv.description
    # MLflow 3: the metrics are attached to the logged model itself as well
    model_id = mv.source.removeprefix("models:/")
    logged = mlflow.get_logged_model(model_id)
    assert {m.key: m.value for m in logged.metrics}["val_auc"] == pytest.approx(meta["metrics"]["val_auc"])
    # the model is stored as code + safetensors, never as a pickle
    local = Path(mlflow.artifacts.download_artifacts(f"models:/fp/{mv.version}"))
    assert not list(local.rglob("*.pkl")) and (local / "artifacts" / "detector" / "arrays.safetensors").is_file()


def test_pyfunc_predict_matches_load_detector(store, detector_dir, queries, tmp_path):
    ids, files = queries
    det, scores = expected(detector_dir, ids, files)
    model = mlflow.pyfunc.load_model("models:/fp/1")
    check_same(model.predict(frame(ids, files)), det, scores, ids)
    # the dev image is in the reference pool under its id: it is never compared with itself
    assert det.self_rows([ids[-1]], 1)[0] >= 0

    # download_detector gives the same folder back, by alias
    registry.set_alias("fp", "champion", "1", reason="test", metrics={})
    mv, folder = registry.download_detector("fp", "champion", tmp_path / "dl")
    assert mv.version == "1" and folder == tmp_path / "dl" / "detector"
    again = load_detector(folder).score([load_image(f) for f in files], ids)
    np.testing.assert_array_equal(again.score, scores.score)


def test_pyfunc_rejects_bad_input(store):
    model = mlflow.pyfunc.load_model("models:/fp/1")
    with pytest.raises(Exception, match="not valid base64|not a readable PNG/JPEG"):
        model.predict(pd.DataFrame({"id": ["x"], "image": ["bm90IGFuIGltYWdl"]}))
    with pytest.raises(Exception, match="image"):
        model.predict(pd.DataFrame({"id": ["x"]}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_scores_over_http(store, detector_dir, queries, tmp_path):
    uri, _ = store
    ids, files = queries
    det, scores = expected(detector_dir, ids, files)
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(mlflow_bin), "models", "serve", "-m", "models:/fp/1", "--env-manager", "local", "-h", "127.0.0.1",
         "-p", str(port), "-w", "1"],
        # MLflow execs `uvicorn` by name: the venv's bin/ must be on PATH even when the venv is not activated
        env={**os.environ, "MLFLOW_TRACKING_URI": uri,
             "PATH": f"{mlflow_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # a hang guard, not a speed goal
        while True:
            assert proc.poll() is None, f"mlflow models serve exited: {(tmp_path / 'serve.log').read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve hangs: {(tmp_path / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.5)
        body = json.dumps({"dataframe_split": frame(ids, files).to_dict(orient="split")}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            predictions = json.loads(r.read())["predictions"]
        check_same(pd.DataFrame(predictions)[list(OUTPUT_COLUMNS)], det, scores, ids)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
    assert MlflowClient(uri).get_model_version("fp", "1").status == "READY"
