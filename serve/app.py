"""Ray Serve app: membership scores over HTTP from any saved detector kind, with dynamic batching and hot swap.

Run locally (Ray starts in-process; Ctrl-C stops it):

    fingerprint serve --detector runs/fit/detector        # any kind; its saved gallery, nothing re-embedded
    # or, from the registry:  --registered-model fingerprint-ctbench --tracking-uri sqlite:///mlflow.db
    curl -s localhost:8000/healthz
    curl -s -F files=@data/sample/test/real_unknown/real_unknown_0001.png localhost:8000/v1/score

Production (a long-lived Ray cluster with its dashboard, or KubeRay's RayService with the same YAML under
serveConfigV2):

    ray start --head
    serve deploy serve/config.yaml            # edit user_config first: the model source
    # after `fingerprint promote` moved the alias: bump user_config.reload in the YAML, then
    serve deploy serve/config.yaml            # replicas reconfigure in place onto the new champion

The YAML was written by `serve build serve.app:app -o serve/config.yaml` (import_path: serve.app:app).

API (OpenAPI at /docs): POST /v1/score (multipart `files`, base64 JSON, or a raw image body; `?thumbnails=url|inline`
adds the neighbours' pictures), GET /v1/thumbnails/{id}, GET /v1/model, probes GET /healthz, /readyz, /livez, and a
page for people at GET /. serve/guard.py, in Ray's HTTP proxy, checks the token and reads bodies before a request
reaches a replica. (/v1/embed is gone: only some kinds have a feature space, and an ensemble has several.)

One deployment, not two. Every kind scores a batch in one `Detector.score(images, ids)` call: a feature map (a
network forward for frozen/triplet, Sobel gradients, pixels, a projection) then an exact top-k against the saved
gallery, which fits in every replica (gallery x D float32; 50 MB for 100k x 128). A separate search deployment
would add a handle call per batch and another process competing for the same cores, and buy nothing: both parts
scale with the request rate, so they scale together by adding replicas. Split when a gallery no longer fits a
replica's memory (shard it over search replicas and merge top-k), or when a network kind's forward runs on GPU
replicas that should not hold the gallery.

Network kinds (frozen, triplet) run their forward as a checked TorchScript trace on CPU (`trace` in
user_config; `serve.model.trace_model`), handed to the detector with `use_forward`: an eager forward holds the GIL
between kernels and starves the event loop that reads the next batch.
"""

# No `from __future__ import annotations`: FastAPI must see real types (Request) on the ingress methods.
import asyncio
import base64
import binascii
import collections
import hmac
import json
import logging
import urllib.parse
from typing import Any, Literal

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from fingerprint.config import ConfigError, to_dict
from serve.config import ServeConfig, from_user_config
from serve.model import InputError, ModelState, decode_image, item_id, load_state
from serve.page import PAGE_HTML

log = logging.getLogger("ray.serve")

DEFAULT_MAX_ONGOING_REQUESTS = 64
"""Per replica: several full batches can queue while one runs (must be >= max_batch_size to fill batches)."""
DEFAULT_MAX_QUEUED_REQUESTS = 64
"""Requests waiting for a replica slot (per proxy) before more are shed with 503 + Retry-After: overload is
answered at once instead of piling up until every request times out."""

# ---------------------------------------------------------------------------------------------------------
# Request and response schemas (also what /docs shows)


class ImageJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(None, description="Your name for the image, echoed in the answer (default: its index). "
                                             "An image of the detector's reference pool sent with its id is never "
                                             "compared with itself.")
    data: str = Field(..., description="The PNG or JPEG file, base64-encoded.")


class ImagesJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[ImageJSON] = Field(..., min_length=1, description="One or several images.")


class ModelRef(BaseModel):
    name: str = Field(..., description="The detector's name (its kind, qualified where it has variants).")
    kind: str = Field(..., description="The detector kind, e.g. gradient, triplet, selected_ensemble.")
    version: str = Field(..., description="The registry version, or 'local' for a detector folder.")
    alias: str | None


