"""The serving layer without Ray: settings validation, upload decoding, model state loading, saved embeddings,
the shipped Serve config, and the `fingerprint serve` flags. Fast (a tiny checkpoint trained once)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fingerprint.config import ConfigError, ScoreConfig, from_dict
from fingerprint.data import load_image
from serve.config import ServeConfig, from_user_config
from serve.model import (
    InputError,
    checkpoint_digest,
    decode_image,
    load_state,
    save_embeddings,
)

ROOT = Path(__file__).resolve().parent.parent


def _encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def checkpoint(sample_bench, tiny_train_kwargs, tmp_path_factory) -> Path:
    from fingerprint import train
    from fingerprint.config import TrainConfig

    out = tmp_path_factory.mktemp("serve_ckpt")
    # mobilenetv2: its scores spread (~1e-2) where the tiny resnet18's all sit within 1e-5 of each other.
    return train.main(TrainConfig(data=str(sample_bench), out=str(out),
                                  **{**tiny_train_kwargs, "backbone": "mobilenetv2_100"}))


# ---------------------------------------------------------------------------------------------------------
# Settings


def test_user_config_lists_every_problem(tmp_path):
    with pytest.raises(ConfigError) as e:
        from_user_config({"colour": "red", "max_batch_size": "many", "batch_wait_timeout_s": True,
                          "gallery": str(tmp_path / "missing")})
    text = str(e.value)
    for needle in ("user_config.colour: unknown setting", "user_config.max_batch_size: expected an integer",
                   "user_config.batch_wait_timeout_s: expected a number"):
        assert needle in text
    with pytest.raises(ConfigError) as e:
        from_user_config({"gallery": str(tmp_path)})
    assert "exactly one model source (got neither)" in str(e.value)
    with pytest.raises(ConfigError) as e:
        from_user_config({"checkpoint": str(tmp_path), "registered_model": "m", "gallery": str(tmp_path),
                          "max_batch_size": 0, "calibrate": "maybe"})
    text = str(e.value)
    assert "got both" in text and "--max-batch-size: must be >= 1" in text and "--calibrate" in text


def test_user_config_converts_yaml_and_string_numbers(tmp_path):
    cfg = from_user_config({"checkpoint": str(tmp_path), "gallery": str(tmp_path), "batch_wait_timeout_s": 0,
                            "max_batch_size": "32", "k": "4", "threshold": "0.25"})
    assert cfg.batch_wait_timeout_s == 0.0 and isinstance(cfg.batch_wait_timeout_s, float)
    assert (cfg.max_batch_size, cfg.k, cfg.threshold) == (32, 4, 0.25)


def test_token_from_config_or_environment(monkeypatch, tmp_path):
    cfg = ServeConfig(checkpoint=str(tmp_path), gallery=str(tmp_path), auth_token_env="FP_TEST_TOKEN")
    monkeypatch.delenv("FP_TEST_TOKEN", raising=False)
    assert cfg.token() == ""
    monkeypatch.setenv("FP_TEST_TOKEN", "abc")
    assert cfg.token() == "abc"
    cfg.auth_token = "explicit"
    assert cfg.token() == "explicit"


# ---------------------------------------------------------------------------------------------------------
# Decoding uploads


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


# ---------------------------------------------------------------------------------------------------------
# Model state


def _cfg(checkpoint: Path, gallery: Path | str, **kw) -> ServeConfig:
    return from_user_config({"checkpoint": str(checkpoint), "gallery": str(gallery), **kw})


def _real_images(bench: Path) -> list[Image.Image]:
    return [load_image(p) for p in sorted((bench / "test" / "real_unknown").glob("*.png"))]


def _service_scores(state, images: list[Image.Image]) -> np.ndarray:
    # Uneven batches, as dynamic batching would make them.
    tensors = [state.pixels(im) for im in images]
    emb = np.concatenate([state.embed(tensors[i : i + 5]) for i in range(0, len(tensors), 5)])
    return state.score(emb).score


def test_calibrated_scores_equal_predict(checkpoint, sample_bench):
    """The calibrated path (reference pool) against the library's own `score_set`, as predict runs it."""
    from fingerprint import data as fpdata
    from fingerprint.checkpoint import load_checkpoint
    from fingerprint.predict import score_set

    state = load_state(_cfg(checkpoint, sample_bench, reference=str(sample_bench), calibrate="yes"))
    assert state.calibrated and state.reference is not None
    ckpt = load_checkpoint(checkpoint)
    dev, test = fpdata.open_benchmark(sample_bench)
    score_config = from_dict(ScoreConfig, {**ckpt.meta["score"], "calibrate": True})
    pred = score_set(ckpt, test.role("real_unknown"), test.generated + dev.generated,
                     test.role("real_unknown") + dev.real, score_config, ckpt.threshold, device="cpu")
    got = _service_scores(state, _real_images(sample_bench))
    assert np.ptp(pred.scores.score) > 1e-3
    assert np.abs(got - pred.scores.score).max() < 1e-5
    assert len(state.gallery.ids) == len(set(state.gallery.ids)) == 96  # test/ and dev/ prefixes keep ids apart


