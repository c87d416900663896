"""Bounded load test of the scoring service on loopback, beside the offline batched forward (the ceiling).

    python -m serve.bench --out benchmarks/results              # lite0 at 64 px, phantom data, 1/8/32 per request
    python -m serve.bench --detector runs/fit/detector --data data/sample   # a saved frozen/triplet detector
    python -m serve.bench --image-size 224 --name tf_efficientnet_lite0-224-batch2 --max-batch-size 2 \
        --images-per-request 1,8 --concurrency 1,4,16 --offline-batch-sizes 1,2,4,16   # a heavier forward

For each mode (dynamic batching on; `max_batch_size=1`), images per request and concurrency level, N
closed-loop clients send POST /v1/score requests (multipart, encoded once beforehand) until --requests have
been answered or --seconds have passed, after a warm-up. Reported: throughput (images/s), latency
p50/p95/p99, errors, the batch sizes the replicas observed, where the CPU time went (replicas, HTTP proxy,
load generator, Ray's own processes, anything else on the machine, from /proc), and throughput as a
fraction of the offline ceiling.

The service runs a network kind's eager forward inside `Detector.score`; the offline ceiling also measures a
TorchScript trace of the same network, to show what tracing would add. The ceiling is the best forward pass of
the same network on pre-processed batches that this machine manages,
measured before and after the service runs (the spread shows how much other load moved it): eager and
traced, at several batch sizes, as one process using every core and as one single-threaded process per
replica running at once. The service is held to the best of all of these, not to the layout it happens to use.

Writes <out>/serve_<name>.json and <out>/serve_<name>.md. Everything runs on this machine: the load
generator shares the cores with the service, as a co-located client would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fingerprint.config import flag, validate
from fingerprint.io import write_text_atomic

log = logging.getLogger(__name__)

THROUGHPUT_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
"""Serve's high-throughput mode; read by Serve's processes when they start (--throughput-optimized)."""


@dataclass
class BenchConfig:
    detector: str = ""
    """Saved network detector (kind frozen or triplet) to serve; empty builds an untrained triplet detector from
    --backbone/--image-size/--embed-dim, indexed on --data (the forward pass costs the same whatever the
    weights)."""
    backbone: str = "tf_efficientnet_lite0"
    """timm backbone of the untrained detector."""
    image_size: int = 64
    """Input size of the untrained detector (the shared CT benchmarks are 64 px)."""
    embed_dim: int = 128
    """Embedding size of the untrained detector."""
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
    images_per_request: str = "1,8,32"
    """Comma-separated images per request (several per request amortise the HTTP cost per image)."""
    replicas: int = 0
    """Service replicas, each with --torch-threads intra-op threads and its share of the cores; 0 = one per
    core. On CPU, single-threaded replicas side by side beat one replica with several threads: they share no
    thread barrier, and one replica's decoding overlaps the other's forward pass."""
    max_batch_size: int = 32
    """Batch size for the batched mode (the other mode uses 1)."""
    batch_wait_timeout_s: float = 0.02
    """Batch wait for the batched mode. Longer waits fill batches when the replica's CPU is the bottleneck (a
    full batch costs far less per image), at up to this much extra latency when traffic is light."""
    torch_threads: int = 1
    """Intra-op threads of each replica."""
    throughput_optimized: bool = False
    """Start Ray with RAY_SERVE_THROUGHPUT_OPTIMIZED=1, Serve's own high-throughput mode (gRPC between proxy
    and replicas, user code on the replica's main loop, no per-request log to stderr), instead of Serve's
    defaults (what serve/config.yaml and `fingerprint serve` run)."""
    offline_threads: int = 0
    """Intra-op threads of the one-process offline ceiling; 0 = every core."""
    offline_batch_sizes: str = "1,16,32"
    """Batch sizes for the offline forward; the ceiling is the best of them."""
    offline_seconds: float = 4.0
    """Seconds per offline measurement (each layout, forward and batch size)."""
    out: str = "benchmarks/results"
    """Folder for serve_<name>.json and serve_<name>.md."""
    name: str = ""
    """Result name (default: <backbone>-<image size>)."""

    def problems(self) -> list[str]:
        out = []
        if self.detector and not Path(self.detector).exists():
            out.append(f"{flag('detector')}: '{self.detector}' does not exist")
        if self.data and not Path(self.data).exists():
            out.append(f"{flag('data')}: '{self.data}' does not exist")
        for name in ("offline_threads", "replicas"):
            if getattr(self, name) < 0:
                out.append(f"{flag(name)}: must be >= 0")
        for name in ("requests", "max_batch_size", "torch_threads"):
            if getattr(self, name) < 1:
                out.append(f"{flag(name)}: must be >= 1")
        for name in ("seconds", "offline_seconds"):
            if getattr(self, name) <= 0:
                out.append(f"{flag(name)}: must be > 0")
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


def make_detector(config: BenchConfig, data: Path, out: Path) -> Path:
    """An untrained triplet detector (random weights, k=5, uncalibrated, threshold 0) indexed on `data`."""
    from fingerprint.detectors import create_detector
    from serve.model import reindex

    det = create_detector("triplet", {"backbone": config.backbone, "weights": "none", "image_size": config.image_size,
                                      "embed_dim": config.embed_dim, "k": 5, "calibrate": False, "device": "cpu"})
    det.build("none")
    reindex(det, data)
    det.meta.extra["name"] = f"untrained {config.backbone}"
    return det.save(out / "detector")


def _network(detector: str | Path) -> tuple[Any, Any, tuple[int, ...]]:
    """The forward module, preprocessing and input size of a saved network detector."""
    from fingerprint.commands.predict import resolve_detector
    from fingerprint.detectors import load_detector

    det = load_detector(resolve_detector(detector))
    if not hasattr(det, "forward_module"):
        raise ValueError(f"--detector: a {det.kind} detector has no network to measure; give a frozen or "
                         "triplet detector, or leave --detector empty for an untrained one")
    return det.forward_module().eval(), det.transform, tuple(det.meta.extra["data_config"]["input_size"])


def make_data(out: Path) -> Path:
    from fingerprint.data.phantoms import make_sample_dataset

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


def _forward_rates(detector: str, images: list[str], batch_sizes: list[int], threads: int, min_seconds: float,
                   barrier: Any = None) -> dict[str, dict[str, float]]:
    """Images/s of the eager and the traced forward pass on pre-processed batches, by batch size.

    With a `barrier`, every process starts each timed run together, so concurrent processes share the cores
    the way replicas do.
    """
    import torch

    from fingerprint.data.images import load_image
    from serve.model import trace_model

    torch.set_num_threads(threads)
    model, transform, input_size = _network(detector)
    inputs = transform.batch([load_image(p) for p in images])
    fast, _ = trace_model(model, input_size, torch.device("cpu"))
    rates: dict[str, dict[str, float]] = {"eager": {}, "traced": {}}
    with torch.no_grad():
        for bs in batch_sizes:
            batches = [inputs[[(s + j) % len(inputs) for j in range(bs)]] for s in range(0, len(inputs), bs)]
            for name, net in (("eager", model), ("traced", fast)):
                net(batches[0])  # warm-up (allocations, oneDNN kernels, the trace's optimisation)
                net(batches[0])
                if barrier is not None:
                    barrier.wait(timeout=300)
                # Count only batches that finish inside one window common to every process, and keep running
                # past its end: then all processes load the cores for the whole window. (Each timing its own
                # window would let one run alone while another starts late, and inflate the sum.)
                start = time.time() + 0.25 * min_seconds
                end = start + min_seconds
                n, i = 0, 0
                while time.time() < end:
                    net(batches[i % len(batches)])
                    i += 1
                    if start <= time.time() <= end:
                        n += bs
                rates[name][str(bs)] = n / min_seconds
    return rates


def _forward_rates_worker(args: tuple[Any, ...], barrier: Any, queue: Any) -> None:
    try:
        queue.put(_forward_rates(*args, barrier=barrier))
    except BaseException as e:  # the parent waits on the queue: tell it, do not leave it hanging
        barrier.abort()
        queue.put(e)
        raise


def forward_rates(detector: Path, images: list[Path], batch_sizes: list[int], threads: int, processes: int = 1,
                  min_seconds: float = 4.0) -> dict[str, dict[str, float]]:
    """`_forward_rates` of `processes` processes with `threads` threads each, running at once, summed."""
    args = (str(detector), [str(p) for p in images], batch_sizes, threads, min_seconds)
    if processes == 1:
        import torch

        previous = torch.get_num_threads()
        try:
            return _forward_rates(*args)
        finally:
            torch.set_num_threads(previous)
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked Ray or torch thread state
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_forward_rates_worker, args=(args, barrier, queue), daemon=True)
             for _ in range(processes)]
    for proc in procs:
        proc.start()
    try:
        results = [queue.get(timeout=600) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise RuntimeError(f"offline forward in a child process failed: {failed[0]!r}") from failed[0]
    return {net: {bs: sum(r[net][bs] for r in results) for bs in results[0][net]} for net in results[0]}


def offline_ceiling(detector: Path, images: list[Path], batch_sizes: list[int], threads: int,
                    processes: int = 1, min_seconds: float = 4.0) -> dict[str, Any]:
    """The best offline forward over layouts (1 process x `threads`; `processes` x 1 thread), forwards and
    batch sizes, plus decode + pre-process + forward in one process (what a service without HTTP could do)."""
    import torch

    from fingerprint.data.images import load_image

    layouts = {f"1x{threads}": forward_rates(detector, images, batch_sizes, threads, 1, min_seconds)}
    if processes > 1:
        layouts[f"{processes}x1"] = forward_rates(detector, images, batch_sizes, 1, processes, min_seconds)
    best = max(((rate, layout, net, bs) for layout, nets in layouts.items() for net, by_bs in nets.items()
                for bs, rate in by_bs.items()), key=lambda t: t[0])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, tf, _ = _network(detector)
        bs = int(best[3])
        with torch.no_grad():
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < min_seconds:
                for s in range(0, len(images), bs):
                    batch = tf.batch([load_image(p) for p in images[s : s + bs]])
                    model(batch)
                    n += len(batch)
            end_to_end = n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return {"layouts": layouts, "ceiling_images_per_s": best[0],
            "ceiling_at": {"layout": best[1], "forward": best[2], "batch_size": int(best[3])},
            "decode_preprocess_forward_images_per_s": end_to_end, "decode_preprocess_forward_batch_size": bs,
            "threads": threads}


# ---------------------------------------------------------------------------------------------------------
# Where the CPU goes

ROLES = (("ServeReplica", "replicas"), ("ProxyActor", "proxy"), ("ServeController", "controller"))
"""Command-line markers of Serve's actors (Ray names their processes ray::<Actor>)."""


