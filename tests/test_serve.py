"""The scoring service on a real Ray Serve instance on 127.0.0.1: evidence in the answers, batching, bad input,
parity with `fingerprint predict`, the neighbours' thumbnails, a hot swap to another detector kind under traffic,
a failed reload, auth (docs included), and the page at / in a real headless Chromium. serve.guard runs in Ray's
HTTP proxy throughout.

One Ray start (with its dashboard: serve/config.yaml is applied through Serve's REST API, as `serve deploy`
does) and one deployment for the whole module; later tests reconfigure it in place (the order of the tests
matters: the swap, reload and auth tests come last). About a minute on 2 cores.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from browser import chromium, page  # noqa: F401  (fixtures)
from PIL import Image
from ray_fixtures import ray_with_dashboard  # noqa: F401  (fixture)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray")
serve_api = pytest.importorskip("ray.serve")

TRIPLET = ("triplet", {"backbone": "mobilenetv2_100", "weights": "none", "image_size": 32, "epochs": 1,
                       "triplets_per_epoch": 32, "k": 3, "device": "cpu"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def detectors(sample_bench, tmp_path_factory) -> dict[str, Path]:
    """A triplet detector (a network kind: served first) and the `best` selected ensemble (swapped in)."""
    from fingerprint.data.imagesets import load_fit_data
    from fingerprint.detectors import PRESETS, fit_detector

    root = tmp_path_factory.mktemp("serve_detectors")
    data = load_fit_data(sample_bench, 0.25, 0)
    return {"triplet": fit_detector(*TRIPLET, data).save(root / "triplet"),
            "best": fit_detector(*PRESETS["best"], data).save(root / "best")}


@pytest.fixture(scope="module")
def proxy_guard():
    """serve.guard in Ray's HTTP proxy (read from the environment when Ray starts, so before ray_with_dashboard)."""
    from serve import guard

    old = os.environ.get(guard.CALLBACK_ENV)
    os.environ[guard.CALLBACK_ENV] = guard.CALLBACK
    yield
    if old is None:
        os.environ.pop(guard.CALLBACK_ENV, None)
    else:
        os.environ[guard.CALLBACK_ENV] = old


@pytest.fixture(scope="module")
def service(proxy_guard, ray_with_dashboard, detectors):  # noqa: F811 (the imported fixture)
    """serve/config.yaml deployed as `serve deploy` would, serving the triplet detector folder, with small limits."""
    from ray import serve

    from serve.deploy import deploy_config, load_config, reload_app

    port = _free_port()
    config = load_config(
        user_config={
            "detector": str(detectors["triplet"]), "registered_model": "",
            "max_batch_size": 8, "batch_wait_timeout_s": 0.2,
            "max_image_bytes": 20_000, "max_image_pixels": 256 * 256, "max_images_per_request": 16,
            "auth_token_env": "",
        },
        deployment={"num_replicas": 1, "max_ongoing_requests": 32},
    )
    config["http_options"]["port"] = port
    deploy_config(config, address=ray_with_dashboard)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        yield {"client": client, "url": f"http://127.0.0.1:{port}",
               "reload": lambda **changes: reload_app("fingerprint", user_config=changes, address=ray_with_dashboard)}
    finally:
        client.close()
        serve.shutdown()


@pytest.fixture(scope="module")
def real_images(sample_bench) -> list[Path]:
    return sorted((sample_bench / "test" / "real_unknown").glob("*.png"))


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def _predict_scores(detector: Path, bench: Path) -> dict[str, float]:
    from fingerprint.commands.predict import predict_folder
    from fingerprint.detectors import load_detector

    pred = predict_folder(load_detector(detector), bench)
    return dict(zip(pred.ids, map(float, pred.scores.score), strict=True))


# ---------------------------------------------------------------------------------------------------------