class Neighbour(BaseModel):
    id: str = Field(..., description="Id of a generated image of the detector's gallery.")
    similarity: float = Field(..., description="Its similarity in the detector's feature space (higher = closer).")
    thumbnail: str | None = Field(None, description="With ?thumbnails=url: the route of its picture "
                                                    "(/v1/thumbnails/<id>); with ?thumbnails=inline: the picture "
                                                    "as a data: URL. Null when not asked for, or when the detector "
                                                    "was saved without thumbnails.")


class ScoreResult(BaseModel):
    id: str = Field(..., description="The image's id: the uploaded file name without its extension, the JSON "
                                     "id, or the ?id= of a raw body.")
    score: float = Field(..., description="Membership score: higher = more likely in the generator's training set.")
    decision: bool = Field(..., description="score >= threshold: predicted to have been in the training set.")
    generated_similarity: float | None = Field(..., description="The reduced similarity to the nearest generated "
                                                                "images, where the kind's score is built from one.")
    real_similarity: float | None = Field(..., description="The same against the real reference pool, for "
                                                           "calibrated kinds; null otherwise.")
    nearest: list[Neighbour] = Field(..., description="The nearest generated images, most similar first (for an "
                                                      "ensemble: those of its lead member).")


class ScoreResponse(BaseModel):
    model: ModelRef
    kind: str
    threshold: float
    signal: str = Field(..., description="'per_image': the score measures how close this image sits to the "
                                         "generated images. 'distribution': how generated-like it is overall, "
                                         "which also rises with any distribution shift, not only memorisation.")
    results: list[ScoreResult]


class ErrorBody(BaseModel):
    error: str = Field(..., description="Stable machine-readable code, e.g. not_an_image, image_too_large.")
    detail: str = Field(..., description="What is wrong and what to do.")
    items: list[str] = Field(default_factory=list, description="The request items concerned.")


_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 408, 413, 415, 422, 503)}

_IMAGE_BODY_SCHEMA = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {"type": "object", "required": ["files"], "properties": {
                "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                          "description": "One or several PNG/JPEG files (field name 'files')."}}}},
        "application/json": {"schema": {
            "type": "object", "required": ["images"], "additionalProperties": False,
            "properties": {"images": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["data"], "additionalProperties": False,
                "properties": {"id": {"type": "string"}, "data": {"type": "string", "format": "byte"}}}}}}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    },
}

api = FastAPI(
    title="fingerprint membership scoring",
    version="1",
    description="Was this real image in the training set of the generator that made the gallery? "
                "Scores real images with a saved membership detector (any kind: pixel, gradient, subspace, domain, "
                "ssim, frozen or triplet features, ensembles) against the generated images it holds.",
    # Served by the deployment itself, behind the same token as the API (FastAPI's own routes would be open).
    docs_url=None, redoc_url=None, openapi_url=None,
)


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, items: list[str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.items = status, code, detail, items or []


def _error(status: int, code: str, detail: str, items: list[str] | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail, "items": items or []}, status_code=status, headers=headers)


@api.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return _error(e.status, e.code, e.detail, e.items, headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    msgs = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
    return _error(422, "invalid_request", "; ".join(msgs))


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
    return _error(e.status_code, codes.get(e.status_code, "http_error"), str(e.detail))


# ---------------------------------------------------------------------------------------------------------
# Reading images from a request


def _pydantic_problems(e: ValidationError) -> str:
    out = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        if err["type"] == "extra_forbidden":
            out.append(f"{where}: unknown field; allowed: images[].id, images[].data")
        else:
            out.append(f"{where}: {err['msg']}")
    return "; ".join(out)


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused (413) as soon as it streams past `limit` bytes, chunked bodies included, and
    (408) when it takes longer than `timeout_s`: a slow client holds this replica's slot only that long."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, "request_too_large",
                       f"request body of {length} bytes is over {limit} bytes (max_images_per_request x "
                       "max_image_bytes); send fewer or smaller images per request")
    chunks: list[bytes] = []
    size = 0

    async def collect() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "request_too_large", f"request body over {limit} bytes (max_images_per_request "
                               "x max_image_bytes); send fewer or smaller images per request")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), timeout_s)
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"the request body took over {timeout_s:g} s (body_timeout_s); "
                       "send it in one go") from None
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client went away before sending the whole body") from None
    return b"".join(chunks)