def cpu_times() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of every visible process, by pid, with its command line; {} without /proc."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended while we looked
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        name = cmd or stat[stat.find("(") + 1 : stat.rfind(")")]
        out[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
    return out


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                client_pid: int) -> dict[str, float]:
    """CPU seconds spent between two `cpu_times` snapshots by the replicas, the proxy, the controller, the load
    generator, Ray's other processes (GCS, raylet, agents) and everything else on the machine."""
    roles = {name: 0.0 for name in ("replicas", "proxy", "controller", "load generator", "ray other", "other")}
    for pid, (cmd, t) in after.items():
        spent = t - before.get(pid, (cmd, 0.0))[1]
        if pid == client_pid:
            role = "load generator"
        else:
            role = next((name for marker, name in ROLES if marker in cmd), None) or (
                "ray other" if ("ray::" in cmd or "/ray/" in cmd) else "other")
        roles[role] += max(spent, 0.0)
    return {k: round(v, 3) for k, v in roles.items()}


# ---------------------------------------------------------------------------------------------------------
# Load generator


RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
"""Answers worth sending the same request again for: shed load, a replica that died, a timeout. Scoring is
idempotent, so a retry never does harm; a 4xx about the input would fail the same way again."""


async def post_with_retry(session: Any, url: str, body: bytes, headers: dict[str, str], attempts: int = 4,
                          max_wait_s: float = 2.0, failed: list[Any] | None = None) -> tuple[int | str, int]:
    """POST with the client retry policy: up to `attempts` tries on RETRY_STATUSES and dropped connections,
    waiting what Retry-After says (at most `max_wait_s`), else 0.1, 0.2, 0.4 s. Returns (last status or error
    name, retries used); the status of each attempt that was retried is appended to `failed`."""
    import aiohttp

    status: int | str = "none"
    for attempt in range(attempts):
        wait = 0.1 * 2 ** attempt
        try:
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                status = r.status
                if status not in RETRY_STATUSES:
                    return status, attempt
                after = r.headers.get("retry-after", "")
                wait = float(after) if after.replace(".", "", 1).isdigit() else wait
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            status = type(e).__name__
        if attempt + 1 < attempts:
            if failed is not None:
                failed.append(status)
            await asyncio.sleep(min(wait, max_wait_s))
    return status, attempts - 1


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
                status, retried = await post_with_retry(session, url, body, {"content-type": ctype})
                counter["retries"] = counter.get("retries", 0) + retried * measure
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
        procs0 = cpu_times()
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session, True, requests, t0 + seconds) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        procs1 = cpu_times()
    lat = np.array(latencies) * 1000
    return {
        "concurrency": concurrency, "images_per_request": images_per_request, "ok": len(latencies),
        "errors": errors, "retries": counter.get("retries", 0), "wall_s": round(wall, 3),
        "images_per_s": len(latencies) * images_per_request / wall if wall > 0 else 0.0,
        "latency_ms": {q: float(np.percentile(lat, int(q[1:]))) if len(lat) else None for q in ("p50", "p95", "p99")}
        | {"mean": float(lat.mean()) if len(lat) else None},
        "cpu_s": cpu_by_role(procs0, procs1, os.getpid()) if procs1 else None,
    }


