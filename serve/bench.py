"""Bounded load test of the scoring service on loopback, beside the offline batched forward (the ceiling).

    python -m serve.bench --out benchmarks/results --images-per-request 1,8   # lite0 at 64 px, phantom data
    python -m serve.bench --image-size 224 --name lite0-224 --requests 150   # a heavier forward pass

For each mode (dynamic batching on; `max_batch_size=1`), images per request and concurrency level, N
closed-loop clients send POST /v1/score requests (multipart, encoded once beforehand) until --requests have
been answered or --seconds have passed, after a warm-up. Reported: throughput (images/s), latency
p50/p95/p99, errors, the batch sizes the replica observed, and throughput as a fraction of the offline
ceiling: the same model's forward pass (eager and traced, the faster counts) on pre-processed batches in one
process using every core, measured before and after the service runs (the machine is shared; the spread
shows how much the load moved).

Writes <out>/serve_<name>.json and <out>/serve_<name>.md. Everything runs on this machine: the load
generator shares the cores with the service, as a co-located client would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import resource
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fingerprint.config import flag, validate
from fingerprint.io import write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    checkpoint: str = ""
    """Checkpoint to serve; empty builds an untrained one from --backbone/--image-size/--embed-dim (the
    forward pass costs the same whatever the weights)."""
    backbone: str = "tf_efficientnet_lite0"
    """timm backbone of the untrained checkpoint."""
    image_size: int = 64
    """Input size of the untrained checkpoint (the shared CT benchmarks are 64 px)."""
    embed_dim: int = 128
    """Embedding size of the untrained checkpoint."""
    data: str = ""
    """Benchmark folder: its test real images are the requests, its generated images the gallery. Empty makes
    a phantom benchmark in a temporary folder."""
    requests: int = 200
    """Requests per (mode, concurrency) cell, after warm-up."""
    seconds: float = 60.0
    """Time cap per cell: a cell stops at --requests or --seconds, whichever comes first."""
    warmup: int = 16
    """Requests per cell before measuring."""
    concurrency: str = "1,4,16,32"
    """Comma-separated numbers of concurrent clients."""
    images_per_request: str = "1"
    """Comma-separated images per request (several per request amortise the HTTP cost per image)."""
    max_batch_size: int = 16
    """Batch size for the batched mode (the other mode uses 1)."""
    batch_wait_timeout_s: float = 0.02
    """Batch wait for the batched mode. Longer waits fill batches when the replica's CPU is the bottleneck (a
    full batch costs far less per image), at up to this much extra latency when traffic is light."""
    torch_threads: int = 1
    """Intra-op threads of the replica. One is best on 2 cores: the proxy, the replica's request handling and
    the load generator need the other, and a second intra-op thread only spins waiting for it."""
    offline_threads: int = 0
    """Intra-op threads for the offline ceiling; 0 = every core (the ceiling is the whole machine's)."""
    offline_batch_sizes: str = "1,16,32"
    """Batch sizes for the offline forward; the ceiling is the best of them."""
    out: str = "benchmarks/results"
    """Folder for serve_<name>.json and serve_<name>.md."""
    name: str = ""
    """Result name (default: <backbone>-<image size>)."""

    def problems(self) -> list[str]:
        out = []
        if self.checkpoint and not Path(self.checkpoint).exists():
            out.append(f"{flag('checkpoint')}: '{self.checkpoint}' does not exist")
        if self.data and not Path(self.data).exists():
            out.append(f"{flag('data')}: '{self.data}' does not exist")
        if self.offline_threads < 0:
            out.append(f"{flag('offline_threads')}: must be >= 0")
        for name in ("requests", "max_batch_size", "torch_threads"):
            if getattr(self, name) < 1:
                out.append(f"{flag(name)}: must be >= 1")
        if self.seconds <= 0:
            out.append(f"{flag('seconds')}: must be > 0")
        for name in ("concurrency", "offline_batch_sizes", "images_per_request"):
            try:
                values = _ints(getattr(self, name))
                if not values or min(values) < 1:
                    raise ValueError
            except ValueError:
                out.append(f"{flag(name)}: give positive integers separated by commas (got {getattr(self, name)!r})")
        return out


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


# ---------------------------------------------------------------------------------------------------------
# Inputs


def make_checkpoint(config: BenchConfig, out: Path) -> Path:
    """An untrained checkpoint with the given backbone and input size (k=5, uncalibrated, threshold 0)."""
    from fingerprint.backbones import create_embedder, data_config
    from fingerprint.checkpoint import save_checkpoint
    from fingerprint.config import ModelConfig, TrainConfig, to_dict

    mc = ModelConfig(backbone=config.backbone, weights="none", embed_dim=config.embed_dim,
                     image_size=config.image_size, in_chans=1)
    model = create_embedder(mc)
    train_cfg = TrainConfig(**to_dict(mc), data="(none)", calibrate=False)
    meta = {"config": to_dict(train_cfg), "data_config": data_config(model, mc),
            "score": {"k": 5, "reduction": "mean", "calibrate": False, "threshold": 0.0}, "metrics": {},
            "epoch": 0, "split": {}}
    return save_checkpoint(out / "checkpoint", model, meta)


def make_data(out: Path) -> Path:
    from fingerprint.phantoms import make_sample_dataset

    make_sample_dataset(out / "bench", n_patients=30, slices_per_patient=4, size=64, n_generated_dev=200,
                        n_generated_test=200, seed=0)
    return out / "bench"


def _request_images(data: Path) -> list[Path]:
    for sub in ("test/real_unknown", "dev/used", "real_unknown", "used"):
        files = sorted((data / sub).glob("*.png"))
        if files:
            return files
    raise FileNotFoundError(f"{data}: no real images (test/real_unknown/*.png) to send")


def _multipart(paths: list[Path], boundary: str = "fingerprintbenchboundary") -> tuple[bytes, str]:
    """A multipart body with `paths` as file parts named 'files', encoded once so the client spends no CPU on it."""
    parts = [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{p.name}\"\r\n"
              "Content-Type: image/png\r\n\r\n").encode() + p.read_bytes() + b"\r\n" for p in paths]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# ---------------------------------------------------------------------------------------------------------
