"""The serving settings: the deployment's `user_config`, one typed dataclass with a docstring per field.

One source of truth: the dataclass below. `fingerprint serve --help` builds one flag per field from it (with the
field's docstring as help), and a YAML `user_config` is validated against the same class by pydantic
(`from_user_config`: unknown keys are refused, YAML and string values are coerced to the field's type, and every
problem names its `user_config.<field>`). Bounds and cross-field rules live in `ServeConfig.problems`.

Everything here can change on a running deployment (`serve deploy` with an edited config, or
`serve.deploy.reload_app`): Serve calls `reconfigure(user_config)` on every replica, which applies batch settings
at once and reloads the detector only when its source, its gallery or `reload` changed. Deployment options
(replicas, autoscaling, `max_ongoing_requests`, CPUs) are Serve's own and live beside `user_config` in
serve/config.yaml.

Model source, one of:
    detector: runs/fit/detector                          # a folder from `fingerprint fit` / `train` (any kind)
    registered_model: fingerprint-ctbench                # the MLflow registry (alias resolved at load time)
    alias: champion
    tracking_uri: sqlite:///mlflow.db

`checkpoint` is the old name of `detector` (scripts and configs that set it keep working).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

from fingerprint.config import ConfigError, Range, check_fields, flag, validate

TOKEN_ENV = "FINGERPRINT_SERVE_TOKEN"


@dataclass
class ServeConfig:
    detector: str = ""
    """Saved detector to serve, any kind: the folder written by `fingerprint fit` / `fingerprint train`
    (meta.json + arrays.safetensors + ids.json) or the run folder holding it in detector/. Leave empty to load
    the registered model's alias instead."""
    checkpoint: str = ""
    """Old name of --detector, kept so existing scripts and configs work; give one of the two."""
    registered_model: str = ""
    """MLflow registered model to serve; its --alias is resolved to a concrete version when the model loads."""
    alias: str = "champion"
    """Registry alias to serve (moved by `fingerprint promote`)."""
    tracking_uri: str = ""
    """MLflow tracking URI holding the registry (e.g. sqlite:///mlflow.db); empty uses MLFLOW_TRACKING_URI."""
    gallery: str = ""
    """Optional. Empty (the default) serves the gallery and reference pool saved in the detector: start-up
    reads no images. A benchmark or test folder (as `fingerprint predict --data` reads it) re-indexes the
    detector on it instead: its generated images become the gallery and, unless --reference is given, its real
    images the reference pool. What the detector learnt (weights, threshold, chosen members) is kept."""
    reference: str = ""
    """Optional, with --gallery only: a benchmark or test folder whose real images become the reference pool
    (default: the --gallery folder's real images)."""
    threshold: float | None = None
    """Decision threshold; None uses the detector's."""
    max_batch_size: Annotated[int, Range(1)] = 16
    """Most images scored in one detector call (dynamic batching); keep <= the deployment's
    max_ongoing_requests or batches can never fill."""
    batch_wait_timeout_s: Annotated[float, Range(0, 10)] = 0.01
    """How long the first image of a batch waits for others before the batch runs anyway."""
    max_image_bytes: Annotated[int, Range(1)] = 8 * 1024 * 1024
    """Largest accepted encoded image (bytes); larger uploads get HTTP 413."""
    max_image_pixels: Annotated[int, Range(1)] = 4096 * 4096
    """Largest accepted image area (width x height) before decoding: guards against decompression bombs."""
    max_image_side: Annotated[int, Range(1)] = 8192
    """Longest accepted image side (pixels), checked from the header before decoding: a tiny PNG can declare
    1048576 x 1 pixels, under the area limit, and still make decoders allocate huge rows."""
    max_aspect_ratio: Annotated[float, Range(1)] = 16.0
    """Largest accepted ratio of an image's long side to its short side, checked before decoding."""
    max_images_per_request: Annotated[int, Range(1)] = 64
    """Most images in one request."""
    body_timeout_s: Annotated[float, Range(0.1)] = 30.0
    """Most seconds a client may take to send a request body; slower ones get HTTP 408 (a slow client then
    holds a replica's request slot at most this long)."""
    auth_token: str = ""
    """Bearer token that requests must send (Authorization: Bearer ...). Prefer --auth-token-env: a token
    written here is visible to anyone who can read the Serve config. Empty with an empty variable = no auth."""
    auth_token_env: str = TOKEN_ENV
    """Environment variable (read in each replica) holding the bearer token; used when --auth-token is empty."""
    torch_threads: Annotated[int, Range(0)] = 0
    """Intra-op threads for network kinds' forward pass; 0 keeps what Ray set (the replica's num_cpus)."""
    trace: bool = True
    """Network kinds on CPU: run the forward as a TorchScript trace (the same kernels without Python between
    them, so the replica keeps reading requests while it runs). Checked against the eager network at load;
    eager is used if tracing fails or the outputs differ."""
    reload: int = 0
    """Change this number to reload: re-resolve the alias (hot swap after `fingerprint promote`), re-read the
    detector and its gallery. Requests in flight finish on the detector they started with."""

    # Validation of a YAML user_config by pydantic (not a field: no annotation).
    __pydantic_config__ = ConfigDict(extra="forbid")

    def problems(self) -> list[str]:
        out = check_fields(self)
        if self.detector and self.checkpoint and Path(self.detector) != Path(self.checkpoint):
            out.append(f"{flag('detector')} / {flag('checkpoint')}: --checkpoint is the old name of --detector; "
                       "give one of them")
        local = self.detector_path()
        if bool(local) == bool(self.registered_model):
            out.append(f"{flag('detector')} / {flag('registered_model')}: give exactly one model source "
                       f"(got {'both' if local else 'neither'})")
        if local and not Path(local).exists():
            out.append(f"{flag('detector')}: '{local}' does not exist")
        if self.registered_model and not self.alias:
            out.append(f"{flag('alias')}: required with {flag('registered_model')} (e.g. champion)")
        if self.gallery and not Path(self.gallery).exists():
            out.append(f"{flag('gallery')}: '{self.gallery}' does not exist")
        if self.reference and not self.gallery:
            out.append(f"{flag('reference')}: only used with {flag('gallery')} (a re-index); without it the "
                       "detector's saved reference pool is served")
        elif self.reference and not Path(self.reference).exists():
            out.append(f"{flag('reference')}: '{self.reference}' does not exist")
        return out

    def detector_path(self) -> str:
        """The local detector folder (--detector, or its old name --checkpoint); '' for the registry."""
        return self.detector or self.checkpoint

    def token(self) -> str:
        """The bearer token requests must carry ('' = authentication off)."""
        return self.auth_token or (os.environ.get(self.auth_token_env, "") if self.auth_token_env else "")

    def model_source(self) -> tuple[str, ...]:
        """What identifies the model to load (the alias is resolved later, at load time)."""
        if self.detector_path():
            return ("detector", str(Path(self.detector_path()).resolve()))
        return ("registry", self.tracking_uri, self.registered_model, self.alias)

    def data_source(self) -> tuple[Any, ...]:
        """Everything whose change needs the model state rebuilt (model, gallery, reference, reload)."""
        return (self.model_source(), self.gallery, self.reference, self.threshold, self.reload)


_ADAPTER = TypeAdapter(ServeConfig)


def from_user_config(user_config: dict[str, Any] | None) -> ServeConfig:
    """Validate a `user_config` mapping: every unknown key and bad value in one ConfigError naming each."""
    if user_config is None:
        user_config = {}
    if not isinstance(user_config, dict):
        raise ConfigError([f"user_config: expected a mapping of settings, got {type(user_config).__name__}"])
    try:
        config = _ADAPTER.validate_python(user_config)
    except ValidationError as e:
        known = ", ".join(ServeConfig.__dataclass_fields__)
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"])
            if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
                problems.append(f"user_config.{where}: unknown setting; known: {known}")
            else:
                problems.append(f"user_config.{where}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(problems) from None
    return validate(config)
