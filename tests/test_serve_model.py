"""The serving layer without Ray: settings validation (pydantic), upload decoding, ids, loading any detector kind,
re-indexing, the shipped Serve config, the app builder, the `fingerprint serve` flags and the bench's pieces.
Fast: detectors fitted once on the phantom sample in a few seconds."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fingerprint.config import ConfigError
from fingerprint.data.images import load_image
from serve.config import ServeConfig, from_user_config
from serve.model import InputError, decode_image, item_id, load_state

ROOT = Path(__file__).resolve().parent.parent

TRIPLET = ("triplet", {"backbone": "mobilenetv2_100", "weights": "none", "image_size": 32, "epochs": 1,
                       "triplets_per_epoch": 32, "k": 3, "device": "cpu"})


def _encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def detectors(sample_bench, tmp_path_factory) -> dict[str, Path]:
    """Saved detectors of four kinds, fitted on the phantom sample."""
    from fingerprint.data.imagesets import load_fit_data
    from fingerprint.detectors import PRESETS, fit_detector

    root = tmp_path_factory.mktemp("serve_detectors")
    data = load_fit_data(sample_bench, 0.25, 0)
    specs = {"pixel": PRESETS["pixel_ncc"], "gradient": ("gradient", {"k": 3}), "best": PRESETS["best"],
             "triplet": TRIPLET}
    return {name: fit_detector(*spec, data).save(root / name) for name, spec in specs.items()}


# ---------------------------------------------------------------------------------------------------------
# Settings


def test_user_config_lists_every_problem(tmp_path):
    with pytest.raises(ConfigError) as e:
        from_user_config({"colour": "red", "max_batch_size": "many", "batch_wait_timeout_s": [1],
                          "threshold": "high", "gallery": str(tmp_path / "missing")})
    text = str(e.value)
    for needle in ("user_config.colour: unknown setting", "user_config.max_batch_size: Input should be a valid "
                   "integer", "user_config.batch_wait_timeout_s: Input should be a valid number",
                   "user_config.threshold: "):
        assert needle in text, text
    with pytest.raises(ConfigError) as e:
        from_user_config({"gallery": str(tmp_path)})
    assert "exactly one model source (got neither)" in str(e.value)
    with pytest.raises(ConfigError) as e:
        from_user_config({"detector": str(tmp_path), "registered_model": "m", "max_batch_size": 0,
                          "batch_wait_timeout_s": 11, "reference": str(tmp_path)})
    text = str(e.value)
    assert "got both" in text and "--max-batch-size: must be >= 1" in text
    assert "--batch-wait-timeout-s: must be in [0, 10]" in text and "--reference: only used with --gallery" in text
    with pytest.raises(ConfigError, match="user_config: expected a mapping"):
        from_user_config(["detector"])  # type: ignore[arg-type]


def test_user_config_converts_yaml_and_string_numbers(tmp_path):
    cfg = from_user_config({"detector": str(tmp_path), "batch_wait_timeout_s": 0, "max_batch_size": "32",
                            "threshold": "0.25", "reload": "3"})
    assert cfg.batch_wait_timeout_s == 0.0 and isinstance(cfg.batch_wait_timeout_s, float)
    assert (cfg.max_batch_size, cfg.threshold, cfg.reload) == (32, 0.25, 3)
    assert from_user_config({"detector": str(tmp_path), "threshold": None}).threshold is None


def test_checkpoint_is_the_old_name_of_detector(tmp_path):
    old = from_user_config({"checkpoint": str(tmp_path)})
    assert old.detector_path() == str(tmp_path) and old.model_source() == ("detector", str(tmp_path.resolve()))
    with pytest.raises(ConfigError, match="old name of --detector"):
        from_user_config({"checkpoint": str(tmp_path), "detector": str(tmp_path / "other")})


def test_token_from_config_or_environment(monkeypatch, tmp_path):
    cfg = ServeConfig(detector=str(tmp_path), auth_token_env="FP_TEST_TOKEN")
    monkeypatch.delenv("FP_TEST_TOKEN", raising=False)
    assert cfg.token() == ""
    monkeypatch.setenv("FP_TEST_TOKEN", "abc")
    assert cfg.token() == "abc"
    cfg.auth_token = "explicit"
    assert cfg.token() == "explicit"


# ---------------------------------------------------------------------------------------------------------
# Decoding uploads and ids


def test_decode_matches_library_for_png_jpeg_16bit_and_rgb(tmp_path):
    rng = np.random.default_rng(0)
    images = {
        "gray.png": Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)),
        "deep.png": Image.fromarray(rng.integers(0, 4096, (20, 24)).astype(np.uint16)),
        "rgb.png": Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)),
        "gray.jpg": Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)),
    }
    for name, im in images.items():
        data = _encode(im, "JPEG" if name.endswith(".jpg") else "PNG")
        (tmp_path / name).write_bytes(data)
        got = decode_image(data, name, 10**6, 10**6)
        assert got.mode == "L"
        assert np.array_equal(np.asarray(got), np.asarray(load_image(tmp_path / name))), name


@pytest.mark.parametrize("case,status,code", [
    ("empty", 400, "empty_image"),
    ("text", 415, "not_an_image"),
    ("gif", 415, "unsupported_format"),
    ("truncated", 422, "invalid_image"),
    ("bytes", 413, "image_too_large"),
    ("pixels", 413, "image_too_large"),
])
def test_decode_rejects_bad_uploads_naming_them(case, status, code):
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8))
    png = _encode(noise)
    data, max_bytes, max_pixels = {
        "empty": (b"", 10**6, 10**6),
        "text": (b"hello, I am not a picture", 10**6, 10**6),
        "gif": (_encode(noise, "GIF"), 10**6, 10**6),
        "truncated": (png[: len(png) // 2], 10**6, 10**6),
        "bytes": (png, 100, 10**6),
        "pixels": (png, 10**6, 63 * 63),
    }[case]
    with pytest.raises(InputError) as e:
        decode_image(data, "upload-7", max_bytes, max_pixels)
    assert (e.value.status, e.value.code, e.value.item) == (status, code, "upload-7")
    assert str(e.value).startswith("upload-7: ")


def test_item_id_is_the_file_stem():
    assert item_id("real_unknown_0001.png") == "real_unknown_0001"
    assert item_id("scan.v2.JPEG") == "scan.v2"
    assert item_id("dev/used_0001") == "dev/used_0001" and item_id("image") == "image"


# ---------------------------------------------------------------------------------------------------------
# Model state: any kind, the same scores as `fingerprint predict`


def _service_scores(state, paths: list[Path]) -> tuple[np.ndarray, list[dict]]:
    # Uneven batches, as dynamic batching would make them; ids as the service derives them from file names.
    images, ids = [load_image(p) for p in paths], [item_id(p.name) for p in paths]
    out: list[dict] = []
    for i in range(0, len(images), 5):
        out += state.score(images[i : i + 5], ids[i : i + 5])
    return np.array([r["score"] for r in out]), out


@pytest.mark.parametrize("name", ["pixel", "triplet", "gradient", "best"])
def test_scores_equal_predict(detectors, sample_bench, name):
    """The saved gallery, no images read at start, and the scores `fingerprint predict` writes."""
    from fingerprint.commands.predict import predict_folder
    from fingerprint.detectors import load_detector

    state = load_state(from_user_config({"detector": str(detectors[name])}))
    assert state.info["gallery_source"] == "detector" and state.version == "local"
    assert len(state.detector.gallery_ids) == 96 and state.threshold == state.detector.threshold
    # Network kinds run a checked TorchScript trace; the scores below still equal predict's eager ones.
    assert state.info["forward"] == ("torchscript trace" if name == "triplet" else "none (no network)")
    pred = predict_folder(load_detector(detectors[name]), sample_bench)
    expected = dict(zip(pred.ids, pred.scores.score, strict=True))
    paths = sorted((sample_bench / "test" / "real_unknown").glob("*.png"))
    got, rows = _service_scores(state, paths)
    want = np.array([expected[item_id(p.name)] for p in paths])
    assert np.ptp(want) > 1e-3
    for row in rows:
        assert row["decision"] == (row["score"] >= state.threshold)
        sims = [n["similarity"] for n in row["nearest"]]
        assert sims == sorted(sims, reverse=True) and {n["id"] for n in row["nearest"]} <= set(pred.gallery_ids)
    assert np.abs(got - want).max() < 1e-5


def test_gallery_folder_reindexes_without_refitting(detectors, sample_bench):
    saved = load_state(from_user_config({"detector": str(detectors["triplet"])}))
    test_only = load_state(from_user_config({"detector": str(detectors["triplet"]),
                                             "gallery": str(sample_bench / "test")}))
    assert len(test_only.detector.gallery_ids) == 48 and test_only.detector.gallery_ids[0] == "gen_00001"
    assert len(test_only.detector.reference_ids) == 12  # the test folder's real images
    assert test_only.info["gallery_source"] == str(sample_bench / "test")
    assert test_only.threshold == saved.threshold  # what was learnt is kept
    # A separate reference folder, and a threshold override.
    both = load_state(from_user_config({"detector": str(detectors["pixel"]), "gallery": str(sample_bench / "test"),
                                        "reference": str(sample_bench), "threshold": 0.5}))
    assert len(both.detector.reference_ids) > 12 and both.threshold == 0.5
    paths = sorted((sample_bench / "test" / "real_unknown").glob("*.png"))
    assert all(r["decision"] == (r["score"] >= 0.5) for r in _service_scores(both, paths)[1])


def test_not_a_detector_folder_is_named(tmp_path, sample_bench):
    with pytest.raises(ConfigError, match="--detector: .* holds no saved detector"):
        load_state(from_user_config({"detector": str(sample_bench)}))


def test_registry_source(detectors, tmp_path):
    """`registered_model` + `alias`: the alias is resolved to a version, the detector downloaded and loaded."""
    mlflow = pytest.importorskip("mlflow")
    from jobs.registry import log_detector, set_alias
    from jobs.tracking import setup_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        # Artifacts beside the sqlite file, not in ./mlruns of the working folder.
        mlflow.set_experiment(experiment_id=setup_experiment(uri, "serve-model-test"))
        with mlflow.start_run():
            mv = log_detector(detectors["pixel"], "fp-serve-model")
        set_alias("fp-serve-model", "champion", mv.version, reason="test", metrics={})
        state = load_state(from_user_config({"registered_model": "fp-serve-model", "tracking_uri": uri}))
    finally:
        mlflow.set_tracking_uri(previous)
    assert (state.kind, state.version, state.info["alias"]) == ("pixel", str(mv.version), "champion")
    assert state.info["source"] == "models:/fp-serve-model@champion" and len(state.detector.gallery_ids) == 96


# ---------------------------------------------------------------------------------------------------------
# The shipped Serve config, the app builder, the CLI


def test_shipped_config_yaml_is_deployable_and_valid():
    from ray.serve.schema import ServeDeploySchema

    from serve.app import DEFAULT_USER_CONFIG
    from serve.deploy import check_config, load_config

    raw = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    assert app.import_path == "serve.app:app" and raw["http_options"]["host"] == "127.0.0.1"
    dep = raw["applications"][0]["deployments"][0]
    # Every user_config value validates against ServeConfig (the source paths are the replicas', not checked).
    cfg = from_user_config(dep["user_config"])
    assert cfg.registered_model and not cfg.gallery  # by default the detector's saved gallery is served
    assert dep["user_config"] == DEFAULT_USER_CONFIG, "serve/config.yaml and serve.app.DEFAULT_USER_CONFIG differ"
    check_config(raw)
    # Overrides replace num_replicas/autoscaling as a pair.
    cfg = load_config(user_config={"reload": 3}, deployment={"num_replicas": 2})
    d = cfg["applications"][0]["deployments"][0]
    assert d["num_replicas"] == 2 and "autoscaling_config" not in d and d["user_config"]["reload"] == 3
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        check_config(load_config(user_config={"max_batch_size": 128}))
    # ... and the code leaves scaling to the file: an autoscaling_config set in code would survive a config
    # that asks for num_replicas (Serve then ignores num_replicas). test_serve_bench deploys 2 this way.
    from serve.app import app as shipped

    assert shipped._bound_deployment._deployment_config.autoscaling_config is None


def test_build_app_options(detectors):
    from serve.app import build_app

    args = {"detector": str(detectors["pixel"])}
    app = build_app({**args, "min_replicas": 1, "max_replicas": 3, "max_batch_size": 8})
    dep = app._bound_deployment
    assert dep._deployment_config.autoscaling_config.max_replicas == 3
    assert dep._deployment_config.user_config == {"detector": str(detectors["pixel"]), "max_batch_size": 8}
    assert dep._deployment_config.max_ongoing_requests == 64 and dep._deployment_config.max_surge_percent == 100
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        build_app({**args, "max_batch_size": 32, "max_ongoing_requests": 8})


def test_cli_flags(detectors, capsys):
    from fingerprint.commands.cli import build_parser
    from fingerprint.config import from_args, validate
    from serve.cli import ServeCommandConfig, app_args, command

    parser, _ = build_parser({"serve": command})
    ns = parser.parse_args(["serve", "--checkpoint", str(detectors["pixel"]), "--max-batch-size", "8",
                            "--max-replicas", "2", "--threshold", "0.3"])
    cfg = validate(from_args(ServeCommandConfig, ns))
    args = app_args(cfg)
    assert args["checkpoint"] == str(detectors["pixel"]) and args["max_batch_size"] == 8
    assert args["threshold"] == 0.3 and args["max_replicas"] == 2 and "host" not in args
    ns = parser.parse_args(["serve", "--detector", str(detectors["pixel"])])
    assert validate(from_args(ServeCommandConfig, ns)).detector_path() == str(detectors["pixel"])
    with pytest.raises(ConfigError, match="--max-ongoing-requests"):
        validate(ServeCommandConfig(detector=str(detectors["pixel"]), max_batch_size=128))
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Old name of --detector" in help_text and "re-indexes the detector" in help_text


# ---------------------------------------------------------------------------------------------------------
# The load generator's pieces (the load itself needs a running service: python -m serve.bench)


def test_bench_pieces(tmp_path, sample_bench, detectors):
    import python_multipart

    from serve.bench import BenchConfig, _multipart, make_detector, markdown, offline_ceiling

    images = sorted((sample_bench / "test" / "real_unknown").glob("*.png"))[:3]
    body, ctype = _multipart(images)
    parts: list[bytes] = []  # parsed by python-multipart, the parser behind the service's form reading
    parser = python_multipart.MultipartParser(ctype.split("boundary=")[1].encode(), {
        "on_part_begin": lambda: parts.append(b""),
        "on_part_data": lambda data, start, end: parts.__setitem__(-1, parts[-1] + data[start:end]),
    })
    parser.write(body)
    assert parts == [p.read_bytes() for p in images]

    cfg = BenchConfig(backbone="resnet18", image_size=32, embed_dim=8)
    det = make_detector(cfg, sample_bench, tmp_path)
    state = load_state(from_user_config({"detector": str(det)}))
    assert state.kind == "triplet" and state.threshold == 0.0 and len(state.detector.gallery_ids) == 96
    off = offline_ceiling(det, images, [1, 2], threads=1, min_seconds=0.1)
    assert set(off["layouts"]) == {"1x1"} and set(off["layouts"]["1x1"]) == {"eager", "traced"}
    assert set(off["layouts"]["1x1"]["traced"]) == {"1", "2"}
    every = [*off["layouts"]["1x1"]["eager"].values(), *off["layouts"]["1x1"]["traced"].values()]
    assert off["ceiling_images_per_s"] == max(every)
    assert off["decode_preprocess_forward_images_per_s"] > 0
    with pytest.raises(ValueError, match="no network to measure"):
        offline_ceiling(detectors["pixel"], images, [1], threads=1, min_seconds=0.1)
    cell = {"mode": "batched", "images_per_request": 1, "concurrency": 4, "ok": 10, "errors": {},
            "images_per_s": 5.0, "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0, "mean": 1.5},
            "mean_batch_size": 2.5, "max_observed_batch_size": 4, "replicas": 2, "wall_s": 2.0,
            "cpu_s": {"replicas": 0.02, "proxy": 0.01, "controller": 0.0, "load generator": 0.005,
                      "ray other": 0.0, "other": 0.005}}
    text = markdown({"name": "t", "model": "m", "machine": "x", "when": "now", "load_avg_before": 1.0, "cores": 2,
                     "config": {"torch_threads": 1, "throughput_optimized": True}, "forward": "eager",
                     "load_avg_after": 1.0, "offline": {"before": off, "after": off}, "cells": [cell]})
    # 10 images: 2 ms of replica CPU each, 1 of proxy, 0.5 of client, 0.5 of the rest; 0.04 s over 2 s x 2 cores.
    assert "| batched | 1 | 4 | 10 | 0 | 5.0 |" in text and "| 2.00 | 1.00 | 0.50 | 0.50 | 1% |" in text


def test_trace_is_checked_against_the_model():
    import torch

    from serve.model import trace_model

    class BatchTwoOnly(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.shape[0] == 2 else x  # a Python branch the trace (made on 2 images) bakes in

    class Plain(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(x.flatten(1), dim=1)

    cpu = torch.device("cpu")
    fn, how = trace_model(BatchTwoOnly(), (1, 4, 4), cpu)
    assert isinstance(fn, BatchTwoOnly) and "differs" in how
    fn, how = trace_model(Plain(), (1, 4, 4), cpu)
    assert how == "torchscript trace" and isinstance(fn, torch.jit.ScriptModule)
    x = torch.rand(5, 1, 4, 4)
    assert torch.equal(fn(x), Plain()(x))


# ---------------------------------------------------------------------------------------------------------
# Evidence pictures and the hardening that needs no Ray


def test_detectors_save_gallery_thumbnails_and_load_without_them(detectors, tmp_path):
    import shutil

    from fingerprint.data.thumbnails import THUMBS_FILE, load_thumbnails, make_thumbnails
    from fingerprint.detectors import load_detector

    state = load_state(from_user_config({"detector": str(detectors["gradient"])}))
    thumbs = state.thumbnails
    assert thumbs is not None and set(state.detector.gallery_ids) <= set(thumbs.ids)
    png = thumbs.png(state.detector.gallery_ids[0])
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and im.mode == "L" and max(im.size) <= 64
    assert thumbs.png("no-such-id") is None
    # Saved again, the pictures travel with the detector; without the file it still loads, without pictures.
    again = load_detector(state.detector.save(tmp_path / "again"))
    assert again.gallery_thumbnails.ids == thumbs.ids
    bare = tmp_path / "bare"
    shutil.copytree(detectors["gradient"], bare)
    (bare / THUMBS_FILE).unlink()
    assert load_state(from_user_config({"detector": str(bare)})).thumbnails is None
    (bare / THUMBS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="damaged thumbnails file"):
        load_thumbnails(bare)
    # Aspect is kept and small images are never enlarged.
    made = make_thumbnails([Image.new("L", (200, 50), 7), Image.new("RGB", (10, 20))], ["wide", "small"])
    assert made.get("wide").shape == (16, 64) and made.get("small").shape == (20, 10)


def test_decode_bounds_sides_and_aspect_before_decoding():
    import struct
    import zlib

    def png_header_only(w: int, h: int) -> bytes:
        """A PNG that declares w x h pixels but holds a few bytes of data: a decompression bomb's header."""
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
            chunk(b"IEND", b"")

    bomb = png_header_only(1048576, 1)
    assert len(bomb) < 1200
    with pytest.raises(InputError) as e:  # under the area limit, over the side limit
        decode_image(bomb, "bomb.png", 10**6, 4096 * 4096)
    assert e.value.status == 413 and "max_image_side" in str(e.value)
    with pytest.raises(InputError) as e:  # within both side limits, too elongated
        decode_image(png_header_only(4000, 10), "thin.png", 10**6, 4096 * 4096)
    assert e.value.status == 413 and "max_aspect_ratio" in str(e.value)