# Offline ceiling


def offline_ceiling(checkpoint: Path, images: list[Path], batch_sizes: list[int], threads: int,
                    min_seconds: float = 4.0) -> dict[str, Any]:
    """Images/s of the forward pass alone (pre-processed tensors) and of decode + pre-process + forward."""
    import torch

    from fingerprint.checkpoint import load_checkpoint
    from fingerprint.data import load_image
    from fingerprint.transforms import Preprocess
    from serve.model import trace_model

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ckpt = load_checkpoint(checkpoint)
        model = ckpt.model.eval()
        tf = Preprocess(ckpt.meta["data_config"])
        tensors = [tf(load_image(p)) for p in images]
        forward: dict[str, float] = {}
        traced: dict[str, float] = {}
        fast, _ = trace_model(model, tuple(ckpt.meta["data_config"]["input_size"]), torch.device("cpu"))
        with torch.no_grad():
            for bs in batch_sizes:
                batches = [torch.stack([tensors[(s + j) % len(tensors)] for j in range(bs)])
                           for s in range(0, len(tensors), bs)]
                for net, table in ((model, forward), (fast, traced)):
                    net(batches[0])  # warm-up (allocations, oneDNN kernels, the trace's optimisation)
                    net(batches[0])
                    n, t0, i = 0, time.perf_counter(), 0
                    while time.perf_counter() - t0 < min_seconds:
                        net(batches[i % len(batches)])
                        n += bs
                        i += 1
                    table[str(bs)] = n / (time.perf_counter() - t0)
            best = max(batch_sizes, key=lambda b: max(forward[str(b)], traced[str(b)]))
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < min_seconds:
                for s in range(0, len(images), best):
                    batch = torch.stack([tf(load_image(p)) for p in images[s : s + best]])
                    model(batch)
                    n += len(batch)
            end_to_end = n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return {"forward_images_per_s": forward, "traced_forward_images_per_s": traced, "best_batch_size": best,
            "ceiling_images_per_s": max(forward[str(best)], traced[str(best)]),
            "decode_preprocess_forward_images_per_s": end_to_end, "threads": threads}


# ---------------------------------------------------------------------------------------------------------
# Load generator


