"""What a replica serves, without Ray: the loaded model, its gallery and reference pool, and image decoding.

`load_state(config)` resolves the model source (a checkpoint folder, or a registry alias resolved to one concrete
version), loads the network, and embeds (or reads) the gallery of generated images and the real reference pool.
A `ModelState` is immutable once built: a hot swap builds a new one and replaces a single reference, so a
request that started on the old state finishes on it, gallery and threshold included.

Scores are computed by `fingerprint.scoring.membership_scores` on the same embeddings `fingerprint predict`
computes, so the service and the batch command agree to float precision.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fingerprint import data as fpdata
from fingerprint.checkpoint import Checkpoint, load_checkpoint
from fingerprint.config import ConfigError, ScoreConfig, flag, from_dict
from fingerprint.embedding import autocast, embed_images, resolve_device
from fingerprint.io import write_bytes_atomic
from fingerprint.predict import resolve_checkpoint
from fingerprint.scoring import Scores, membership_scores, normalize
from fingerprint.transforms import Preprocess
from serve.config import EMBEDDING_SUFFIXES, ServeConfig

log = logging.getLogger(__name__)


class InputError(ValueError):
    """A request item the service cannot use; `status` is the HTTP status, `code` a stable machine name."""

    def __init__(self, status: int, code: str, message: str, item: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.item = item


# ---------------------------------------------------------------------------------------------------------
# Decoding uploads


def decode_image(data: bytes, item: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode one uploaded PNG/JPEG to 8-bit gray exactly as `fingerprint.data.load_image` reads files.

    Raises InputError (naming `item`) for an empty, oversized, truncated or non-image upload.
    """
    if not data:
        raise InputError(400, "empty_image", f"{item}: empty upload (0 bytes); send PNG or JPEG bytes", item)
    if len(data) > max_bytes:
        raise InputError(413, "image_too_large",
                         f"{item}: {len(data)} bytes is over the limit of {max_bytes} bytes (max_image_bytes)", item)
    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) between 1x and 2x its own pixel limit; ours below is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError as e:
        raise InputError(415, "not_an_image", f"{item}: not an image (no known image header); send PNG or JPEG bytes",
                         item) from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on broken headers
        raise InputError(415, "not_an_image", f"{item}: not a readable PNG or JPEG ({type(e).__name__}: {e})",
                         item) from e
    with im:
        if im.format not in fpdata.IMAGE_FORMATS:
            raise InputError(415, "unsupported_format",
                             f"{item}: a {im.format} image; only PNG and JPEG are accepted (convert it)", item)
        w, h = im.size
        if w * h > max_pixels:
            raise InputError(413, "image_too_large",
                             f"{item}: {w}x{h} pixels is over the limit of {max_pixels} (max_image_pixels)", item)
        try:
            # load() decodes every pixel, which is what catches a truncated file (open() reads the header only).
            im.load()
            # The same conversion rules as files read by the library (16-bit, RGB, palette -> 8-bit gray).
            return fpdata.to_gray8(im)
        except Exception as e:
            raise InputError(422, "invalid_image",
                             f"{item}: the {im.format} data is damaged or truncated ({type(e).__name__}: {e})",
                             item) from e


# ---------------------------------------------------------------------------------------------------------
# The served state


@dataclass(frozen=True)
class Embeddings:
    """L2-normalised embeddings with their ids and where they came from."""

    vectors: np.ndarray
    ids: list[str]
    source: str