def _asgi_call(app, method: str = "POST", path: str = "/v1/score", headers: list | None = None,
               body_chunks: list | None = None, delay_s: float = 0.0) -> tuple[int, dict, dict]:
    """Run one request through an ASGI app; returns (status, headers, JSON body)."""
    import asyncio
    import json

    chunks = list(body_chunks or [b""])
    sent: list[dict] = []

    async def receive() -> dict:
        if chunks:
            if delay_s:
                await asyncio.sleep(delay_s)
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        await asyncio.sleep(3600)  # hang-guarded by the caller's wait_for
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers or [], "client": ("127.0.0.1", 1)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 60))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(body or b"null")


def test_guard_checks_token_and_body_before_forwarding():
    from serve.guard import Guard, GuardConfig

    seen: list[tuple[bytes, list]] = []

    async def inner(scope, receive, send):
        message = await receive()
        seen.append((message["body"], scope["headers"]))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    guard = Guard(inner, GuardConfig(token="s3cret", max_body_bytes=10, body_idle_timeout_s=0.2, body_timeout_s=5))
    status, headers, body = _asgi_call(guard, body_chunks=[b"abc"])
    assert status == 401 and body["error"] == "unauthorized" and headers["www-authenticate"] == "Bearer" and not seen
    assert _asgi_call(guard, "GET", "/-/routes")[0] == 401 and _asgi_call(guard, "GET", "/docs")[0] == 401
    assert _asgi_call(guard, "GET", "/healthz")[0] == 200  # probes and the page need no token
    auth = [(b"authorization", b"Bearer s3cret"), (b"x-request-timeout-seconds", b"0")]
    # A chunked body over the cap is refused while it streams; a stalled one times out; neither is forwarded.
    status, _, body = _asgi_call(guard, headers=auth, body_chunks=[b"123456", b"789012"])
    assert status == 413 and body["error"] == "request_too_large" and len(seen) == 1
    status, _, body = _asgi_call(guard, headers=auth, body_chunks=[b"1", b"2"], delay_s=0.5)
    assert status == 408 and body["error"] == "body_timeout" and len(seen) == 1
    # A complete body is forwarded whole, without Ray's per-request override headers.
    assert _asgi_call(guard, headers=auth, body_chunks=[b"12", b"34"])[0] == 200
    assert seen[-1] == (b"1234", [(b"authorization", b"Bearer s3cret")])