async def run_load(url: str, bodies: list[tuple[bytes, str]], concurrency: int, requests: int, seconds: float,
                   warmup: int, images_per_request: int = 1) -> dict[str, Any]:
    """Closed loop: `concurrency` clients, each sending its next request when the previous one answered."""
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = {"sent": 0}

    async def client(session: aiohttp.ClientSession, measure: bool, budget: int, deadline: float) -> None:
        while counter["sent"] < budget and time.perf_counter() < deadline:
            body, ctype = bodies[counter["sent"] % len(bodies)]
            counter["sent"] += 1
            t = time.perf_counter()
            try:
                async with session.post(url, data=body, headers={"content-type": ctype}) as r:
                    await r.read()
                    status = r.status
            except aiohttp.ClientError as e:
                status = type(e).__name__
            if measure:
                if status == 200:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session, False, warmup, time.perf_counter() + seconds)
                               for _ in range(concurrency)))
        counter["sent"] = 0
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session, True, requests, t0 + seconds) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    lat = np.array(latencies) * 1000
    return {
        "concurrency": concurrency, "images_per_request": images_per_request, "ok": len(latencies),
        "errors": errors, "wall_s": round(wall, 3),
        "images_per_s": len(latencies) * images_per_request / wall if wall > 0 else 0.0,
        "latency_ms": {q: float(np.percentile(lat, int(q[1:]))) if len(lat) else None for q in ("p50", "p95", "p99")}
        | {"mean": float(lat.mean()) if len(lat) else None},
        "client_cpu_s": round((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime), 3),
    }


def _get_json(url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:  # loopback only
        return json.loads(r.read())


def _post(url: str) -> None:
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(url, method="POST", data=b""), timeout=30).read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------


def serve_cells(config: BenchConfig, checkpoint: Path, data: Path, images: list[Path]) -> list[dict[str, Any]]:
    import ray
    from ray import serve

    from serve.deploy import deploy_config, load_config

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    bodies = {n: [_multipart([images[(i + j) % len(images)] for j in range(n)]) for i in range(len(images))]
              for n in _ints(config.images_per_request)}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    cells = []
    try:
        for mode, mbs in (("batched", config.max_batch_size), ("max_batch_size=1", 1)):
            cfg = load_config(
                user_config={"checkpoint": str(checkpoint), "registered_model": "", "gallery": str(data),
                             "reference": "", "calibrate": "no", "max_batch_size": mbs,
                             "batch_wait_timeout_s": config.batch_wait_timeout_s if mbs > 1 else 0.0,
                             "torch_threads": config.torch_threads, "auth_token_env": ""},
                deployment={"num_replicas": 1, "max_ongoing_requests": max(64, 2 * config.max_batch_size)})
            cfg["http_options"]["port"] = port
            deploy_config(cfg)
            info = _get_json(f"{base}/v1/model")
            forward = info["forward"]
            log.info("%s: serving %s (%s), gallery %d, threads %d", mode, info["backbone"], forward,
                     info["gallery"]["size"], info["torch_threads"])
            for n, c in [(n, c) for n in bodies for c in _ints(config.concurrency)]:
                _post(f"{base}/v1/stats/reset")
                cell = asyncio.run(run_load(f"{base}/v1/score", bodies[n], c, config.requests, config.seconds,
                                            config.warmup, n))
                batching = _get_json(f"{base}/v1/model")["batching"]
                cell.update(mode=mode, max_batch_size=mbs, forward=forward, mean_batch_size=batching["mean_batch_size"],
                            max_observed_batch_size=batching["max_observed_batch_size"],
                            load_avg_after=os.getloadavg()[0])
                log.info("%-16s n=%-2d c=%-3d %7.1f img/s  p50 %7.1f ms  p99 %7.1f ms  batch %.2f  errors %s", mode, n,
                         c, cell["images_per_s"], cell["latency_ms"]["p50"] or -1, cell["latency_ms"]["p99"] or -1,
                         cell["mean_batch_size"] or 0, cell["errors"] or "none")
                cells.append(cell)
    finally:
        serve.shutdown()
        ray.shutdown()
    return cells


