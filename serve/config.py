"""The serving settings: the deployment's `user_config`, one typed dataclass with a docstring per field.

Everything here can change on a running deployment (`serve deploy` with an edited config, or `serve.run` again):
Serve calls `reconfigure(user_config)` on every replica, which applies batch settings at once and reloads the
model and gallery only when their sources (or `reload`) changed. Deployment options (replicas, autoscaling,
`max_ongoing_requests`, CPUs) are Serve's own and live beside `user_config` in serve/config.yaml.

Model source, one of:
    checkpoint: runs/s1/checkpoint                       # a folder from `fingerprint train`
    registered_model: fingerprint-ctbench                # the MLflow registry (alias resolved at load time)
    alias: champion
    tracking_uri: sqlite:///mlflow.db
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from fingerprint.config import ConfigError, flag, validate

TOKEN_ENV = "FINGERPRINT_SERVE_TOKEN"
EMBEDDING_SUFFIXES = (".npz", ".npy")


@dataclass
class ServeConfig:
    checkpoint: str = ""
    """Checkpoint folder written by `fingerprint train` (model.pt + meta.json). Leave empty to load the
    registered model's alias instead."""
    registered_model: str = ""
    """MLflow registered model to serve; its --alias is resolved to a concrete version when the model loads."""
    alias: str = "champion"
    """Registry alias to serve (moved by `fingerprint promote`)."""
    tracking_uri: str = ""
    """MLflow tracking URI holding the registry (e.g. sqlite:///mlflow.db); empty uses MLFLOW_TRACKING_URI."""
    gallery: str = ""
    """The generated images to compare against: a folder of images, a test/benchmark folder (its generated
    images; test then dev, as `fingerprint predict` uses them), or saved embeddings (.npz with 'embeddings' and
    'ids', or .npy with --gallery-ids). Saved embeddings must come from the served model."""
    gallery_ids: str = ""
    """Text file with one id per line for a .npy --gallery (default: row numbers)."""
    reference: str = ""
    """Real images for calibrated scores (the pool each query's real-neighbour similarity is measured in): a
    folder of images, a benchmark folder (all its real images), or saved embeddings (.npz/.npy). Needed when the
    checkpoint calibrates, unless --calibrate no."""
    calibrate: Literal["checkpoint", "yes", "no"] = "checkpoint"
    """Calibrate scores against --reference: 'checkpoint' does what the model was validated with."""
    k: int | None = None
    """Nearest generated images per score; None uses the checkpoint's k (and its threshold stays meaningful)."""
    threshold: float | None = None
    """Decision threshold; None uses the checkpoint's."""
    max_batch_size: int = 16
    """Most images embedded in one forward pass (dynamic batching); keep <= the deployment's
    max_ongoing_requests or batches can never fill."""
    batch_wait_timeout_s: float = 0.01
    """How long the first image of a batch waits for others before the batch runs anyway."""
    max_image_bytes: int = 8 * 1024 * 1024
    """Largest accepted encoded image (bytes); larger uploads get HTTP 413."""
    max_image_pixels: int = 4096 * 4096
    """Largest accepted image area (width x height) before decoding: guards against decompression bombs."""
    max_images_per_request: int = 64
    """Most images in one request."""
    auth_token: str = ""
    """Bearer token that requests must send (Authorization: Bearer ...). Prefer --auth-token-env: a token
    written here is visible to anyone who can read the Serve config. Empty with an empty variable = no auth."""
    auth_token_env: str = TOKEN_ENV
    """Environment variable (read in each replica) holding the bearer token; used when --auth-token is empty."""
    device: str = "auto"
    """auto, cpu or cuda."""
    torch_threads: int = 0
    """Intra-op threads for the forward pass; 0 keeps what Ray set (the replica's num_cpus)."""
    trace: bool = True
    """On CPU, run the forward as a TorchScript trace: the same kernels without Python between them, so the
    forward releases the GIL and the replica keeps reading requests (and filling the next batch) while it runs.
    Checked against the eager model at load; eager is used if tracing fails or the outputs differ."""
    reload: int = 0
    """Change this number to reload: re-resolve the alias (hot swap after `fingerprint promote`), re-read
    the checkpoint, gallery and reference. Requests in flight finish on the model they started with."""

    def problems(self) -> list[str]:
        out = []
        if bool(self.checkpoint) == bool(self.registered_model):
            out.append(f"{flag('checkpoint')} / {flag('registered_model')}: give exactly one model source "
                       f"(got {'both' if self.checkpoint else 'neither'})")
        if self.checkpoint and not Path(self.checkpoint).exists():
            out.append(f"{flag('checkpoint')}: '{self.checkpoint}' does not exist")
        if self.registered_model and not self.alias:
            out.append(f"{flag('alias')}: required with {flag('registered_model')} (e.g. champion)")
        if not self.gallery:
            out.append(f"{flag('gallery')}: required, a folder of generated images or saved embeddings")
        elif not Path(self.gallery).exists():
            out.append(f"{flag('gallery')}: '{self.gallery}' does not exist")
        if self.gallery_ids and not Path(self.gallery_ids).is_file():
            out.append(f"{flag('gallery_ids')}: '{self.gallery_ids}' is not a file")
        if self.reference and not Path(self.reference).exists():
            out.append(f"{flag('reference')}: '{self.reference}' does not exist")
        if self.calibrate not in ("checkpoint", "yes", "no"):
            out.append(f"{flag('calibrate')}: one of checkpoint, yes, no (got {self.calibrate!r})")
        if self.k is not None and self.k < 1:
            out.append(f"{flag('k')}: must be >= 1 (got {self.k})")
        if self.max_batch_size < 1:
            out.append(f"{flag('max_batch_size')}: must be >= 1 (got {self.max_batch_size})")
        if not 0.0 <= self.batch_wait_timeout_s <= 10.0:
            out.append(f"{flag('batch_wait_timeout_s')}: must be in [0, 10] seconds (got {self.batch_wait_timeout_s})")
        for name in ("max_image_bytes", "max_image_pixels", "max_images_per_request"):
            if getattr(self, name) < 1:
                out.append(f"{flag(name)}: must be >= 1 (got {getattr(self, name)})")
        if self.device not in ("auto", "cpu", "cuda"):
            out.append(f"{flag('device')}: one of auto, cpu, cuda (got {self.device!r})")
        if self.torch_threads < 0:
            out.append(f"{flag('torch_threads')}: must be >= 0 (got {self.torch_threads})")
        return out

    def token(self) -> str:
        """The bearer token requests must carry ('' = authentication off)."""
        return self.auth_token or (os.environ.get(self.auth_token_env, "") if self.auth_token_env else "")

    def model_source(self) -> tuple[str, ...]:
        """What identifies the model to load (the alias is resolved later, at load time)."""
        if self.checkpoint:
            return ("checkpoint", str(Path(self.checkpoint).resolve()))
        return ("registry", self.tracking_uri, self.registered_model, self.alias)

    def data_source(self) -> tuple[Any, ...]:
        """Everything whose change needs the model state rebuilt (gallery, reference, scoring, device)."""
        return (self.model_source(), self.gallery, self.gallery_ids, self.reference, self.calibrate, self.k,
                self.device, self.trace, self.reload)