async def read_images(request: Request, cfg: ServeConfig) -> list[tuple[str, bytes]]:
    """(item name, encoded bytes) for each image of a multipart, JSON or raw-image request."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = cfg.max_images_per_request * (cfg.max_image_bytes * 4 // 3 + 1024) + 65536
    body = await read_body(request, limit, cfg.body_timeout_s)
    if ctype == "multipart/form-data":
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=cfg.max_images_per_request + 1, max_fields=16)
        except StarletteHTTPException as e:  # the multipart parser's own limits and format errors
            if "Too many files" in str(e.detail):
                raise ApiError(413, "too_many_images", f"more than {cfg.max_images_per_request} images in one "
                               "request (max_images_per_request)") from e
            raise ApiError(400, "malformed_multipart", f"the multipart body cannot be parsed ({e.detail})") from e
        items: list[tuple[str, bytes]] = []
        others = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                items.append((value.filename or f"{key}[{len(items)}]", await value.read()))
            else:
                others.append(key)
        if others:
            raise ApiError(422, "unknown_field", f"unknown form field(s) {', '.join(sorted(set(others)))}; send "
                           "the images as file parts named 'files'", sorted(set(others)))
        if not items:
            raise ApiError(400, "no_images", "the multipart form holds no files; send -F files=@image.png")
    else:
        if not body:
            raise ApiError(400, "empty_body", "empty request body; send images as multipart 'files', as JSON "
                           '{"images": [{"data": "<base64>"}]}, or one PNG/JPEG as the body')
        if ctype == "application/json":
            try:
                payload = json.loads(body)
            except RecursionError:
                raise ApiError(400, "malformed_json", "the JSON body is nested too deeply; send "
                               '{"images": [{"id": ..., "data": "<base64>"}]}') from None
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, over-long integers
                raise ApiError(400, "malformed_json", f"the body is not valid JSON ({e})") from e
            try:
                parsed = ImagesJSON.model_validate(payload)
            except ValidationError as e:
                raise ApiError(422, "invalid_request", _pydantic_problems(e)) from e
            items = []
            for i, img in enumerate(parsed.images):
                name = img.id or f"images[{i}]"
                try:
                    items.append((name, base64.b64decode(img.data, validate=True)))
                except (binascii.Error, ValueError) as e:
                    raise ApiError(422, "invalid_base64", f"{name}: 'data' is not valid base64 ({e})", [name]) from e
        elif ctype in ("image/png", "image/jpeg", "application/octet-stream"):
            items = [(request.query_params.get("id", "image"), body)]
        else:
            raise ApiError(415, "unsupported_media_type",
                           f"content type {ctype or '(none)'} is not accepted; use multipart/form-data, "
                           "application/json, image/png or image/jpeg")
    if len(items) > cfg.max_images_per_request:
        raise ApiError(413, "too_many_images", f"{len(items)} images in one request; the limit is "
                       f"{cfg.max_images_per_request} (max_images_per_request)")
    return items


class BatchStats:
    """Observed batch sizes (per replica), so that batching can be seen working from outside."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.batches = 0
        self.images = 0
        self.histogram: collections.Counter[int] = collections.Counter()
        self.recent: collections.deque[int] = collections.deque(maxlen=64)

    def record(self, size: int) -> None:
        self.batches += 1
        self.images += size
        self.histogram[size] += 1
        self.recent.append(size)

    def as_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "images": self.images,
                "mean_batch_size": round(self.images / self.batches, 3) if self.batches else None,
                "max_observed_batch_size": max(self.histogram) if self.histogram else None,
                "histogram": {str(k): v for k, v in sorted(self.histogram.items())},
                "recent": list(self.recent)}