def test_calibration_without_reference_is_refused(checkpoint, sample_bench):
    with pytest.raises(ConfigError) as e:
        load_state(_cfg(checkpoint, sample_bench, calibrate="yes"))
    assert "--reference" in str(e.value) and "--calibrate no" in str(e.value)


def test_saved_gallery_embeddings_give_the_same_scores(checkpoint, sample_bench, tmp_path):
    from_images = load_state(_cfg(checkpoint, sample_bench / "test", calibrate="no"))
    sha = checkpoint_digest(checkpoint)
    npz = save_embeddings(tmp_path / "gallery.npz", from_images.gallery.vectors, from_images.gallery.ids, sha)
    from_file = load_state(_cfg(checkpoint, npz, calibrate="no"))
    assert from_file.gallery.ids == from_images.gallery.ids
    images = _real_images(sample_bench)
    assert np.abs(_service_scores(from_file, images) - _service_scores(from_images, images)).max() < 1e-6

    # .npy plus an ids file
    np.save(tmp_path / "g.npy", from_images.gallery.vectors)
    (tmp_path / "ids.txt").write_text("\n".join(from_images.gallery.ids) + "\n")
    npy = load_state(_cfg(checkpoint, tmp_path / "g.npy", gallery_ids=str(tmp_path / "ids.txt"), calibrate="no"))
    assert npy.gallery.ids == from_images.gallery.ids

    # Embeddings of another model, or of the wrong size, are refused with the reason.
    save_embeddings(tmp_path / "other.npz", from_images.gallery.vectors, from_images.gallery.ids, "0" * 64)
    with pytest.raises(ConfigError, match="computed with another model"):
        load_state(_cfg(checkpoint, tmp_path / "other.npz", calibrate="no"))
    np.save(tmp_path / "wide.npy", np.ones((4, 7), dtype=np.float32))
    with pytest.raises(ConfigError, match="dimension 7"):
        load_state(_cfg(checkpoint, tmp_path / "wide.npy", calibrate="no"))


def test_plain_folder_gallery_and_overrides(checkpoint, sample_bench):
    state = load_state(_cfg(checkpoint, sample_bench / "test" / "generated", calibrate="no", k=2, threshold=0.5))
    assert len(state.gallery.ids) == 48 and state.gallery.ids[0] == "gen_00001"
    assert state.score_config.k == 2 and state.threshold == 0.5
    assert state.info["version"] == "local" and len(state.info["checkpoint_sha256"]) == 64


# ---------------------------------------------------------------------------------------------------------
# The shipped Serve config, the app builder, the CLI