def markdown(result: dict[str, Any]) -> str:
    off = result["offline"]
    ceiling = max(off["before"]["ceiling_images_per_s"], off["after"]["ceiling_images_per_s"])
    lines = [
        f"# Serving benchmark: {result['name']}",
        "",
        f"{result['model']}; {result['machine']}; {result['when']}.",
        f"Load average (1 min) before / after: {result['load_avg_before']:.2f} / {result['load_avg_after']:.2f} "
        "(the machine is shared with other work: numbers move with it).",
        "",
        f"Offline forward pass ({off['before']['threads']} threads), pre-processed batches, images/s "
        "(before / after the service ran):",
        "",
        "| batch | eager before | eager after | traced before | traced after |",
        "|---:|---:|---:|---:|---:|",
    ]
    b, a = off["before"], off["after"]
    for bs in b["forward_images_per_s"]:
        lines.append(f"| {bs} | {b['forward_images_per_s'][bs]:.1f} | {a['forward_images_per_s'][bs]:.1f} | "
                     f"{b['traced_forward_images_per_s'][bs]:.1f} | {a['traced_forward_images_per_s'][bs]:.1f} |")
    lines += [
        "",
        f"Decode + pre-process + eager forward (batch {b['best_batch_size']}): "
        f"{b['decode_preprocess_forward_images_per_s']:.1f} / {a['decode_preprocess_forward_images_per_s']:.1f} "
        "images/s.",
        "",
        f"Ceiling used below: {ceiling:.1f} images/s (best offline forward, eager or traced, before or after).",
        "",
        f"Service: POST /v1/score (multipart), closed-loop clients on loopback, one replica with "
        f"{result['config']['torch_threads']} intra-op thread(s), forward: {result.get('forward', '?')}. Latency is "
        "per request; images/s counts images.",
        "",
        "| mode | images/request | clients | ok requests | errors | images/s | vs ceiling | p50 ms | p95 ms | p99 ms "
        "| mean batch | max batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["cells"]:
        lat = c["latency_ms"]
        lines.append(
            f"| {c['mode']} | {c['images_per_request']} | {c['concurrency']} | {c['ok']} | "
            f"{sum(c['errors'].values())} | "
            f"{c['images_per_s']:.1f} | {c['images_per_s'] / ceiling:.2f} | {lat['p50']:.1f} | {lat['p95']:.1f} | "
            f"{lat['p99']:.1f} | {c['mean_batch_size'] or 0:.2f} | {c['max_observed_batch_size'] or 0} |")
    return "\n".join(lines) + "\n"


def main(config: BenchConfig) -> Path:
    """Measure the offline ceiling, then the service at each concurrency, with and without batching."""
    validate(config)
    import torch

    name = config.name or f"{config.backbone}-{config.image_size}"
    with tempfile.TemporaryDirectory(prefix="fingerprint-bench-") as tmp:
        tmp_path = Path(tmp)
        checkpoint = Path(config.checkpoint) if config.checkpoint else make_checkpoint(config, tmp_path)
        data = Path(config.data) if config.data else make_data(tmp_path)
        images = _request_images(data)
        load_before = os.getloadavg()[0]
        batch_sizes = _ints(config.offline_batch_sizes)
        threads = config.offline_threads or os.cpu_count() or 1
        before = offline_ceiling(checkpoint, images, batch_sizes, threads)
        log.info("offline before: %s", before)
        cells = serve_cells(config, checkpoint, data, images)
        after = offline_ceiling(checkpoint, images, batch_sizes, threads)
        log.info("offline after: %s", after)
    result = {
        "name": name, "config": asdict(config),
        "model": f"{config.backbone} at {config.image_size} px, embed {config.embed_dim}"
        if not config.checkpoint else f"checkpoint {config.checkpoint}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0],
        "offline": {"before": before, "after": after}, "cells": cells,
        "forward": cells[0]["forward"] if cells else None,
    }
    out = Path(config.out)
    write_text_atomic(out / f"serve_{name}.json", json.dumps(result, indent=2))
    path = write_text_atomic(out / f"serve_{name}.md", markdown(result))
    print(markdown(result))
    return path


if __name__ == "__main__":
    import argparse

    from fingerprint.config import add_arguments, from_args

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, BenchConfig)
    main(from_args(BenchConfig, parser.parse_args()))
