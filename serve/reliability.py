"""Reliability suite: attack a real local service on 127.0.0.1 and record how it answers. Bounded; stops by itself.

    python -m serve.reliability --out benchmarks/results            # about 2-3 minutes on 2 cores
    python -m serve.reliability --quick --out /tmp/r                 # the small form CI runs

It starts its own Ray (loopback), serves a detector on 2 replicas behind serve.guard with auth on, and tries:

1. bad input: every error path the API names, JSON nested 100k deep, a declared-length and a chunked body over
   the cap, decompression bombs (a ~1 kB PNG declaring 1048576 x 1 pixels, one declaring 8000 x 8000, a thin
   4000 x 10 one) and the largest image the limits accept; per case the status, whether the answer was JSON,
   and each replica's peak memory (VmHWM, reset before the case) against its idle memory;
2. slow clients: `slow_clients` connections that each send a body 1 byte every 2 s for `slow_seconds` while good
   requests and /healthz keep going;
3. overload: a burst of `burst` concurrent requests against small queues: how many are shed (503 +
   Retry-After), how fast, and how long until a lone request succeeds again;
4. a replica killed under load (`ray.kill` of one of the 2 replica actors, found with Ray's state API), with
   clients following serve.bench's retry policy: failed first attempts, requests that failed for good, and
   the time until Serve runs 2 healthy replicas again.

/healthz latency is sampled throughout. Writes <out>/reliability.json and <out>/reliability.md.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import socket
import struct
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fingerprint.io import write_text_atomic

log = logging.getLogger(__name__)

TOKEN = "reliability-suite-token"
APP = "fingerprint"


@dataclass
class ReliabilityConfig:
    out: str = "benchmarks/results"
    """Folder for reliability.json and reliability.md."""
    detector: str = ""
    """Saved detector to serve; empty fits a small gradient detector on phantom data (seconds)."""
    quick: bool = False
    """The small form (CI): few bad-input cases, 8 slow clients for 6 s, a small burst, no replica kill."""
    slow_clients: int = 70
    """Connections that send their body 1 byte every 2 s."""
    slow_seconds: float = 20.0
    """How long each slow client keeps dribbling before it stops sending."""
    burst: int = 300
    """Concurrent requests of the overload case."""
    kill_seconds: float = 20.0
    """Load duration of the replica-kill case (the kill happens after a quarter of it)."""
    max_queued_requests: int = 16
    """The deployment's queue before shedding (small, so that the overload case sheds)."""