@dataclass
class ModelState:
    """One loaded model version with everything scoring needs. Treated as immutable after `load_state`."""

    checkpoint: Checkpoint
    transform: Preprocess
    device: torch.device
    score_config: ScoreConfig
    threshold: float
    gallery: Embeddings
    reference: Embeddings | None
    info: dict[str, Any]
    """name, version, alias, source, checkpoint_sha256, run_id, loaded_at, forward: reported by the API."""
    forward: Any = None
    """The callable the service runs (a checked TorchScript trace, or the model itself)."""

    @property
    def version(self) -> str:
        return str(self.info.get("version") or "")

    @property
    def calibrated(self) -> bool:
        return self.score_config.calibrate

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The per-image part of preprocessing (resize, crop): uint8 pixels for `embed`."""
        return self.transform.pixels(image)

    @torch.no_grad()
    def embed(self, pixels: list[torch.Tensor]) -> np.ndarray:
        """Embeddings (N, D) of images from `pixels`: normalised as one batch, one forward pass, as
        `embed_images` does it."""
        x = self.transform.finish(torch.stack(pixels)).to(self.device)
        with autocast(self.device, True):
            return (self.forward or self.checkpoint.model)(x).float().cpu().numpy()

    def score(self, embeddings: np.ndarray) -> Scores:
        """Exact top-k against the whole gallery (matrix product), calibrated on the reference pool."""
        ref = self.reference.vectors if (self.reference is not None and self.score_config.calibrate) else None
        return membership_scores(embeddings, self.gallery.vectors, self.score_config, ref)


def checkpoint_digest(path: str | Path) -> str:
    """sha256 of a checkpoint's weights: ties saved embeddings to the model that made them."""
    h = hashlib.sha256()
    with open(Path(path) / "model.pt", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_embeddings(path: str | Path, vectors: np.ndarray, ids: list[str], model_sha256: str) -> Path:
    """Write embeddings as .npz (embeddings, ids, model_sha256) for `--gallery` / `--reference`."""
    buf = io.BytesIO()
    np.savez(buf, embeddings=np.asarray(vectors, dtype=np.float32), ids=np.asarray(ids, dtype=str),
             model_sha256=np.asarray(model_sha256))
    return write_bytes_atomic(path, buf.getvalue())


def _is_benchmark(path: Path) -> bool:
    return (path / "dev").is_dir() or (path / "test").is_dir()


def _image_items(path: Path, kind: str) -> list[fpdata.ImageItem]:
    """The generated (`kind='generated'`) or real images under `path`, in `fingerprint predict`'s order."""
    if _is_benchmark(path):
        dev, test = fpdata.open_benchmark(path, skip_bad=True)
        sets = [("test", test), ("dev", dev)] if test is not None else [("dev", dev)]
        items = []
        for split, s in sets:
            chosen = s.generated if kind == "generated" else s.real
            items += [fpdata.ImageItem(f"{split}/{it.id}", it.path, it.role, it.label, it.group) for it in chosen]
        return items
    if any((path / n).is_dir() for names in fpdata.ROLE_DIRS.values() for n in names) or (
        path / fpdata.MANIFEST_NAME
    ).is_file():
        s = fpdata.open_folder(path, skip_bad=True)
        return s.generated if kind == "generated" else s.real
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in fpdata.IMAGE_SUFFIXES)
    return [fpdata.ImageItem(p.stem, p, "generated" if kind == "generated" else "real_unknown", None) for p in files]


def _embed_items(state_like: tuple[torch.nn.Module, Preprocess, torch.device], items: list[fpdata.ImageItem],
                 batch_size: int = 64) -> tuple[np.ndarray, list[str]]:
    model, transform, device = state_like
    images, kept, skipped = fpdata.load_images(items, skip_bad=True)
    for p, why in skipped:
        log.warning("skipped %s: %s", p, why)
    if not images:
        return np.zeros((0, 0), dtype=np.float32), []
    return embed_images(model, images, transform, batch_size, device), [it.id for it in kept]


def load_embeddings(path: str | Path, what: str, model_sha256: str, ids_file: str = "") -> Embeddings:
    """Saved embeddings (.npz from `save_embeddings`, or .npy + an ids file), checked against the model."""
    path = Path(path)
    name = flag(what)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "embeddings" not in z:
                    raise ConfigError([f"{name}: {path} has no 'embeddings' array (found {', '.join(z.files)})"])
                vectors = z["embeddings"]
                ids = [str(i) for i in z["ids"]] if "ids" in z else None
                saved_sha = str(z["model_sha256"]) if "model_sha256" in z else ""
        else:
            vectors, ids, saved_sha = np.load(path, allow_pickle=False), None, ""
    except (OSError, ValueError) as e:
        raise ConfigError([f"{name}: cannot read {path} as numpy embeddings ({e})"]) from e
    if ids_file:
        ids = [line.strip() for line in Path(ids_file).read_text().splitlines() if line.strip()]
    if ids is None:
        ids = [str(i) for i in range(len(vectors))]
    problems = []
    if vectors.ndim != 2 or len(vectors) == 0:
        problems.append(f"{name}: {path} must hold a non-empty (N, D) array, got shape {vectors.shape}")
    elif len(ids) != len(vectors):
        problems.append(f"{name}: {len(vectors)} embeddings but {len(ids)} ids")
    if saved_sha and saved_sha != model_sha256:
        problems.append(
            f"{name}: {path} was computed with another model (weights sha256 {saved_sha[:12]}, serving "
            f"{model_sha256[:12]}); re-embed with the served model or give the image folder instead")
    if problems:
        raise ConfigError(problems)
    if not saved_sha:
        log.warning("%s: %s records no model digest; trusting that it comes from the served model", name, path)
    return Embeddings(normalize(vectors), ids, str(path))


def _load_set(path_text: str, what: str, kind: str, ids_file: str, ckpt: Checkpoint, transform: Preprocess,
              device: torch.device, model_sha256: str) -> Embeddings:
    path = Path(path_text)
    if path.is_file() and path.suffix in EMBEDDING_SUFFIXES:
        emb = load_embeddings(path, what, model_sha256, ids_file)
    else:
        if path.is_file():
            raise ConfigError([f"{flag(what)}: {path} is a file but not .npz/.npy embeddings; give a folder or "
                               "saved embeddings"])
        items = _image_items(path, kind)
        vectors, ids = _embed_items((ckpt.model, transform, device), items)
        if not ids:
            raise ConfigError([f"{flag(what)}: no readable {kind} images under {path}"])
        emb = Embeddings(vectors, ids, str(path))
    dim = ckpt.model.head.out_features
    if emb.vectors.shape[1] != dim:
        raise ConfigError([f"{flag(what)}: embeddings have dimension {emb.vectors.shape[1]}, the model makes {dim}"])
    return emb