def test_shipped_config_yaml_is_deployable():
    from ray.serve.schema import ServeDeploySchema

    from serve.deploy import load_config

    raw = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    assert app.import_path == "serve.app:app" and raw["http_options"]["host"] == "127.0.0.1"
    dep = raw["applications"][0]["deployments"][0]
    unknown = set(dep["user_config"]) - set(ServeConfig.__dataclass_fields__)
    assert not unknown, f"config.yaml user_config has settings ServeConfig does not know: {unknown}"
    assert dep["max_ongoing_requests"] >= dep["user_config"]["max_batch_size"]
    # Overrides replace num_replicas/autoscaling as a pair.
    cfg = load_config(user_config={"reload": 3}, deployment={"num_replicas": 2})
    d = cfg["applications"][0]["deployments"][0]
    assert d["num_replicas"] == 2 and "autoscaling_config" not in d and d["user_config"]["reload"] == 3
    # ... and the code leaves scaling to the file: an autoscaling_config set in code would survive a config
    # that asks for num_replicas (Serve then ignores num_replicas). test_serve_bench deploys 2 this way.
    from serve.app import app as shipped

    assert shipped._bound_deployment._deployment_config.autoscaling_config is None


def test_build_app_options(checkpoint, sample_bench):
    from serve.app import build_app

    args = {"checkpoint": str(checkpoint), "gallery": str(sample_bench), "calibrate": "no"}
    app = build_app({**args, "min_replicas": 1, "max_replicas": 3, "max_batch_size": 8})
    dep = app._bound_deployment
    assert dep._deployment_config.autoscaling_config.max_replicas == 3
    assert dep._deployment_config.user_config["max_batch_size"] == 8
    assert dep._deployment_config.max_ongoing_requests == 64
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        build_app({**args, "max_batch_size": 32, "max_ongoing_requests": 8})


def test_cli_flags(checkpoint, sample_bench):
    from fingerprint.cli import build_parser
    from fingerprint.config import from_args, validate
    from serve.cli import ServeCommandConfig, app_args, command

    parser, loaded = build_parser({"serve": command})
    ns = parser.parse_args(["serve", "--checkpoint", str(checkpoint), "--gallery", str(sample_bench),
                            "--calibrate", "no", "--max-batch-size", "8", "--max-replicas", "2", "--k", "4"])
    cfg = validate(from_args(ServeCommandConfig, ns))
    args = app_args(cfg)
    assert args["max_batch_size"] == 8 and args["k"] == 4 and args["max_replicas"] == 2
    assert "host" not in args
    with pytest.raises(ConfigError, match="--max-ongoing-requests"):
        validate(ServeCommandConfig(checkpoint=str(checkpoint), gallery=str(sample_bench), max_batch_size=128))


# ---------------------------------------------------------------------------------------------------------
# The load generator's pieces (the load itself needs a running service: python -m serve.bench)


def test_bench_pieces(tmp_path, sample_bench):
    import python_multipart

    from serve.bench import BenchConfig, _multipart, make_checkpoint, markdown, offline_ceiling

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
    ckpt = make_checkpoint(cfg, tmp_path)
    state = load_state(from_user_config({"checkpoint": str(ckpt), "gallery": str(sample_bench)}))
    assert not state.calibrated and state.threshold == 0.0 and state.score_config.k == 5
    off = offline_ceiling(ckpt, images, [1, 2], threads=1, min_seconds=0.1)
    assert set(off["layouts"]) == {"1x1"} and set(off["layouts"]["1x1"]) == {"eager", "traced"}
    assert set(off["layouts"]["1x1"]["traced"]) == {"1", "2"}
    every = [*off["layouts"]["1x1"]["eager"].values(), *off["layouts"]["1x1"]["traced"].values()]
    assert off["ceiling_images_per_s"] == max(every)
    assert off["decode_preprocess_forward_images_per_s"] > 0
    cell = {"mode": "batched", "images_per_request": 1, "concurrency": 4, "ok": 10, "errors": {},
            "images_per_s": 5.0, "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0, "mean": 1.5},
            "mean_batch_size": 2.5, "max_observed_batch_size": 4, "replicas": 2, "wall_s": 2.0,
            "cpu_s": {"replicas": 0.02, "proxy": 0.01, "controller": 0.0, "load generator": 0.005,
                      "ray other": 0.0, "other": 0.005}}
    text = markdown({"name": "t", "model": "m", "machine": "x", "when": "now", "load_avg_before": 1.0, "cores": 2,
                     "config": {"torch_threads": 1, "throughput_optimized": True}, "forward": "torchscript trace",
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
    assert from_user_config({"checkpoint": ".", "gallery": ".", "trace": "false"}).trace is False
