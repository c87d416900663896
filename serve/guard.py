"""The gate in front of the replicas: ASGI middleware that runs inside Ray Serve's HTTP proxy.

Installed by the environment variable Ray Serve reads when its proxy starts (set it before Ray starts:
`fingerprint serve` does; for `ray start --head` + `serve deploy`, export it first):

    export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve.guard:middlewares

Why in the proxy and not in the replica: anything the replica does happens after Serve has queued the request
and given it one of the replica's `max_ongoing_requests` slots. Here, before that:

- the bearer token ($FINGERPRINT_SERVE_TOKEN in the proxy's environment) is checked before anything is read or
  queued; every route needs it except the probes (/healthz, /livez, /readyz, /-/healthz) and the page at `/`
  (static: it asks for the token and sends it with each call). /-/routes, /docs and /openapi.json need it too;
- the whole body is read here, with an idle timeout between chunks, a deadline for the whole body and a size
  cap enforced while it streams (chunked bodies included), so a slow or endless client holds a cheap proxy
  coroutine, never a replica slot; only complete bodies are forwarded;
- Ray's per-request override headers (`x-request-timeout-seconds`, which can switch the request timeout off,
  and `x-request-disconnect-disabled`) are dropped: clients must not change server limits;
- optional per-token (or per-client-address without auth) rate limits answer 429 with Retry-After;
- the proxy's own plain-text errors become the service's JSON errors: 503 when shedding load (Retry-After kept),
  408 on timeouts, 404 for unknown routes, and a request whose replica died (which the proxy answers with a
  bare 500) gets 503 `replica_unavailable` with Retry-After, so clients know to retry;
- /healthz and /livez shed for a full queue answer 200 (the replicas are alive, only busy), so an overload never
  makes an orchestrator restart healthy replicas; /readyz keeps its 503 (send no more traffic for now).

Settings are environment variables of the proxy process (`GuardConfig.from_env`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serve.guard:middlewares"
TOKEN_ENV = "FINGERPRINT_SERVE_TOKEN"
OPEN_PATHS = frozenset({"/", "/healthz", "/livez", "/readyz", "/-/healthz"})
"""Paths that never need the token: probes, and the page (which holds no data)."""
BUSY_IS_HEALTHY = frozenset({"/healthz", "/livez"})
"""Probes answered 200 when Serve sheds them for a full queue (the replicas are alive, just busy)."""
DROPPED_HEADERS = frozenset({b"x-request-timeout-seconds", b"x-request-disconnect-disabled"})

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass
class GuardConfig:
    """The gate's settings, read from the proxy's environment variables (named in each field's doc)."""

    token: str = ""
    """FINGERPRINT_SERVE_TOKEN: the bearer token every non-probe route needs; empty = auth off."""
    max_body_bytes: int = 64 * 1024 * 1024
    """FINGERPRINT_SERVE_MAX_BODY_BYTES: largest request body; larger ones get 413 while they stream."""
    body_idle_timeout_s: float = 10.0
    """FINGERPRINT_SERVE_BODY_IDLE_TIMEOUT_S: most seconds between two chunks of a body before 408."""
    body_timeout_s: float = 30.0
    """FINGERPRINT_SERVE_BODY_TIMEOUT_S: most seconds to receive a whole body before 408."""
    rate_per_s: float = 0.0
    """FINGERPRINT_SERVE_RATE_PER_S: requests per second per token (per client address without auth); 0 = off."""
    rate_burst: int = 20
    """FINGERPRINT_SERVE_RATE_BURST: requests a token may send at once above its rate."""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> GuardConfig:
        env = dict(os.environ if env is None else env)

        def get(name: str, cast: Callable[[str], Any], default: Any) -> Any:
            raw = env.get(name, "")
            try:
                return cast(raw) if raw else default
            except ValueError:
                raise ValueError(f"${name}: {raw!r} is not a valid {cast.__name__}") from None

        return cls(token=env.get(TOKEN_ENV, ""),
                   max_body_bytes=get("FINGERPRINT_SERVE_MAX_BODY_BYTES", int, cls.max_body_bytes),
                   body_idle_timeout_s=get("FINGERPRINT_SERVE_BODY_IDLE_TIMEOUT_S", float, cls.body_idle_timeout_s),
                   body_timeout_s=get("FINGERPRINT_SERVE_BODY_TIMEOUT_S", float, cls.body_timeout_s),
                   rate_per_s=get("FINGERPRINT_SERVE_RATE_PER_S", float, cls.rate_per_s),
                   rate_burst=get("FINGERPRINT_SERVE_RATE_BURST", int, cls.rate_burst))


class _BodyError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


@dataclass
class _Buckets:
    """Token buckets by key; a few thousand keys at most are kept (the least recently used go first)."""

    rate: float
    burst: int
    state: dict[str, tuple[float, float]] = field(default_factory=dict)

    def take(self, key: str) -> float:
        """0 if a request may go now, else the seconds until it may."""
        now = time.monotonic()
        tokens, last = self.state.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self.state[key] = (tokens - 1 if wait == 0 else tokens, now)
        if len(self.state) > 4096:
            self.state.pop(next(iter(self.state)))
        return wait


async def send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


def _error(code: str, detail: str) -> dict[str, Any]:
    return {"error": code, "detail": detail, "items": []}


class Guard:
    """Pure ASGI middleware (see the module docstring)."""

    def __init__(self, app: Callable[..., Awaitable[None]], config: GuardConfig | None = None) -> None:
        self.app = app
        self.config = config or GuardConfig.from_env()
        self.buckets = _Buckets(self.config.rate_per_s, self.config.rate_burst) if self.config.rate_per_s else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope = dict(scope, headers=[(k, v) for k, v in scope.get("headers", []) if k.lower() not in DROPPED_HEADERS])
        headers = {k.lower(): v for k, v in scope["headers"]}
        path = scope.get("path", "")
        cfg = self.config
        if cfg.token and path not in OPEN_PATHS:
            scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), cfg.token.encode()):
                await send_json(send, 401, _error("unauthorized", "missing or wrong bearer token; send "
                                                  "'Authorization: Bearer <token>'"),
                                [(b"www-authenticate", b"Bearer")])
                return
        if self.buckets is not None and path not in OPEN_PATHS:
            key = headers.get(b"authorization", b"").decode("latin-1") or str((scope.get("client") or ("?",))[0])
            wait = self.buckets.take(key)
            if wait:
                await send_json(send, 429, _error("rate_limited", f"over {cfg.rate_per_s:g} requests/s; retry "
                                                  "after the Retry-After seconds"),
                                [(b"retry-after", str(max(1, math.ceil(wait))).encode())])
                return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            try:
                body = await self._read_body(receive, headers)
            except _BodyError as e:
                await send_json(send, e.status, _error(e.code, e.detail), [(b"connection", b"close")])
                return
            if body is None:  # the client went away
                return
            receive = _replay(body, receive)
        await self._forward(scope, receive, send)

    async def _read_body(self, receive: Receive, headers: dict[bytes, bytes]) -> bytes | None:
        cfg = self.config
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > cfg.max_body_bytes:
            raise _BodyError(413, "request_too_large", f"request body of {int(length)} bytes is over "
                             f"{cfg.max_body_bytes} bytes; send fewer or smaller images per request")
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + cfg.body_timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), min(cfg.body_idle_timeout_s, max(left, 0.001)))
            except TimeoutError:
                what = (f"no data for {cfg.body_idle_timeout_s:g} s" if left > cfg.body_idle_timeout_s
                        else f"the body took over {cfg.body_timeout_s:g} s")
                raise _BodyError(408, "body_timeout", f"request body too slow ({what}); send it in one go") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise _BodyError(413, "request_too_large", f"request body over {cfg.max_body_bytes} bytes; send "
                                 "fewer or smaller images per request")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        state: dict[str, Any] = {"started": False, "rewrite": None, "buffer": []}

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                ctype = dict((k.lower(), v) for k, v in message.get("headers", [])).get(b"content-type", b"")
                if status >= 400 and not ctype.startswith((b"application/json", b"text/html", b"image/")):
                    state["rewrite"] = message  # Ray's or uvicorn's plain text: answered as JSON below
                    return
                state["started"] = True
                await send(message)
            elif message["type"] == "http.response.body" and state["rewrite"] is not None:
                state["buffer"].append(message.get("body", b""))
                if not message.get("more_body", False):
                    await self._send_rewritten(send, state["rewrite"], b"".join(state["buffer"]), scope["path"])
                    state["started"] = True
            else:
                await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except Exception as e:  # an error inside Ray's proxy: the client still gets an answer it can act on
            if not state["started"]:
                await send_json(send, 503, _error("replica_unavailable", f"the request failed inside the "
                                                  f"service ({type(e).__name__}); retry"), [(b"retry-after", b"1")])
            return
        if not state["started"]:
            # Ray's proxy sends nothing for a request whose replica died (or any other 500): say so, retryable.
            await send_json(send, 503, _error("replica_unavailable", "the replica serving this request stopped "
                                              "before answering; retry"), [(b"retry-after", b"1")])

    @staticmethod
    async def _send_rewritten(send: Send, start: Message, text: bytes, path: str) -> None:
        status = int(start["status"])
        detail = text.decode(errors="replace").strip()[:1000]
        if status == 503 and "backpressure" in detail.lower() and path in BUSY_IS_HEALTHY:
            # Shed because every replica is busy: they are alive and serving, which is what these probes ask.
            # /readyz keeps the 503 (send no more traffic here for now).
            await send_json(send, 200, {"status": "ok"})
            return
        kept = [(k, v) for k, v in start.get("headers", []) if k.lower() == b"retry-after"]
        if status == 503 or status >= 500:
            code = "overloaded" if status == 503 and "backpressure" in detail.lower() else "replica_unavailable"
            status = 503
            if not kept:
                kept = [(b"retry-after", b"1")]
        else:
            code = {404: "not_found", 408: "request_timeout", 413: "request_too_large",
                    429: "rate_limited"}.get(status, "http_error")
        await send_json(send, status, _error(code, detail or code), kept)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that gives the whole body once, then waits on the client (for its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def middlewares() -> list[Any]:
    """What Ray Serve's proxy calls (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve.guard:middlewares)."""
    from starlette.middleware import Middleware

    return [Middleware(Guard)]