def trace_model(model: torch.nn.Module, input_size: tuple[int, ...], device: torch.device) -> tuple[Any, str]:
    """A TorchScript trace of `model` if it reproduces the eager outputs exactly enough, else the model itself.

    Returns (callable, what was chosen and why). Only on CPU: on CUDA the forward waits on the GPU, not on the
    interpreter, and autocast would have to be traced too.
    """
    if device.type != "cpu":
        return model, "eager (tracing is used on CPU only)"
    gen = torch.Generator().manual_seed(0)
    probe = torch.rand((3, *input_size), generator=gen)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about Python-level branches: checked below instead
            traced = torch.jit.trace(model, probe[:2], check_trace=False)
            # A different batch size than the trace's, so a batch dimension baked into the graph shows.
            diff = float((traced(probe) - model(probe)).abs().max())
    except Exception as e:  # any model timm can build may not trace; eager always works
        return model, f"eager (tracing failed: {type(e).__name__}: {str(e)[:200]})"
    if not diff <= 1e-6:
        return model, f"eager (the trace differs from the model by {diff:.2e})"
    return traced, "torchscript trace"


def _resolve_model(config: ServeConfig, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder to load and what to report about it; a registry alias becomes a version here."""
    if config.checkpoint:
        path = resolve_checkpoint(config.checkpoint)
        return path, {"name": path.parent.name if path.name == "checkpoint" else path.name, "version": "local",
                      "alias": None, "source": str(path), "run_id": None}
    import mlflow  # only the registry source needs MLflow (and the jobs package)

    from jobs.registry import download_checkpoint

    if config.tracking_uri:
        mlflow.set_tracking_uri(config.tracking_uri)
    mv, path = download_checkpoint(config.registered_model, config.alias, dst=workdir)
    return path, {"name": config.registered_model, "version": str(mv.version), "alias": config.alias,
                  "source": f"models:/{config.registered_model}@{config.alias}", "run_id": mv.run_id}


def load_state(config: ServeConfig) -> ModelState:
    """Load the model the config names and embed (or read) its gallery and reference pool."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    with tempfile.TemporaryDirectory(prefix="fingerprint-serve-") as tmp:
        # The weights are read into memory below, so a downloaded registry copy is not kept on disk.
        path, info = _resolve_model(config, Path(tmp))
        ckpt = load_checkpoint(path)
        sha = checkpoint_digest(path)
    ckpt.model.to(device).eval()
    score_config = from_dict(ScoreConfig, ckpt.meta["score"])
    if config.k is not None:
        score_config.k = config.k
    if config.calibrate != "checkpoint":
        score_config.calibrate = config.calibrate == "yes"
    if score_config.calibrate and not config.reference:
        raise ConfigError([
            f"{flag('reference')}: this model's scores are calibrated against real images (its threshold assumes "
            f"it); give a folder of real images (e.g. the benchmark folder) or set {flag('calibrate')} no"])
    transform = Preprocess(ckpt.meta["data_config"])
    gallery = _load_set(config.gallery, "gallery", "generated", config.gallery_ids, ckpt, transform, device, sha)
    reference = None
    if config.reference and score_config.calibrate:
        reference = _load_set(config.reference, "reference", "real", "", ckpt, transform, device, sha)
        if len(reference.ids) < score_config.k + 1:
            raise ConfigError([f"{flag('reference')}: {len(reference.ids)} real images; calibration needs at least "
                               f"k + 1 = {score_config.k + 1}"])
    threshold = ckpt.threshold if config.threshold is None else float(config.threshold)
    forward, how = (trace_model(ckpt.model, tuple(ckpt.meta["data_config"]["input_size"]), device)
                    if config.trace else (ckpt.model, "eager (trace off)"))
    info.update(forward=how, checkpoint_sha256=sha, backbone=ckpt.meta.get("config", {}).get("backbone"),
                embed_dim=int(ckpt.model.head.out_features),
                loaded_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                load_seconds=round(time.perf_counter() - started, 2))
    log.info("loaded %s version %s (%s) on %s: gallery %d from %s, reference %s, k=%d, threshold=%.4f, %.1fs",
             info["name"], info["version"], info["source"], device, len(gallery.ids), gallery.source,
             f"{len(reference.ids)} from {reference.source}" if reference else "none", score_config.k, threshold,
             info["load_seconds"])
    return ModelState(ckpt, transform, device, score_config, threshold, gallery, reference, info, forward)