# ---------------------------------------------------------------------------------------------------------
# Inputs


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels but carries a few bytes of data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def bad_cases(good: bytes, quick: bool) -> list[tuple[str, dict[str, Any]]]:
    """(name, request) pairs; a request is method, path, headers, content and whether to send the token."""
    mp = lambda name, data: {"files": [("files", (name, data, "image/png"))]}  # noqa: E731
    cases: list[tuple[str, dict[str, Any]]] = [
        ("no token", {"token": False, **mp("a.png", good)}),
        ("wrong token", {"headers": {"authorization": "Bearer nope"}, **mp("a.png", good)}),
        ("route list without token", {"method": "GET", "path": "/-/routes", "token": False}),
        ("docs without token", {"method": "GET", "path": "/docs", "token": False}),
        ("not an image", mp("a.png", b"this is not an image")),
        ("truncated png", mp("cut.png", good[: len(good) // 2])),
        ("json nested 100k deep", {"content": b"[" * 100_000 + b"]" * 100_000,
                                   "headers": {"content-type": "application/json"}}),
        ("png 1048576 x 1 (1 kB)", mp("line.png", png_header_only(1048576, 1))),
        ("png 8000 x 8000 header", mp("square.png", png_header_only(8000, 8000))),
        ("png 4000 x 10", mp("thin.png", png_header_only(4000, 10))),
        ("largest accepted image 4096 x 4096", mp("big.png", png(np.zeros((4096, 4096), np.uint8)))),
        ("declared body over the cap", {"raw": b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                               b"Content-Length: 10000000000\r\n\r\nx"}),
        ("chunked body over the cap", {"headers": {"content-type": "image/png"}, "chunked_mb": 80}),
    ]
    if not quick:
        cases += [
            ("empty body", {"content": b"", "headers": {"content-type": "application/json"}}),
            ("malformed json", {"content": b'{"images": [', "headers": {"content-type": "application/json"}}),
            ("bad base64", {"json": {"images": [{"data": "not base64!"}]}}),
            ("unknown json field", {"json": {"images": [{"data": base64.b64encode(good).decode()}], "x": 1}}),
            ("gif", mp("a.gif", _gif())),
            ("text/plain body", {"content": b"hello", "headers": {"content-type": "text/plain"}}),
            ("65 images", {"files": [("files", (f"{i}.png", good, "image/png")) for i in range(65)]}),
            ("unknown route", {"method": "GET", "path": "/nope"}),
            ("wrong method", {"method": "DELETE", "path": "/v1/score"}),
            ("bad thumbnails value", {"path": "/v1/score?thumbnails=huge", **mp("a.png", good)}),
            ("unknown thumbnail id", {"method": "GET", "path": "/v1/thumbnails/nope"}),
            ("ray timeout override header", {"headers": {"x-request-timeout-seconds": "0"}, **mp("a.png", good)}),
        ]
    return cases


def _gif() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="GIF")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Observing the replicas


def replica_pids(dashboard: str) -> dict[str, int]:
    """Replica actor name -> pid of the live FingerprintService replicas (Ray's state API on `dashboard`)."""
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.name: a.pid for a in actors if "FingerprintService" in (a.class_name or "") and a.pid}


def _proc_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak(pids: dict[str, int]) -> None:
    """Reset each process's peak resident memory (VmHWM) to its current one (Linux clear_refs 5)."""
    for pid in pids.values():
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            pass


def memory_mb(pids: dict[str, int], field: str) -> dict[str, float]:
    return {name.rsplit("#", 1)[-1]: round((_proc_kb(pid, field) or 0) / 1024, 1) for name, pid in pids.items()}


class HealthSampler:
    """Times GET /healthz every 0.25 s in the background."""

    def __init__(self, base: str) -> None:
        self.base, self.samples, self.failures = base, [], []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            while True:
                t = time.perf_counter()
                try:
                    async with session.get(self.base + "/healthz") as r:
                        await r.read()
                        (self.samples if r.status == 200 else self.failures).append(time.perf_counter() - t)
                except (TimeoutError, aiohttp.ClientError):
                    self.failures.append(time.perf_counter() - t)
                await asyncio.sleep(0.25)

    def start(self) -> None:
        self.samples, self.failures = [], []
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> dict[str, Any]:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        lat = np.array(self.samples) * 1000
        return {"samples": len(self.samples), "failures": len(self.failures),
                "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
                "max_ms": round(float(lat.max()), 1) if len(lat) else None}


# ---------------------------------------------------------------------------------------------------------
# The cases


def run_bad_inputs(base: str, good: bytes, quick: bool, pids: dict[str, int]) -> list[dict[str, Any]]:
    import httpx

    idle = memory_mb(pids, "VmRSS")
    out = []
    with httpx.Client(base_url=base, timeout=60) as c:
        for name, spec in bad_cases(good, quick):
            reset_peak(pids)
            headers = dict(spec.get("headers", {}))
            if spec.get("token", True) and "authorization" not in headers:
                headers["authorization"] = f"Bearer {TOKEN}"
            kwargs: dict[str, Any] = {k: spec[k] for k in ("files", "json", "content") if k in spec}
            if "chunked_mb" in spec:
                kwargs["content"] = (b"\0" * (1 << 20) for _ in range(spec["chunked_mb"]))
            try:
                if "raw" in spec:  # a request httpx refuses to send (a body shorter than its Content-Length)
                    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
                    status, ctype, text = _raw_request(base, spec["raw"].replace(b"\r\n", b"\r\n" + auth, 1))
                else:
                    r = c.request(spec.get("method", "POST"), spec.get("path", "/v1/score"), headers=headers,
                                  **kwargs)
                    status, ctype, text = r.status_code, r.headers.get("content-type", ""), r.content
                error = json.loads(text).get("error") if ctype.startswith("application/json") else None
            except (httpx.HTTPError, OSError) as e:  # the server closed the connection on an over-cap upload
                status, ctype, error = type(e).__name__, "", None
            peak = memory_mb(pids, "VmHWM")
            out.append({"case": name, "status": status, "json": ctype.startswith("application/json"),
                        "error": error, "plain_text_5xx": isinstance(status, int) and status >= 500
                        and not ctype.startswith("application/json"),
                        "replica_peak_mb": max(peak.values()) if peak else None,
                        "peak_vs_idle": round(max(peak[k] / idle[k] for k in peak if idle.get(k)), 2)
                        if peak else None})
            log.info("bad input %-36s -> %s %s", name, status, error or "")
    return out


def _raw_request(base: str, data: bytes) -> tuple[int, str, bytes]:
    """Send raw bytes, read one HTTP/1.1 answer: (status, content type, body)."""
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(data)
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode(errors="replace").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        length = int(fields.get("content-length", len(body)))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split(" ")[1]), fields.get("content-type", ""), body


