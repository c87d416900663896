"""What a replica serves, without Ray: the loaded detector (any registered kind) and image decoding.

`load_state(config)` resolves the model source (a detector folder, or a registry alias resolved to one concrete
version) and loads the detector with `fingerprint.detectors.load_detector`. A saved detector carries its gallery
(the generated images' features, `gallery_ids`) and its real reference pool, so start-up reads no images; with
`gallery` set, the detector is re-indexed on that folder exactly as `fingerprint predict --data` does it.

A `ModelState` is immutable once built: a hot swap builds a new one and replaces a single reference, so a request
that started on the old state finishes on it, kind, gallery and threshold included.

Scores are `Detector.score(images, ids)`, the call `fingerprint predict` makes, with the same ids (an uploaded
file's id is its file name without the image extension), so the service and the batch command agree.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from fingerprint.commands.predict import resolve_detector
from fingerprint.config import ConfigError, flag
from fingerprint.data import images as fpdata
from fingerprint.data.imagesets import benchmark_items, pool_groups
from fingerprint.data.thumbnails import Thumbnails, make_thumbnails
from fingerprint.detectors import Detector, load_detector
from fingerprint.detectors.networks import NetworkNN
from fingerprint.index_store import detector_digest, use_stored_index
from serve.config import ServeConfig

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


def item_id(name: str) -> str:
    """The id of an uploaded image: its name without an image extension, as `fingerprint predict` names files
    (``real_unknown_0001.png`` -> ``real_unknown_0001``). The id is what a detector uses to recognise an image
    of its own reference pool (which is then never compared with itself)."""
    path = Path(name)
    return name[: -len(path.suffix)] if path.suffix.lower() in fpdata.IMAGE_SUFFIXES else name


def decode_image(data: bytes, item: str, max_bytes: int, max_pixels: int, max_side: int = 8192,
                 max_aspect: float = 16.0) -> Image.Image:
    """Decode one uploaded PNG/JPEG to 8-bit gray exactly as `fingerprint.data.images.load_image` reads files.

    The declared size is checked against `max_pixels`, `max_side` and `max_aspect` from the header, before any
    pixel is decoded. Raises InputError (naming `item`) for an empty, oversized, truncated or non-image upload.
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
        # From the header alone: a decoder allocates by the declared size, whatever the file's length.
        if max(w, h) > max_side:
            raise InputError(413, "image_too_large",
                             f"{item}: {w}x{h} pixels has a side over {max_side} (max_image_side)", item)
        if min(w, h) < 1 or max(w, h) / min(w, h) > max_aspect:
            raise InputError(413, "image_too_large", f"{item}: {w}x{h} pixels is more elongated than "
                             f"{max_aspect:g}:1 (max_aspect_ratio); send the image uncropped", item)
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
class ModelState:
    """One loaded detector version with what the API reports about it. Treated as immutable once built."""

    detector: Detector
    threshold: float
    info: dict[str, Any] = field(default_factory=dict)
    """registered_model, version, alias, source, run_id, arrays_sha256, gallery/reference sources, loaded_at."""

    @property
    def version(self) -> str:
        return str(self.info.get("version") or "")

    @property
    def kind(self) -> str:
        return self.detector.kind

    @property
    def thumbnails(self) -> Thumbnails | None:
        """Pictures of the gallery (thumbs.safetensors), or None for a detector saved without them."""
        return self.detector.gallery_thumbnails

    def score(self, images: list[Image.Image], ids: list[str]) -> list[dict[str, Any]]:
        """One `Detector.score` call for the batch; per image its score, decision and evidence."""
        s = self.detector.score(images, ids)
        gallery = self.detector.gallery_ids
        out = []
        for i in range(len(images)):
            score = float(s.score[i])
            out.append({
                "score": score,
                "decision": bool(score >= self.threshold),
                "generated_similarity": None if s.generated_similarity is None else float(s.generated_similarity[i]),
                "real_similarity": None if s.real_similarity is None else float(s.real_similarity[i]),
                "nearest": [{"id": gallery[int(j)], "similarity": float(v)}
                            for j, v in zip(s.nearest[i], s.nearest_similarity[i], strict=True)],
            })
        return out


