"""The scoring service on a real Ray Serve instance on 127.0.0.1: batching, bad input, parity with
`fingerprint predict`, a hot swap between registry versions, and auth.

One Ray start and one deployment for the whole module; later tests reconfigure it in place (the order of the
tests matters: the swap and auth tests come last). About a minute on 2 cores.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.ray, pytest.mark.slow]

httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray")
serve_api = pytest.importorskip("ray.serve")
mlflow = pytest.importorskip("mlflow")

MODEL = "fp-serve-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def models(sample_bench, tiny_train_kwargs, tmp_path_factory):
    """Two trained checkpoints registered as versions 1 and 2; champion -> 1."""
    from fingerprint import train
    from fingerprint.config import TrainConfig
    from jobs.registry import log_checkpoint_model, set_alias

    root = tmp_path_factory.mktemp("serve_models")
    # mobilenetv2 rather than the shared tiny resnet18: its untrained embeddings are not all alike, so scores
    # spread over ~1e-2 and a 1e-5 parity check means something.
    kwargs = {**tiny_train_kwargs, "backbone": "mobilenetv2_100"}
    ckpts = [train.main(TrainConfig(data=str(sample_bench), out=str(root / f"run{seed}"), **{**kwargs, "seed": seed}))
             for seed in (0, 1)]
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("serve-test")
    versions = []
    for ckpt in ckpts:
        with mlflow.start_run():
            versions.append(str(log_checkpoint_model(ckpt, MODEL).version))
    set_alias(MODEL, "champion", versions[0], reason="test: first champion", metrics={})
    yield {"uri": uri, "checkpoints": ckpts, "versions": versions}
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def service(models, sample_bench):
    """serve/config.yaml deployed as `serve deploy` would, serving the registry's champion, with small limits."""
    from ray import serve

    from serve.deploy import deploy_config, load_config, reload_app

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    config = load_config(
        user_config={
            "registered_model": MODEL, "alias": "champion", "tracking_uri": models["uri"],
            "gallery": str(sample_bench), "reference": str(sample_bench),
            "max_batch_size": 8, "batch_wait_timeout_s": 0.2,
            "max_image_bytes": 20_000, "max_image_pixels": 256 * 256, "max_images_per_request": 16,
            "auth_token_env": "",
        },
        deployment={"num_replicas": 1, "max_ongoing_requests": 32},
    )
    config["http_options"]["port"] = port
    t = time.perf_counter()
    deploy_config(config)
    startup = time.perf_counter() - t
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        yield {"client": client, "url": f"http://127.0.0.1:{port}", "startup_s": startup,
               "reload": lambda **changes: reload_app("fingerprint", user_config=changes)}
    finally:
        client.close()
        serve.shutdown()
        if started:
            ray.shutdown()


@pytest.fixture(scope="module")
def real_images(sample_bench) -> list[Path]:
    return sorted((sample_bench / "test" / "real_unknown").glob("*.png"))


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def _predict_scores(checkpoint: Path, bench: Path, out: Path) -> dict[str, float]:
    from fingerprint import predict

    predict.main(predict.PredictConfig(model=str(checkpoint), data=str(bench), out=str(out)))
    with open(out / "scores.csv", newline="") as fh:
        return {r["id"]: float(r["score"]) for r in csv.DictReader(fh)}


# ---------------------------------------------------------------------------------------------------------