async def _good_loop(base: str, body: bytes, ctype: str, stop: asyncio.Event, results: list[Any],
                     retry: bool) -> None:
    import aiohttp

    from serve.bench import post_with_retry

    headers = {"content-type": ctype, "authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        while not stop.is_set():
            t = time.perf_counter()
            failed: list[Any] = []
            status, retries = await post_with_retry(session, base + "/v1/score", body, headers,
                                                    attempts=6 if retry else 1, failed=failed)
            results.append({"status": status, "retries": retries, "retried_statuses": failed,
                             "s": time.perf_counter() - t})


async def _slow_client(port: int, seconds: float) -> str:
    """Send headers for a 1000-byte body, then 1 byte every 2 s for `seconds`, then wait for the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Content-Type: image/png\r\nContent-Length: 1000\r\n\r\n".encode())
        await writer.drain()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            writer.write(b"\0")
            await writer.drain()
            await asyncio.sleep(2)
        line = await asyncio.wait_for(reader.readline(), 45)
        return line.decode(errors="replace").split(" ")[1] if line.count(b" ") >= 1 else "closed"
    except (TimeoutError, ConnectionError, IndexError) as e:
        return type(e).__name__
    finally:
        writer.close()


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    codes: dict[str, int] = {}
    for r in results:
        codes[str(r["status"])] = codes.get(str(r["status"]), 0) + 1
    return {"requests": len(results), "statuses": codes,
            "retried": sum(1 for r in results if r["retries"]),
            "failed": sum(1 for r in results if r["status"] != 200)}


async def run_slow_clients(base: str, port: int, body: bytes, ctype: str, n: int, seconds: float) -> dict[str, Any]:
    health = HealthSampler(base)
    health.start()
    stop, good = asyncio.Event(), []
    goods = [asyncio.create_task(_good_loop(base, body, ctype, stop, good, retry=False)) for _ in range(2)]
    slow = await asyncio.gather(*(_slow_client(port, seconds) for _ in range(n)))
    stop.set()
    await asyncio.gather(*goods)
    codes: dict[str, int] = {}
    for s in slow:
        codes[s] = codes.get(s, 0) + 1
    return {"slow_clients": n, "dribble_s": seconds, "slow_client_answers": codes, "good": _summary(good),
            "healthz": await health.stop()}


async def run_overload(base: str, body: bytes, ctype: str, burst: int) -> dict[str, Any]:
    import aiohttp

    health = HealthSampler(base)
    health.start()
    headers = {"content-type": ctype, "authorization": f"Bearer {TOKEN}"}
    answers: list[tuple[int | str, float, str | None, bool]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=burst),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def one() -> None:
            t = time.perf_counter()
            try:
                async with session.post(base + "/v1/score", data=body, headers=headers) as r:
                    text = await r.read()
                    is_json = r.headers.get("content-type", "").startswith("application/json")
                    answers.append((r.status, time.perf_counter() - t, r.headers.get("retry-after"), is_json))
                    del text
            except (TimeoutError, aiohttp.ClientError) as e:
                answers.append((type(e).__name__, time.perf_counter() - t, None, False))

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(burst)))
        burst_s = time.perf_counter() - t0
        # Recovery: a lone request, repeated until it succeeds (bounded).
        t1 = time.perf_counter()
        recovered = None
        while time.perf_counter() - t1 < 60:
            async with session.post(base + "/v1/score", data=body, headers=headers) as r:
                await r.read()
                if r.status == 200:
                    recovered = time.perf_counter() - t1
                    break
            await asyncio.sleep(0.1)
    shed = [a for a in answers if a[0] == 503]
    codes: dict[str, int] = {}
    for a in answers:
        codes[str(a[0])] = codes.get(str(a[0]), 0) + 1
    return {"burst": burst, "statuses": codes, "burst_s": round(burst_s, 2),
            "shed_503": len(shed), "shed_with_retry_after": sum(1 for a in shed if a[2]),
            "shed_json": sum(1 for a in shed if a[3]),
            "shed_latency_max_s": round(max((a[1] for a in shed), default=0.0), 3),
            "shed_latency_p50_s": round(float(np.median([a[1] for a in shed])), 3) if shed else None,
            "other_5xx": sum(1 for a in answers if isinstance(a[0], int) and a[0] >= 500 and a[0] != 503),
            "recovery_s": None if recovered is None else round(recovered, 2), "healthz": await health.stop()}


async def run_kill(base: str, body: bytes, ctype: str, seconds: float, dashboard: str) -> dict[str, Any]:
    import ray
    from ray import serve

    health = HealthSampler(base)
    health.start()
    stop, results = asyncio.Event(), []
    clients = [asyncio.create_task(_good_loop(base, body, ctype, stop, results, retry=True)) for _ in range(8)]
    await asyncio.sleep(seconds / 4)
    victims = replica_pids(dashboard)
    name = sorted(victims)[0]
    before = len(results)
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    killed_at = time.perf_counter()
    log.info("killed replica %s (pid %d) under load", name, victims[name])
    recovered = None
    while time.perf_counter() - killed_at < max(seconds, 90):
        await asyncio.sleep(0.5)
        dep = serve.status().applications[APP].deployments["FingerprintService"]
        alive = set(replica_pids(dashboard))
        if dep.replica_states.get("RUNNING", 0) == 2 and name not in alive and len(alive) == 2:
            recovered = time.perf_counter() - killed_at
            break
    remaining = seconds * 3 / 4 - (time.perf_counter() - killed_at)
    if remaining > 0:
        await asyncio.sleep(remaining)
    stop.set()
    await asyncio.gather(*clients)
    during = results[before:]
    first_attempt_failures = sum(1 for r in during if r["retries"])
    retried: dict[str, int] = {}
    for r in during:
        for st in r["retried_statuses"]:
            retried[str(st)] = retried.get(str(st), 0) + 1
    return {"replicas": 2, "clients": 8, "load_s": seconds, "killed": name.rsplit("#", 1)[-1],
            "all": _summary(results), "after_kill": _summary(during),
            "first_attempt_failures_after_kill": first_attempt_failures, "retried_answers_after_kill": retried,
            "non_retryable_failures": sum(1 for r in results if r["status"] != 200),
            "replacement_running_s": None if recovered is None else round(recovered, 1),
            "healthz": await health.stop()}


# ---------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fit_detector(out: Path) -> tuple[Path, Path]:
    from fingerprint.data.imagesets import load_fit_data
    from fingerprint.data.phantoms import make_sample_dataset
    from fingerprint.detectors import fit_detector

    bench = out / "bench"
    make_sample_dataset(bench, n_patients=12, slices_per_patient=3, size=64, n_generated_dev=48, n_generated_test=48,
                        memorisation=0.95, n_reference_patients=12, seed=0)
    det = fit_detector("gradient", {"k": 3}, load_fit_data(bench, 0.25, 0)).save(out / "detector")
    return det, bench


def run(config: ReliabilityConfig) -> dict[str, Any]:
    """Start the service, run every case, stop everything; returns the results."""
    import sys

    from jobs.ray_session import secure_local_auth

    if "ray" not in sys.modules:
        # Ray reads its auth mode when imported: token auth only if it is switched on before.
        secure_local_auth()
    import ray
    from ray import serve

    from serve import guard
    from serve.app import build_app

    quick = config.quick
    slow_n, slow_s = (8, 6.0) if quick else (config.slow_clients, config.slow_seconds)
    burst = 60 if quick else config.burst
    env = {guard.CALLBACK_ENV: guard.CALLBACK, guard.TOKEN_ENV: TOKEN,
           "FINGERPRINT_SERVE_BODY_IDLE_TIMEOUT_S": "10", "FINGERPRINT_SERVE_BODY_TIMEOUT_S": "30"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by Ray's processes (the proxy, the replicas) when they start
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {"config": asdict(config), "machine": {"cpus": os.cpu_count()}}
    with tempfile.TemporaryDirectory(prefix="fingerprint-reliability-") as tmp:
        if config.detector:
            detector, images_dir = Path(config.detector), None
        else:
            detector, images_dir = _fit_detector(Path(tmp))
        sample = sorted((images_dir / "test" / "real_unknown").glob("*.png"))[0] if images_dir else None
        good = sample.read_bytes() if sample else png(np.full((64, 64), 128, np.uint8))
        try:
            if ray.is_initialized():
                ray.shutdown()
            # Its own instance ("local"), dashboard on loopback (the state API finds the replicas through it).
            ctx = ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=_free_port(), log_to_driver=False)
            serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
            app = build_app({"detector": str(detector), "num_replicas": 2, "num_cpus": 0.5,
                             "max_ongoing_requests": 16, "max_queued_requests": config.max_queued_requests,
                             "max_batch_size": 16})
            t0 = time.perf_counter()
            serve.run(app, name=APP, route_prefix="/", blocking=False)
            result["start_s"] = round(time.perf_counter() - t0, 1)
            import httpx

            with httpx.Client(base_url=base, timeout=60) as c:
                for _ in range(5):  # warm both replicas up before measuring their idle memory
                    c.post("/v1/score", files=[("files", ("w.png", good, "image/png"))],
                           headers={"authorization": f"Bearer {TOKEN}"})
            dashboard = f"http://{ctx.dashboard_url}"
            pids = replica_pids(dashboard)
            result["replica_idle_rss_mb"] = memory_mb(pids, "VmRSS")
            log.info("serving on %s, replicas %s", base, result["replica_idle_rss_mb"])
            result["bad_inputs"] = run_bad_inputs(base, good, quick, pids)
            result["slow_clients"] = asyncio.run(run_slow_clients(base, port, good, "image/png", slow_n, slow_s))
            log.info("slow clients: %s", result["slow_clients"])
            result["overload"] = asyncio.run(run_overload(base, good, "image/png", burst))
            log.info("overload: %s", result["overload"])
            if not quick:
                result["replica_kill"] = asyncio.run(run_kill(base, good, "image/png", config.kill_seconds,
                                                                  dashboard))
                log.info("replica kill: %s", result["replica_kill"])
        finally:
            serve.shutdown()
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    bad = result["bad_inputs"]
    result["summary"] = {
        "bad_input_cases": len(bad), "plain_text_5xx": sum(r["plain_text_5xx"] for r in bad),
        "any_5xx": sum(1 for r in bad if isinstance(r["status"], int) and r["status"] >= 500),
        "max_peak_vs_idle": max((r["peak_vs_idle"] or 0) for r in bad),
        "healthz_max_ms": max(x["healthz"]["max_ms"] or 0 for x in (result["slow_clients"], result["overload"],
                                                                    result.get("replica_kill") or result["overload"])),
    }
    return result


def markdown(r: dict[str, Any]) -> str:
    s = r["summary"]
    lines = [
        "# Reliability suite", "",
        f"`python -m serve.reliability` on {r['machine']['cpus']} CPUs: 2 replicas (0.5 CPU each) behind serve.guard "
        f"with auth on, max_ongoing_requests 16, max_queued_requests {r['config']['max_queued_requests']}, "
        "request_timeout_s 60, body idle timeout 10 s, body deadline 30 s.", "",
        f"- bad-input cases: {s['bad_input_cases']}, plain-text 5xx: {s['plain_text_5xx']}, any 5xx: {s['any_5xx']}",
        f"- largest replica peak memory during one request vs idle: {s['max_peak_vs_idle']}x",
        f"- slowest /healthz during the attacks: {s['healthz_max_ms']} ms", "",
        "## Bad input", "", "| case | status | JSON | error | replica peak MB | peak / idle |",
        "|---|---:|---|---|---:|---:|"]
    for b in r["bad_inputs"]:
        lines.append(f"| {b['case']} | {b['status']} | {'yes' if b['json'] else 'no'} | {b['error'] or ''} | "
                     f"{b['replica_peak_mb']} | {b['peak_vs_idle']} |")
    sc = r["slow_clients"]
    lines += ["", "## Slow clients", "",
              f"{sc['slow_clients']} clients sending 1 byte every 2 s for {sc['dribble_s']:g} s: their answers "
              f"{sc['slow_client_answers']}; meanwhile good requests {sc['good']['statuses']}; /healthz p50 "
              f"{sc['healthz']['p50_ms']} ms, max {sc['healthz']['max_ms']} ms ({sc['healthz']['failures']} failed)."]
    ov = r["overload"]
    lines += ["", "## Overload", "",
              f"{ov['burst']} concurrent requests: {ov['statuses']} in {ov['burst_s']} s; {ov['shed_503']} shed as "
              f"503 ({ov['shed_with_retry_after']} with Retry-After, {ov['shed_json']} JSON), answered in "
              f"{ov['shed_latency_p50_s']} s median, {ov['shed_latency_max_s']} s at most; other 5xx: "
              f"{ov['other_5xx']}; a lone request succeeded again after {ov['recovery_s']} s; /healthz max "
              f"{ov['healthz']['max_ms']} ms."]
    if r.get("replica_kill"):
        k = r["replica_kill"]
        lines += ["", "## One replica of 2 killed under load", "",
                  f"8 clients with serve.bench's retry policy for {k['load_s']:g} s; replica {k['killed']} killed "
                  f"after a quarter. Requests after the kill: {k['after_kill']['statuses']}, of which "
                  f"{k['first_attempt_failures_after_kill']} needed a retry (the answers retried: "
                  f"{k['retried_answers_after_kill']}); failed for good: "
                  f"{k['non_retryable_failures']}. Replacement running after {k['replacement_running_s']} s. "
                  f"/healthz max {k['healthz']['max_ms']} ms ({k['healthz']['failures']} failed)."]
    return "\n".join(lines) + "\n"


def main(config: ReliabilityConfig) -> Path:
    result = run(config)
    out = Path(config.out)
    write_text_atomic(out / "reliability.json", json.dumps(result, indent=2, default=str))
    md = write_text_atomic(out / "reliability.md", markdown(result))
    return md


if __name__ == "__main__":
    import argparse

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    for f in ReliabilityConfig.__dataclass_fields__.values():
        if f.type == "bool":
            parser.add_argument(f"--{f.name.replace('_', '-')}", action="store_true")
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type={"int": int, "float": float}.get(f.type, str),
                                default=f.default)
    print(main(ReliabilityConfig(**vars(parser.parse_args()))))