def test_guard_turns_plain_text_errors_into_json():
    from serve.guard import Guard, GuardConfig

    async def shed(scope, receive, send):  # what Ray's proxy sends when max_queued_requests is reached
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"2")]})
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure (...)."})

    async def died(scope, receive, send):  # a replica died: Ray's proxy sends nothing (uvicorn would say 500)
        return None

    status, headers, body = _asgi_call(Guard(shed, GuardConfig()), "GET", "/v1/model")
    assert (status, body["error"], headers["retry-after"]) == (503, "overloaded", "2")
    assert headers["content-type"] == "application/json"
    status, headers, body = _asgi_call(Guard(died, GuardConfig()), "GET", "/v1/model")
    assert (status, body["error"], headers["retry-after"]) == (503, "replica_unavailable", "1")
    # A probe shed for a full queue: the replicas are alive, only busy (readiness keeps its 503).
    assert _asgi_call(Guard(shed, GuardConfig()), "GET", "/healthz")[:3:2] == (200, {"status": "ok"})
    assert _asgi_call(Guard(shed, GuardConfig()), "GET", "/readyz")[0] == 503


def test_guard_rate_limit_per_token():
    from serve.guard import Guard, GuardConfig

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    guard = Guard(ok, GuardConfig(rate_per_s=0.01, rate_burst=2))
    codes = [_asgi_call(guard, "GET", "/v1/model")[0] for _ in range(3)]
    status, headers, body = _asgi_call(guard, "GET", "/v1/model")
    assert codes == [200, 200, 429] and status == 429 and body["error"] == "rate_limited"
    assert int(headers["retry-after"]) >= 1
    assert _asgi_call(guard, "GET", "/healthz")[0] == 200  # probes are never limited