def _finite(values: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: a metric that could not be computed is reported as null."""
    return {k: (v if not isinstance(v, float) or v == v and abs(v) != float("inf") else None)
            for k, v in values.items()}


def decode_all(raw: list[tuple[str, bytes]], cfg: ServeConfig) -> tuple[list[str], list[Image.Image]]:
    """Decode every uploaded image (in a worker thread: decoding would block the event loop and the probes);
    raises one ApiError naming every bad image."""
    names, images, problems = [], [], []
    for name, data in raw:
        try:
            images.append(decode_image(data, name, cfg.max_image_bytes, cfg.max_image_pixels, cfg.max_image_side,
                                       cfg.max_aspect_ratio))
            names.append(item_id(name))
        except InputError as e:
            problems.append(e)
    if problems:
        # Every bad item is named, not just the first, so the client can fix them all at once.
        first = problems[0]
        raise ApiError(first.status, first.code, "; ".join(str(p) for p in problems),
                       [p.item for p in problems if p.item])
    return names, images


def add_thumbnails(results: list[dict[str, Any]], state: ModelState, how: str) -> None:
    """Give each neighbour its picture: a route (`url`) or a data: URL (`inline`); null without thumbnails."""
    thumbs = state.thumbnails
    for result in results:
        for n in result["nearest"]:
            if thumbs is None or n["id"] not in thumbs:
                n["thumbnail"] = None
            elif how == "url":
                n["thumbnail"] = f"/v1/thumbnails/{urllib.parse.quote(n['id'], safe='')}"
            else:
                n["thumbnail"] = "data:image/png;base64," + base64.b64encode(thumbs.png(n["id"]) or b"").decode()


def _model_ref(state: ModelState) -> dict[str, Any]:
    return {"name": state.detector.name, "kind": state.kind, "version": state.version,
            "alias": state.info.get("alias")}


# ---------------------------------------------------------------------------------------------------------
# The deployment. Everything the class uses must be defined above it: `serve.ingress` serialises the class
# when it is decorated, so a module-level helper defined further down would be missing in the replica.


@serve.deployment(max_ongoing_requests=DEFAULT_MAX_ONGOING_REQUESTS, max_queued_requests=DEFAULT_MAX_QUEUED_REQUESTS,
                  ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class FingerprintService:
    """One replica: a model state (swapped whole on reload), a batched scorer, the HTTP routes."""

    def __init__(self) -> None:
        self._state: ModelState | None = None
        self._cfg: ServeConfig | None = None
        self._token = ""
        self._reload_lock = asyncio.Lock()
        self._reload_error: str | None = None
        self._swaps: list[dict[str, Any]] = []
        self.stats = BatchStats()

    # -- settings and hot swap ------------------------------------------------------------------------------

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new user_config: batch settings at once; the detector only if its source changed.

        The first call (replica start) raises on any problem, so a bad config fails the deployment with the
        message. Later calls never raise: Serve would replace the replica and drop requests in flight, so a
        failed reload keeps serving the old detector and reports the error in /v1/model and the log.
        """
        async with self._reload_lock:
            try:
                cfg = from_user_config(user_config)
            except ConfigError as e:
                if self._state is None:
                    raise
                self._reload_error = str(e)
                log.error("reconfigure rejected, still serving %s: %s", self._state.version, e)
                return
            self._apply_settings(cfg)
            if self._state is not None and self._cfg is not None and cfg.data_source() == self._cfg.data_source():
                self._cfg = cfg
                self._reload_error = None
                return
            try:
                # In a thread: the event loop keeps serving requests on the old state while the new one loads.
                state = await asyncio.to_thread(load_state, cfg)
            except Exception as e:
                if self._state is None:
                    raise
                self._reload_error = f"{type(e).__name__}: {e}"
                log.exception("reload failed, still serving version %s", self._state.version)
                return
            old = self._state
            self._state = state  # the swap: one reference; requests already running keep the old state
            self._cfg = cfg
            self._reload_error = None
            self._swaps.append({"from_version": old.version if old else None, "to_version": state.version,
                                "from_kind": old.kind if old else None, "to_kind": state.kind,
                                "source": state.info["source"], "time": state.info["loaded_at"]})
            log.info("serving %s (%s) version %s from %s%s", state.detector.name, state.kind, state.version,
                     state.info["source"], f", swapped from {old.kind} version {old.version}" if old else "")

    def _apply_settings(self, cfg: ServeConfig) -> None:
        self._score_batch.set_max_batch_size(cfg.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self._token = cfg.token()

    def _ready(self) -> tuple[ModelState, ServeConfig]:
        if self._state is None or self._cfg is None:
            raise ApiError(503, "not_ready", "the model is still loading; retry in a few seconds")
        return self._state, self._cfg

    def _check_auth(self, request: Request) -> None:
        if not self._token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token; send 'Authorization: Bearer <token>'")

    # -- batching ---------------------------------------------------------------------------------------------

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_batch(self, items: list[tuple[ModelState, Image.Image, str]]) -> list[Any]:
        """Score a batch of single images; each item's answer is a dict, or its own exception.

        Items carry the state their request started with; during a swap a batch can hold both (even two
        kinds), so it makes one `Detector.score` call per state. A failing call is retried image by image, so
        only the culprit fails.
        """
        self.stats.record(len(items))
        groups: dict[int, list[int]] = collections.defaultdict(list)
        for i, (state, _, _) in enumerate(items):
            groups[id(state)].append(i)
        out: list[Any] = [None] * len(items)
        for idx in groups.values():
            state = items[idx[0]][0]
            try:
                results = await asyncio.to_thread(state.score, [items[i][1] for i in idx], [items[i][2] for i in idx])
            except Exception:
                log.exception("batch of %d failed; retrying its images one by one", len(idx))
                results = []
                for i in idx:
                    try:
                        results += await asyncio.to_thread(state.score, [items[i][1]], [items[i][2]])
                    except Exception as e:
                        results.append(e)
            for i, r in zip(idx, results, strict=True):
                out[i] = r
        return out

    # -- routes -----------------------------------------------------------------------------------------------

    @api.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS,
              openapi_extra={"requestBody": _IMAGE_BODY_SCHEMA},
              summary="Membership score, decision and nearest generated images for each uploaded real image")
    async def score(self, request: Request, thumbnails: Literal["", "url", "inline"] = Query(
            "", description="Pictures of the nearest generated images: 'url' (their /v1/thumbnails/<id> route) or "
                            "'inline' (data: URLs in the answer); empty for none.")) -> dict[str, Any]:
        self._check_auth(request)  # before the body is read
        state, cfg = self._ready()  # one snapshot for the whole request
        raw = await read_images(request, cfg)
        names, images = await asyncio.to_thread(decode_all, raw, cfg)
        results = await asyncio.gather(*(self._score_batch((state, im, n)) for im, n in zip(images, names,
                                                                                             strict=True)))
        failed = [(n, r) for n, r in zip(names, results, strict=True) if isinstance(r, Exception)]
        if failed:
            raise ApiError(500, "scoring_failed",
                           "; ".join(f"{n}: {type(r).__name__}: {r}" for n, r in failed), [n for n, _ in failed])
        answers = [{"id": n, **r} for n, r in zip(names, results, strict=True)]
        if thumbnails:
            await asyncio.to_thread(add_thumbnails, answers, state, thumbnails)
        return {"model": _model_ref(state), "kind": state.kind, "threshold": state.threshold,
                "signal": state.detector.meta.signal, "results": answers}

    @api.get("/v1/thumbnails/{image_id:path}", response_class=Response, responses={
        200: {"content": {"image/png": {}}, "description": "The picture (8-bit gray PNG, longest side 64 px)."},
        401: {"model": ErrorBody}, 404: {"model": ErrorBody}},
        summary="The thumbnail of a generated image of the gallery (an id from a score's `nearest`)")
    async def thumbnail(self, request: Request, image_id: str) -> Response:
        self._check_auth(request)
        state, _ = self._ready()
        thumbs = state.thumbnails
        if thumbs is None:
            raise ApiError(404, "no_thumbnails", "this detector was saved without gallery thumbnails "
                           "(thumbs.safetensors); fit or save it again with this version to get them")
        png = thumbs.png(image_id)
        if png is None:
            raise ApiError(404, "unknown_id", f"{image_id!r} is not an image of the served gallery", [image_id])
        return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=3600"})

    @api.get("/v1/model", summary="The served detector (kind, version, metrics, threshold), batch settings, stats")
    async def model_info(self, request: Request) -> dict[str, Any]:
        self._check_auth(request)
        state, cfg = self._ready()
        det, info = state.detector, state.info
        return {
            **_model_ref(state), "registered_model": info.get("registered_model"),
            "description": det.describe(), "settings": det.meta.settings,
            "metrics": _finite(det.meta.metrics), "threshold": state.threshold,
            "detector_threshold": det.threshold, "threshold_method": det.meta.threshold_method,
            # At the detector's own threshold and images: a user_config threshold, gallery or reference pool is
            # not covered by it, and false_positives_apply says so.
            "detector_false_positives": to_dict(det.meta.false_positives) if det.meta.false_positives else None,
            "false_positives_apply": bool(det.meta.false_positives) and state.threshold == det.threshold
            and not cfg.gallery and not cfg.reference,
            "signal": det.meta.signal, "created_at": det.meta.created_at,
            "source": info["source"], "run_id": info.get("run_id"), "arrays_sha256": info["arrays_sha256"],
            "loaded_at": info["loaded_at"], "load_seconds": info["load_seconds"],
            "gallery": {"size": len(det.gallery_ids), "source": info["gallery_source"]},
            "reference": {"size": len(det.reference_ids), "source": info["reference_source"]},
            "batching": {"max_batch_size": self._score_batch._get_max_batch_size(),
                         "batch_wait_timeout_s": self._score_batch._get_batch_wait_timeout_s(),
                         **self.stats.as_dict()},
            "limits": {"max_image_bytes": cfg.max_image_bytes, "max_image_pixels": cfg.max_image_pixels,
                       "max_image_side": cfg.max_image_side, "max_aspect_ratio": cfg.max_aspect_ratio,
                       "max_images_per_request": cfg.max_images_per_request, "body_timeout_s": cfg.body_timeout_s},
            "thumbnails": len(state.thumbnails) if state.thumbnails is not None else None,
            "auth": bool(self._token), "reload": cfg.reload, "reload_error": self._reload_error,
            "swaps": self._swaps[-10:], "replica": serve.get_replica_context().replica_tag,
            "torch_threads": torch.get_num_threads(),
        }

    @api.post("/v1/stats/reset", summary="Forget the batch-size statistics of the replica that answers")
    async def reset_stats(self, request: Request) -> dict[str, Any]:
        self._check_auth(request)
        self.stats.reset()
        return {"reset": True, "replica": serve.get_replica_context().replica_tag}

    # -- probes, documentation, the page (no model details without the token) --------------------------------

    @api.get("/healthz", summary="200 {status: ok} when this replica serves a detector, else 503; no token needed")
    async def healthz(self) -> JSONResponse:
        return self._readiness()

    @api.get("/readyz", summary="Readiness: 200 when a detector is loaded, else 503; no token needed")
    async def readyz(self) -> JSONResponse:
        return self._readiness()

    @api.get("/livez", summary="Liveness: 200 while the replica answers at all; no token needed")
    async def livez(self) -> JSONResponse:
        return JSONResponse({"status": "alive"})

    def _readiness(self) -> JSONResponse:
        if self._state is None:
            return JSONResponse({"status": "unavailable"}, status_code=503, headers={"retry-after": "5"})
        return JSONResponse({"status": "ok"})

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        self._check_auth(request)
        return JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        self._check_auth(request)
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{api.title} - docs")

    @api.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        # Static and data-free (no token needed to load it): it asks for the token and sends it with each call.
        return HTMLResponse(PAGE_HTML, headers={
            "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; "
                                       "base-uri 'none'; frame-ancestors 'none'",
            "x-content-type-options": "nosniff", "cache-control": "no-store"})

    def check_health(self) -> None:
        """Serve's own health probe: a replica without a detector is not healthy."""
        if self._state is None:
            raise RuntimeError("no model loaded")


# ---------------------------------------------------------------------------------------------------------
# Building the application


DEPLOYMENT_ARGS = ("num_replicas", "min_replicas", "max_replicas", "target_ongoing_requests",
                   "max_ongoing_requests", "max_queued_requests", "num_cpus", "max_surge_percent")


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder: `args` holds ServeConfig fields (the user_config) and deployment options.

    Deployment options: num_replicas (default 1), or min_replicas/max_replicas/target_ongoing_requests for
    autoscaling; max_ongoing_requests (default 64); max_queued_requests (default 64; -1 = unbounded); num_cpus
    per replica (default 1); max_surge_percent
    (default 100: a redeploy through `serve.run`, which replaces replicas, starts each new replica before its
    old one stops, so capacity never drops).
    Usable as `serve run serve.app:build_app detector=...` or from Python.
    """
    args = dict(args)
    dep = {k: args.pop(k) for k in DEPLOYMENT_ARGS if k in args}
    user_config = from_user_config(args)  # fail here, on the driver, with every problem listed
    options: dict[str, Any] = {
        "user_config": {k: v for k, v in vars(user_config).items() if v != getattr(ServeConfig, k, None)},
        "max_ongoing_requests": int(dep.get("max_ongoing_requests", DEFAULT_MAX_ONGOING_REQUESTS)),
        "max_queued_requests": int(dep.get("max_queued_requests", DEFAULT_MAX_QUEUED_REQUESTS)),
        "ray_actor_options": {"num_cpus": float(dep.get("num_cpus", 1))},
        "max_surge_percent": int(dep.get("max_surge_percent", 100)),
    }
    if "min_replicas" in dep or "max_replicas" in dep:
        options["autoscaling_config"] = {
            "min_replicas": int(dep.get("min_replicas", 1)), "max_replicas": int(dep.get("max_replicas", 2)),
            "target_ongoing_requests": float(dep.get("target_ongoing_requests", user_config.max_batch_size))}
    else:
        options["num_replicas"] = int(dep.get("num_replicas", 1))
    if options["max_ongoing_requests"] < user_config.max_batch_size:
        raise ConfigError([f"max_ongoing_requests ({options['max_ongoing_requests']}) must be >= max_batch_size "
                           f"({user_config.max_batch_size}), or batches can never fill"])
    return FingerprintService.options(**options).bind()


# What `serve build serve.app:app` exports: edit user_config in serve/config.yaml (the paths are the replica's).
DEFAULT_USER_CONFIG: dict[str, Any] = {
    "registered_model": "fingerprint",
    "alias": "champion",
    "tracking_uri": "sqlite:///mlflow.db",
    "gallery": "",
    "reference": "",
    "max_batch_size": 16,
    "batch_wait_timeout_s": 0.01,
    "reload": 0,
}

# No autoscaling_config here: a config file that sets num_replicas would not switch it off (Serve keeps the
# code's autoscaling and ignores num_replicas), so scaling is set in serve/config.yaml alone.
app = FingerprintService.options(user_config=DEFAULT_USER_CONFIG).bind()