def test_health_model_info_and_openapi(service, models):
    c = service["client"]
    assert c.get("/healthz").json()["status"] == "ok"
    info = c.get("/v1/model").json()
    # The alias was resolved to a concrete version at start.
    assert info["version"] == models["versions"][0] and info["alias"] == "champion" and info["name"] == MODEL
    assert info["gallery"]["size"] == 96 and info["batching"]["max_batch_size"] == 8
    assert info["batching"]["max_ongoing_requests"] == 32
    assert info["forward"] == "torchscript trace"  # so the parity tests below cover the traced forward
    spec = c.get("/openapi.json").json()
    body = spec["paths"]["/v1/score"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json", "image/png"} <= set(body)
    assert c.get("/docs").status_code == 200


def test_scores_equal_fingerprint_predict(service, models, sample_bench, real_images, tmp_path):
    c = service["client"]
    expected = _predict_scores(models["checkpoints"][0], sample_bench, tmp_path)
    assert max(expected.values()) - min(expected.values()) > 1e-3  # the 1e-5 tolerance is tight by comparison
    r = c.post("/v1/score", files=_files(real_images))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["version"] == models["versions"][0]
    got = {Path(x["id"]).stem: x for x in body["results"]}
    assert set(got) == set(expected)
    for name, score in expected.items():
        assert abs(got[name]["score"] - score) < 1e-5
        assert got[name]["decision"] == (got[name]["score"] >= body["threshold"])
        sims = [n["similarity"] for n in got[name]["nearest"]]
        assert len(sims) == body["k"] and sims == sorted(sims, reverse=True)

    # The same images as base64 JSON and as raw bodies give the same scores.
    payload = {"images": [{"id": p.stem, "data": base64.b64encode(p.read_bytes()).decode()} for p in real_images[:3]]}
    r = c.post("/v1/score", json=payload)
    assert r.status_code == 200, r.text
    for x in r.json()["results"]:
        assert abs(x["score"] - expected[x["id"]]) < 1e-5
    r = c.post("/v1/score", content=real_images[0].read_bytes(), headers={"content-type": "image/png"},
               params={"id": real_images[0].stem})
    assert abs(r.json()["results"][0]["score"] - expected[real_images[0].stem]) < 1e-5

    emb = c.post("/v1/embed", files=_files(real_images[:2])).json()
    vec = np.array([x["embedding"] for x in emb["results"]])
    assert vec.shape == (2, emb["dim"]) and np.allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)


async def _concurrent_scores(url: str, paths: list[Path], n: int) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
        async def one(i: int) -> int:
            p = paths[i % len(paths)]
            r = await ac.post("/v1/score", files=[("files", (p.name, p.read_bytes(), "image/png"))])
            return r.status_code

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_concurrent_requests_form_batches(service, real_images):
    c = service["client"]
    c.post("/v1/stats/reset")
    codes = asyncio.run(_concurrent_scores(service["url"], real_images, 24))
    assert codes == [200] * 24
    batching = c.get("/v1/model").json()["batching"]
    assert batching["images"] == 24
    assert 1 < batching["max_observed_batch_size"] <= 8, batching
    assert batching["batches"] < 24