def test_health_model_info_and_openapi(service, detectors):
    from fingerprint.detectors import load_detector

    c = service["client"]
    # Probes say only whether the replica serves; the model's details need /v1/model (and its token).
    assert c.get("/healthz").json() == {"status": "ok"} and c.get("/readyz").json() == {"status": "ok"}
    assert c.get("/livez").json() == {"status": "alive"}
    info = c.get("/v1/model").json()
    det = load_detector(detectors["triplet"])
    assert (info["kind"], info["name"], info["version"], info["alias"]) == ("triplet", "triplet", "local", None)
    assert info["threshold"] == pytest.approx(det.threshold) and info["signal"] == "per_image"
    assert info["metrics"]["val_auc"] == pytest.approx(det.meta.metrics["val_auc"])
    assert info["detector_false_positives"]["bound"] == pytest.approx(det.meta.false_positives.bound)
    assert info["false_positives_apply"] is True  # the detector's own threshold and gallery
    assert info["settings"]["backbone"] == "mobilenetv2_100" and info["source"] == str(detectors["triplet"])
    # The saved index is served: nothing was re-embedded at start.
    assert info["gallery"] == {"size": 96, "source": "detector"} and info["reference"]["size"] == len(det.reference_ids)
    assert info["batching"]["max_batch_size"] == 8 and info["batching"]["batch_wait_timeout_s"] == 0.2
    spec = c.get("/openapi.json").json()
    body = spec["paths"]["/v1/score"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json", "image/png"} <= set(body)
    assert "/v1/embed" not in spec["paths"] and "/v1/thumbnails/{image_id}" in spec["paths"]
    assert c.get("/docs").status_code == 200
    # Ray's proxy's own plain-text errors come back as the service's JSON (serve.guard).
    r = c.get("/no/such/route")
    assert r.status_code == 404 and r.headers["content-type"] == "application/json" and r.json()["error"]


def test_nearest_generated_images_come_with_pictures(service, detectors, real_images):
    c = service["client"]
    gallery = json.loads((detectors["triplet"] / "ids.json").read_text())["gallery"]
    body = c.post("/v1/score", files=_files(real_images[:2])).json()
    assert all(n["thumbnail"] is None for x in body["results"] for n in x["nearest"])  # only when asked for
    body = c.post("/v1/score", params={"thumbnails": "url"}, files=_files(real_images[:2])).json()
    for n in (n for x in body["results"] for n in x["nearest"]):
        r = c.get(n["thumbnail"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert max(Image.open(io.BytesIO(r.content)).size) <= 64
    inline = c.post("/v1/score", params={"thumbnails": "inline"}, files=_files(real_images[:1])).json()
    uri = inline["results"][0]["nearest"][0]["thumbnail"]
    assert uri.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).format == "PNG"
    assert c.get(f"/v1/thumbnails/{gallery[0]}").status_code == 200
    r = c.get("/v1/thumbnails/not-in-the-gallery")
    assert r.status_code == 404 and r.json()["error"] == "unknown_id"
    r = c.post("/v1/score", params={"thumbnails": "huge"}, files=_files(real_images[:1]))
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"


def test_scores_equal_fingerprint_predict(service, detectors, sample_bench, real_images):
    c = service["client"]
    expected = _predict_scores(detectors["triplet"], sample_bench)
    assert max(expected.values()) - min(expected.values()) > 1e-3  # the 1e-5 tolerance is tight by comparison
    r = c.post("/v1/score", files=_files(real_images))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kind"] == "triplet" and body["model"]["kind"] == "triplet" and body["signal"] == "per_image"
    got = {x["id"]: x for x in body["results"]}
    assert set(got) == set(expected)  # ids are the file stems, as `fingerprint predict` writes them
    gallery = set(json.loads((detectors["triplet"] / "ids.json").read_text())["gallery"])
    for name, score in expected.items():
        x = got[name]
        assert abs(x["score"] - score) < 1e-5
        assert x["decision"] == (x["score"] >= body["threshold"])
        assert x["real_similarity"] is not None  # the triplet kind calibrates on its reference pool
        sims = [n["similarity"] for n in x["nearest"]]
        assert len(sims) == 3 and sims == sorted(sims, reverse=True)
        assert {n["id"] for n in x["nearest"]} <= gallery

    # The same images as base64 JSON and as raw bodies give the same scores.
    payload = {"images": [{"id": p.stem, "data": base64.b64encode(p.read_bytes()).decode()} for p in real_images[:3]]}
    r = c.post("/v1/score", json=payload)
    assert r.status_code == 200, r.text
    for x in r.json()["results"]:
        assert abs(x["score"] - expected[x["id"]]) < 1e-5
    r = c.post("/v1/score", content=real_images[0].read_bytes(), headers={"content-type": "image/png"},
               params={"id": real_images[0].stem})
    assert abs(r.json()["results"][0]["score"] - expected[real_images[0].stem]) < 1e-5


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
    "deep_json": (dict(content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"}),
                  400, "malformed_json"),
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
    # A 1048576 x 1 PNG of about a kilobyte passes the area limit: its side is refused before decoding.
    line = Image.new("L", (1048576, 1))
    r = c.post("/v1/score", files=[("files", ("line.png", _png(np.asarray(line)), "image/png"))])
    assert r.status_code == 413 and "max_image_side" in r.json()["detail"]

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


def test_hot_swap_to_another_kind_under_traffic(service, detectors, sample_bench, real_images):
    """triplet -> selected_ensemble by reconfigure in place, while a thread keeps sending requests: none fails."""
    c = service["client"]
    before = c.get("/v1/model").json()
    assert before["kind"] == "triplet"

    results: list[tuple[int, str]] = []
    after_swap = threading.Event()

    def traffic() -> None:
        # Bounded: at most 400 requests or 120 s; stops by itself 10 answers after the first of the new kind.
        with httpx.Client(base_url=service["url"], timeout=60) as tc:
            deadline, tail = time.monotonic() + 120, None
            while len(results) < 400 and time.monotonic() < deadline and (tail is None or len(results) < tail):
                p = real_images[len(results) % len(real_images)]
                r = tc.post("/v1/score", files=_files([p]))
                results.append((r.status_code, r.json()["kind"] if r.status_code == 200 else r.text))
                if tail is None and results[-1][1] == "selected_ensemble":
                    tail = len(results) + 10
                    after_swap.set()

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while len(results) < 5 and time.monotonic() - t0 < 60:
        time.sleep(0.05)
    # The swap also changes batch settings live.
    service["reload"](detector=str(detectors["best"]), max_batch_size=4, batch_wait_timeout_s=0.1)
    thread.join(timeout=150)
    assert not thread.is_alive()

    assert all(code == 200 for code, _ in results), [r for r in results if r[0] != 200][:3]
    kinds = [k for _, k in results]
    assert kinds[0] == "triplet" and kinds[-1] == "selected_ensemble", kinds
    assert after_swap.is_set()
    after = c.get("/v1/model").json()
    assert (after["kind"], after["name"]) == ("selected_ensemble", "selected_ensemble")
    assert after["replica"] == before["replica"], "expected an in-place reconfigure, not a new replica"
    assert after["swaps"][-1]["from_kind"] == "triplet" and after["swaps"][-1]["to_kind"] == "selected_ensemble"
    assert after["batching"]["max_batch_size"] == 4 and after["batching"]["batch_wait_timeout_s"] == 0.1

    c.post("/v1/stats/reset")
    assert asyncio.run(_concurrent_scores(service["url"], real_images, 12)) == [200] * 12
    assert 1 < c.get("/v1/model").json()["batching"]["max_observed_batch_size"] <= 4
    # The ensemble's answers carry its lead member's evidence (a pixel kind here: no real similarity).
    body = c.post("/v1/score", files=_files(real_images[:2])).json()
    assert body["kind"] == "selected_ensemble" and all(x["nearest"] for x in body["results"])
    assert all(0.0 <= x["score"] <= 1.0 for x in body["results"])  # mean ranks within the reference pool


def test_a_threshold_override_is_not_covered_by_the_detectors_record(service):
    c = service["client"]
    service["reload"](threshold=0.25)
    info = c.get("/v1/model").json()
    assert info["threshold"] == 0.25 != info["detector_threshold"]
    # The record names the threshold it covers, and the service says it does not cover the one in use.
    assert info["detector_false_positives"]["threshold"] == info["detector_threshold"]
    assert info["false_positives_apply"] is False
    service["reload"](threshold=None)
    info = c.get("/v1/model").json()
    assert info["threshold"] == info["detector_threshold"] and info["false_positives_apply"] is True


def test_failed_reload_keeps_serving(service, real_images, tmp_path):
    c = service["client"]
    service["reload"](detector=str(tmp_path / "no-such-detector"))
    info = c.get("/v1/model").json()
    assert info["kind"] == "selected_ensemble" and "no-such-detector" in info["reload_error"]
    assert c.post("/v1/score", files=_files(real_images[:1])).status_code == 200


def test_bearer_token(service, detectors, real_images):
    c = service["client"]
    service["reload"](detector=str(detectors["best"]), auth_token="s3cret")
    assert c.post("/v1/score", files=_files(real_images[:1])).status_code == 401
    r = c.post("/v1/score", files=_files(real_images[:1]), headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert c.get("/v1/model").status_code == 401
    r = c.post("/v1/score", files=_files(real_images[:1]), headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200
    assert c.get("/healthz").status_code == 200  # probes need no token
    # The documentation follows the API's auth.
    assert c.get("/openapi.json").status_code == 401 and c.get("/docs").status_code == 401
    assert c.get("/openapi.json", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/v1/thumbnails/x").status_code == 401


def test_page_shows_verdict_and_neighbours(service, detectors, real_images, page, tmp_path):  # noqa: F811
    """The page at / in a real headless Chromium, with auth on (the previous test set the token), serving the
    triplet detector again (3 nearest generated images per answer)."""
    service["reload"](detector=str(detectors["triplet"]))
    pg, log = page
    pg.goto(service["url"] + "/")
    pg.set_input_files("#files", [str(p) for p in real_images[:2]])
    pg.fill("#token", "wrong")
    pg.click("#submit")
    pg.wait_for_selector("#status.error", timeout=60_000)
    assert "401" in pg.inner_text("#status")
    log.failed_requests = [x for x in log.failed_requests if not x.startswith("HTTP 401")]  # that one was meant
    log.console_errors = [x for x in log.console_errors if "401" not in x]
    pg.fill("#token", "s3cret")
    pg.click("#submit")
    pg.wait_for_selector("section.result >> nth=1", timeout=60_000)
    rows = pg.query_selector_all("section.result")
    assert [r.get_attribute("data-id") for r in rows] == [p.stem for p in real_images[:2]]
    assert "Detector: triplet" in pg.inner_text("#status")
    for row in rows:
        assert row.query_selector(".verdict").inner_text() in ("Likely in the training set", "Not flagged")
        assert len(row.query_selector_all("figure img")) == 3
    # Every picture (the uploads and the neighbours' thumbnails) has loaded.
    sizes = pg.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
    assert sizes and all(done and width > 0 for done, width in sizes), sizes
    assert log.problems() == []
    shot = tmp_path / "service.png"
    pg.screenshot(path=str(shot), full_page=True)
    if os.environ.get("FINGERPRINT_UPDATE_SCREENSHOTS"):
        shutil.copy(shot, Path(__file__).resolve().parent.parent / "docs" / "service.png")