def _resolve_model(config: ServeConfig, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The detector folder to load and what to report about it; a registry alias becomes a version here."""
    if config.detector_path():
        try:
            path = resolve_detector(config.detector_path())
        except ConfigError as e:  # predict's message names --model; ours is --detector
            raise ConfigError([p.replace(flag("model"), flag("detector")) for p in e.problems]) from None
        return path, {"registered_model": None, "version": "local", "alias": None, "source": str(path),
                      "run_id": None}
    import mlflow  # only the registry source needs MLflow (and the jobs package)

    from jobs.registry import download_detector

    if config.tracking_uri:
        mlflow.set_tracking_uri(config.tracking_uri)
    mv, path = download_detector(config.registered_model, config.alias, dst=workdir)
    return path, {"registered_model": config.registered_model, "version": str(mv.version), "alias": config.alias,
                  "source": f"models:/{config.registered_model}@{config.alias}", "run_id": mv.run_id}


def reindex(det: Detector, gallery: str | Path, reference: str | Path | None = None) -> None:
    """Re-prepare `det` on the generated images of `gallery` and the real images of `reference` (default:
    `gallery`), both read as `fingerprint predict --data` reads a folder (same ids, same pseudo-patient groups).
    What the detector learnt is kept."""
    gen_items = benchmark_items(gallery, skip_bad=True).generated
    ref_items = benchmark_items(reference or gallery, skip_bad=True).real
    gen, gen_kept, _ = fpdata.load_images(gen_items, skip_bad=True)
    ref, ref_kept, _ = fpdata.load_images(ref_items, skip_bad=True)
    problems = []
    if not gen:
        problems.append(f"{flag('gallery')}: no readable generated images under {gallery}")
    if not ref:
        problems.append(f"{flag('reference' if reference else 'gallery')}: no readable real images under "
                        f"{reference or gallery} (the reference pool)")
    if problems:
        raise ConfigError(problems)
    groups = pool_groups(reference or gallery, ref_kept, ref)
    det.index(gen, [it.id for it in gen_kept], ref, [it.id for it in ref_kept], groups)
    det.gallery_thumbnails = make_thumbnails(gen, [it.id for it in gen_kept])  # the saved ones show other images


def trace_model(model: Any, input_size: tuple[int, ...], device: Any) -> tuple[Any, str]:
    """A TorchScript trace of `model` if it reproduces the eager outputs exactly enough, else the model itself.

    Returns (callable, what was chosen and why). Only on CPU: on CUDA the forward waits on the GPU, not on the
    interpreter. Why trace at all: an eager forward in a replica holds the GIL between kernels and fights the event
    loop that reads requests; a trace runs the same kernels without Python between them.
    """
    import warnings

    import torch

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



def load_state(config: ServeConfig) -> ModelState:
    """Load the detector the config names (re-indexed on `gallery` when one is given)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fingerprint-serve-") as tmp:
        # load_detector reads every array into memory, so a downloaded registry copy is not kept on disk.
        path, info = _resolve_model(config, Path(tmp))
        det = load_detector(path)
        sha = detector_digest(path)
        # The stored embeddings of `fingerprint embed` (<detector>/index), read while the folder still exists.
        stored = None if config.gallery else use_stored_index(det, path)
    if config.gallery:
        reindex(det, config.gallery, config.reference or None)
    threshold = det.threshold if config.threshold is None else float(config.threshold)
    forward = "none (no network)"
    if isinstance(det, NetworkNN):
        forward = "eager (trace off)"
        if config.trace:
            module = det.forward_module()
            traced, forward = trace_model(module, tuple(det.meta.extra["data_config"]["input_size"]), det.device)
            det.use_forward(traced if traced is not module else None)
    info.update(forward=forward, arrays_sha256=sha,
                gallery_source=config.gallery or ("stored index" if stored else "detector"),
                reference_source=(config.reference or config.gallery) or "detector",
                loaded_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                load_seconds=round(time.perf_counter() - started, 2))
    log.info("loaded %s (%s) version %s from %s: gallery %d (%s), reference %d, threshold %.4f, %.1fs", det.name,
             det.kind, info["version"], info["source"], len(det.gallery_ids), info["gallery_source"],
             len(det.reference_ids), threshold, info["load_seconds"])
    return ModelState(det, threshold, info)