BAD_CASES = {
    # name: (request kwargs, status, error code)
    "not_an_image": (dict(files=[("files", ("a.png", b"this is not an image", "image/png"))]), 415, "not_an_image"),
    "too_many_files": (dict(files=[("files", (f"{i}.png", b"x", "image/png")) for i in range(40)]), 413,
                       "too_many_images"),
    "malformed_multipart": (dict(content=b"--nope\r\ngarbage", headers={"content-type": "multipart/form-data"}),
                            400, "malformed_multipart"),
    "empty_file": (dict(files=[("files", ("e.png", b"", "image/png"))]), 400, "empty_image"),
    "empty_body": (dict(content=b"", headers={"content-type": "application/json"}), 400, "empty_body"),
    "malformed_json": (dict(content=b'{"images": [', headers={"content-type": "application/json"}), 400,
                       "malformed_json"),
    "unknown_field": (dict(json={"images": [{"data": "AAAA"}], "colour": "red"}), 422, "invalid_request"),
    "missing_field": (dict(json={"pictures": []}), 422, "invalid_request"),
    "bad_base64": (dict(json={"images": [{"id": "x", "data": "not base64!"}]}), 422, "invalid_base64"),
    "wrong_content_type": (dict(content=b"hello", headers={"content-type": "text/plain"}), 415,
                           "unsupported_media_type"),
    "unknown_form_field": (dict(data={"colour": "red"}, files=[("files", ("a.png", b"x", "image/png"))]), 422,
                           "unknown_field"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_gets_a_4xx_naming_the_problem(service, case):
    kwargs, status, code = BAD_CASES[case]
    r = service["client"].post("/v1/score", **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code and body["detail"]
    if case == "unknown_field":
        assert "colour" in body["detail"]


def test_damaged_and_oversized_images(service, real_images):
    c = service["client"]
    png = real_images[0].read_bytes()
    r = c.post("/v1/score", files=[("files", ("cut.png", png[: len(png) * 2 // 3], "image/png"))])
    assert r.status_code == 422 and r.json()["error"] == "invalid_image" and "cut.png" in r.json()["detail"]

    noise = np.random.default_rng(0).integers(0, 256, (160, 160), dtype=np.uint8)  # ~26 kB > 20 kB limit
    r = c.post("/v1/score", files=[("files", ("big.png", _png(noise), "image/png"))])
    assert r.status_code == 413 and "max_image_bytes" in r.json()["detail"]
    wide = np.zeros((300, 300), dtype=np.uint8)  # a few hundred bytes, but 90k pixels > 65k limit
    r = c.post("/v1/score", files=[("files", ("wide.png", _png(wide), "image/png"))])
    assert r.status_code == 413 and "max_image_pixels" in r.json()["detail"]
    r = c.post("/v1/score", files=_files(real_images[:1] * 17))
    assert r.status_code == 413 and r.json()["error"] == "too_many_images"

    # One bad image among good ones: named, and only it.
    r = c.post("/v1/score", files=_files(real_images[:2]) + [("files", ("junk.png", b"junk", "image/png"))])
    assert r.status_code == 415 and r.json()["items"] == ["junk.png"]


def test_bad_requests_do_not_disturb_good_ones(service, real_images):
    async def mixed() -> tuple[list[int], list[int]]:
        async with httpx.AsyncClient(base_url=service["url"], timeout=60) as ac:
            good = [ac.post("/v1/score", files=_files([p])) for p in real_images[:8]]
            bad = [ac.post("/v1/score", files=[("files", ("x.png", b"\x89PNG junk", "image/png"))])
                   for _ in range(8)]
            rs = await asyncio.gather(*good, *bad)
            return [r.status_code for r in rs[:8]], [r.status_code for r in rs[8:]]

    good, bad = asyncio.run(mixed())
    assert good == [200] * 8 and bad == [415] * 8
    assert service["client"].get("/healthz").status_code == 200


def test_hot_swap_to_new_champion_keeps_answering(service, models, sample_bench, real_images, tmp_path):
    """Promote version 2, bump `reload`: replicas reconfigure in place while requests keep flowing."""
    from jobs.registry import set_alias

    c = service["client"]
    before = c.get("/v1/model").json()
    set_alias(MODEL, "champion", models["versions"][1], reason="test: promote v2", metrics={})

    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=service["url"], timeout=60) as tc:
            deadline = time.monotonic() + 90
            while not stop.is_set() and time.monotonic() < deadline and len(results) < 2000:
                p = real_images[len(results) % len(real_images)]
                r = tc.post("/v1/score", files=_files([p]))
                results.append((r.status_code, r.json()["model"]["version"] if r.status_code == 200 else r.text))

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    # The swap also changes batch settings live.
    service["reload"](max_batch_size=4, batch_wait_timeout_s=0.1)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()

    assert len(results) > 10 and all(code == 200 for code, _ in results), [r for r in results if r[0] != 200][:3]
    versions = [v for _, v in results]
    assert versions[0] == models["versions"][0] and versions[-1] == models["versions"][1]
    after = c.get("/v1/model").json()
    assert after["version"] == models["versions"][1]
    assert after["replica"] == before["replica"], "expected an in-place reconfigure, not a new replica"
    assert after["swaps"][-1]["from_version"] == models["versions"][0]
    assert after["batching"]["max_batch_size"] == 4 and after["batching"]["batch_wait_timeout_s"] == 0.1

    c.post("/v1/stats/reset")
    assert asyncio.run(_concurrent_scores(service["url"], real_images, 12)) == [200] * 12
    assert 1 < c.get("/v1/model").json()["batching"]["max_observed_batch_size"] <= 4

    expected = _predict_scores(models["checkpoints"][1], sample_bench, tmp_path / "v2")
    old = _predict_scores(models["checkpoints"][0], sample_bench, tmp_path / "v1")
    assert max(abs(old[k] - v) for k, v in expected.items()) > 1e-4  # the two versions are distinguishable
    got = {Path(x["id"]).stem: x["score"] for x in c.post("/v1/score", files=_files(real_images)).json()["results"]}
    assert max(abs(got[k] - v) for k, v in expected.items()) < 1e-5


def test_failed_reload_keeps_serving(service, models, real_images):
    c = service["client"]
    service["reload"](alias="no-such-alias")
    info = c.get("/v1/model").json()
    assert info["version"] == models["versions"][1] and "no-such-alias" in info["reload_error"]
    assert c.post("/v1/score", files=_files(real_images[:1])).status_code == 200


def test_bearer_token(service, real_images):
    c = service["client"]
    service["reload"](alias="champion", auth_token="s3cret")
    assert c.post("/v1/score", files=_files(real_images[:1])).status_code == 401
    r = c.post("/v1/score", files=_files(real_images[:1]), headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert c.get("/v1/model").status_code == 401
    r = c.post("/v1/score", files=_files(real_images[:1]), headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200
    assert c.get("/healthz").status_code == 200  # probes need no token