def _get_json(url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:  # loopback only
        return json.loads(r.read())


def _post(url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, method="POST", data=b""), timeout=30) as r:
        return json.loads(r.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------


def _ask_each_replica(ask: Callable[[], dict[str, Any]], replicas: int) -> dict[str, dict[str, Any]]:
    """Answers by replica tag: each HTTP call reaches one replica, so ask until every replica has answered."""
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(10 * replicas):
        answer = ask()
        seen[answer["replica"]] = answer
        if len(seen) == replicas:
            break
    return seen


def _replica_batching(base: str, replicas: int) -> dict[str, Any]:
    """Batch statistics merged over the replicas."""
    seen = _ask_each_replica(lambda: _get_json(f"{base}/v1/model"), replicas)
    histogram: dict[int, int] = {}
    for info in seen.values():
        for size, count in info["batching"]["histogram"].items():
            histogram[int(size)] = histogram.get(int(size), 0) + count
    images, batches = sum(k * v for k, v in histogram.items()), sum(histogram.values())
    return {"replicas_seen": len(seen), "mean_batch_size": round(images / batches, 3) if batches else None,
            "max_observed_batch_size": max(histogram) if histogram else None}


def serve_cells(config: BenchConfig, detector: Path, data: Path, images: list[Path]) -> list[dict[str, Any]]:
    import sys

    from jobs.ray_session import secure_local_auth

    if "ray" not in sys.modules:
        secure_local_auth()  # before Ray is imported: it reads its auth mode then
    import ray
    from ray import serve

    from serve.deploy import deploy_config, load_config

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    bodies = {n: [_multipart([images[(i + j) % len(images)] for j in range(n)]) for i in range(len(images))]
              for n in _ints(config.images_per_request)}
    cores = os.cpu_count() or 1
    replicas = config.replicas or cores
    # Read by Serve's processes when they start (they inherit the driver's environment through the raylet).
    saved = os.environ.get(THROUGHPUT_ENV)
    os.environ[THROUGHPUT_ENV] = "1" if config.throughput_optimized else "0"
    cells = []
    try:
        # With the dashboard: serve.deploy applies configs through Serve's REST API, as `serve deploy` does.
        from jobs.ray_session import init_ray

        ctx = init_ray(num_cpus=cores, dashboard=True, dashboard_port=_free_port(), log_to_driver=False)
        dashboard = f"http://{ctx.dashboard_url}"
        for mode, mbs in (("batched", config.max_batch_size), ("max_batch_size=1", 1)):
            cfg = load_config(
                user_config={"detector": str(detector), "registered_model": "", "max_batch_size": mbs,
                             "batch_wait_timeout_s": config.batch_wait_timeout_s if mbs > 1 else 0.0,
                             "torch_threads": config.torch_threads, "auth_token_env": "",
                             "max_images_per_request": max(64, *bodies)},
                deployment={"num_replicas": replicas, "max_ongoing_requests": max(64, 2 * config.max_batch_size),
                            "ray_actor_options": {"num_cpus": cores / replicas}})
            cfg["http_options"]["port"] = port
            deploy_config(cfg, address=dashboard)
            running = serve.status().applications[cfg["applications"][0]["name"]].deployments
            if sum(d.replica_states.get("RUNNING", 0) for d in running.values()) != replicas:
                raise RuntimeError(f"asked for {replicas} replicas, Serve runs {running}")
            info = _get_json(f"{base}/v1/model")
            forward = "eager, inside Detector.score"
            log.info("%s: serving %s (%s) on %d replica(s), gallery %d, threads %d", mode, info["name"], info["kind"],
                     replicas, info["gallery"]["size"], info["torch_threads"])
            for n, c in [(n, c) for n in bodies for c in _ints(config.concurrency)]:
                _ask_each_replica(lambda: _post(f"{base}/v1/stats/reset"), replicas)
                cell = asyncio.run(run_load(f"{base}/v1/score", bodies[n], c, config.requests, config.seconds,
                                            config.warmup, n))
                cell.update(mode=mode, max_batch_size=mbs, forward=forward, replicas=replicas,
                            **_replica_batching(base, replicas), load_avg_after=os.getloadavg()[0])
                log.info("%-16s n=%-2d c=%-3d %7.1f img/s  p50 %7.1f ms  p99 %7.1f ms  batch %.2f  errors %s", mode, n,
                         c, cell["images_per_s"], cell["latency_ms"]["p50"] or -1, cell["latency_ms"]["p99"] or -1,
                         cell["mean_batch_size"] or 0, cell["errors"] or "none")
                cells.append(cell)
    finally:
        serve.shutdown()
        ray.shutdown()
        if saved is None:
            os.environ.pop(THROUGHPUT_ENV, None)
        else:
            os.environ[THROUGHPUT_ENV] = saved
    return cells


def markdown(result: dict[str, Any]) -> str:
    off = result["offline"]
    b, a = off["before"], off["after"]
    ceiling = max(b["ceiling_images_per_s"], a["ceiling_images_per_s"])
    at = max((b, a), key=lambda o: o["ceiling_images_per_s"])["ceiling_at"]
    sizes = list(next(iter(b["layouts"].values()))["eager"])
    lines = [
        f"# Serving benchmark: {result['name']}",
        "",
        f"{result['model']}; {result['machine']}; {result['when']}.",
        f"Load average (1 min) before / after: {result['load_avg_before']:.2f} / {result['load_avg_after']:.2f} "
        "(other work on the machine moves the numbers; the 'other' CPU column below shows how much ran beside).",
        "",
        "Offline forward pass on pre-processed batches, images/s before / after the service ran. Layout "
        "PxT = P processes with T intra-op threads each, running at once (summed):",
        "",
        "| layout | forward | " + " | ".join(f"batch {bs}" for bs in sizes) + " |",
        "|---|---|" + "---:|" * len(sizes),
    ]
    for layout in b["layouts"]:
        for net in ("eager", "traced"):
            lines.append(f"| {layout} | {net} | " + " | ".join(
                f"{b['layouts'][layout][net][bs]:.0f} / {a['layouts'][layout][net][bs]:.0f}" for bs in sizes) + " |")
    lines += [
        "",
        f"Decode + pre-process + eager forward, one process, {b['threads']} threads, batch "
        f"{b['decode_preprocess_forward_batch_size']}: {b['decode_preprocess_forward_images_per_s']:.0f} / "
        f"{a['decode_preprocess_forward_images_per_s']:.0f} images/s.",
        "",
        f"**Ceiling used below: {ceiling:.1f} images/s** (the best of every cell above: layout {at['layout']}, "
        f"{at['forward']}, batch {at['batch_size']}).",
        "",
        f"Service: POST /v1/score (multipart), closed-loop clients on loopback, {result['cells'][0]['replicas']} "
        f"replica(s) with {result['config']['torch_threads']} intra-op thread(s) each, forward: "
        f"{result.get('forward', '?')}, {THROUGHPUT_ENV}={int(result['config']['throughput_optimized'])}. "
        "Latency is per request; images/s counts images. CPU columns: "
        "milliseconds of CPU per image spent by the replicas, the HTTP proxy, the load generator, and the rest "
        "(Serve controller, Ray's GCS/raylet/agents, other work on the machine); busy = all of it over the "
        "cell's wall time x cores.",
        "",
        "| mode | images/request | clients | ok requests | errors | images/s | vs ceiling | p50 ms | p95 ms | p99 ms "
        "| mean batch | max batch | CPU replicas | CPU proxy | CPU client | CPU rest | busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cores = int(result.get("cores") or 1)
    for c in result["cells"]:
        lat = c["latency_ms"]
        images = c["ok"] * c["images_per_request"]
        cpu = c.get("cpu_s") or {}
        per = {k: 1000 * v / images if images else 0.0 for k, v in cpu.items()}
        rest = sum(v for k, v in per.items() if k not in ("replicas", "proxy", "load generator"))
        busy = sum(cpu.values()) / (c["wall_s"] * cores) if cpu and c["wall_s"] else 0.0
        lines.append(
            f"| {c['mode']} | {c['images_per_request']} | {c['concurrency']} | {c['ok']} | "
            f"{sum(c['errors'].values())} | "
            f"{c['images_per_s']:.1f} | {c['images_per_s'] / ceiling:.2f} | {lat['p50'] or 0:.1f} | "
            f"{lat['p95'] or 0:.1f} | {lat['p99'] or 0:.1f} | {c['mean_batch_size'] or 0:.2f} | "
            f"{c['max_observed_batch_size'] or 0} | {per.get('replicas', 0):.2f} | {per.get('proxy', 0):.2f} | "
            f"{per.get('load generator', 0):.2f} | {rest:.2f} | {busy:.0%} |")
    return "\n".join(lines) + "\n"


def main(config: BenchConfig) -> Path:
    """Measure the offline ceiling, then the service at each concurrency, with and without batching."""
    validate(config)
    import torch

    name = config.name or f"{config.backbone}-{config.image_size}"
    with tempfile.TemporaryDirectory(prefix="fingerprint-bench-") as tmp:
        tmp_path = Path(tmp)
        data = Path(config.data) if config.data else make_data(tmp_path)
        detector = Path(config.detector) if config.detector else make_detector(config, data, tmp_path)
        images = _request_images(data)
        load_before = os.getloadavg()[0]
        batch_sizes = _ints(config.offline_batch_sizes)
        threads = config.offline_threads or os.cpu_count() or 1
        processes = config.replicas or os.cpu_count() or 1
        before = offline_ceiling(detector, images, batch_sizes, threads, processes, config.offline_seconds)
        log.info("offline before: %s", before)
        cells = serve_cells(config, detector, data, images)
        after = offline_ceiling(detector, images, batch_sizes, threads, processes, config.offline_seconds)
        log.info("offline after: %s", after)
    result = {
        "name": name, "config": asdict(config),
        "model": f"{config.backbone} at {config.image_size} px, embed {config.embed_dim}"
        if not config.detector else f"detector {config.detector}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "cores": os.cpu_count(),
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
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, BenchConfig)
    main(from_args(BenchConfig, parser.parse_args()))