def from_user_config(user_config: dict[str, Any] | None) -> ServeConfig:
    """Validate a `user_config` dict: unknown keys and bad values are one ConfigError listing each."""
    if user_config is None:
        user_config = {}
    if not isinstance(user_config, dict):
        raise ConfigError([f"user_config: expected a mapping of settings, got {type(user_config).__name__}"])
    known = {f.name: f for f in fields(ServeConfig)}
    problems = [f"user_config.{k}: unknown setting; known: {', '.join(known)}" for k in user_config if k not in known]
    values = {k: v for k, v in user_config.items() if k in known}
    # YAML gives ints where floats are meant (batch_wait_timeout_s: 0) and users write numbers as strings.
    for name, value in list(values.items()):
        default = known[name].default
        if value is None or isinstance(default, str) or name in ("k", "threshold"):
            continue
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                values[name] = value.lower() in ("true", "yes", "1")
            elif not isinstance(value, bool):
                problems.append(f"user_config.{name}: expected true or false, got {value!r}")
        elif isinstance(value, bool):
            problems.append(f"user_config.{name}: expected a number, got {value!r}")
        elif isinstance(default, float):
            try:
                values[name] = float(value)
            except (TypeError, ValueError):
                problems.append(f"user_config.{name}: expected a number, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, float) and not value.is_integer() or not isinstance(value, int | float | str):
                problems.append(f"user_config.{name}: expected an integer, got {value!r}")
                continue
            try:
                values[name] = int(value)
            except ValueError:
                problems.append(f"user_config.{name}: expected an integer, got {value!r}")
    for name, kind in (("k", int), ("threshold", float)):
        if values.get(name) is not None:
            try:
                values[name] = kind(values[name])
            except (TypeError, ValueError):
                problems.append(f"user_config.{name}: expected a number or null, got {values[name]!r}")
    for name in ("checkpoint", "registered_model", "alias", "tracking_uri", "gallery", "gallery_ids", "reference",
                 "calibrate", "auth_token", "auth_token_env", "device"):
        if name in values and not isinstance(values[name], str):
            problems.append(f"user_config.{name}: expected a string, got {values[name]!r}")
    if problems:
        raise ConfigError(problems)
    return validate(ServeConfig(**values))
