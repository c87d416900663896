"""Small 8-bit gray thumbnails of a detector's gallery, saved beside it, so that evidence can be shown to people.

A saved detector holds its gallery's features and ids, not its images; `thumbs.safetensors` in the detector folder
adds one small picture per gallery id (longest side `side` pixels, aspect kept), so a service can show the nearest
generated images of a decision without the benchmark folder. The file is optional: a detector without it loads and
scores as before, it just has no pictures to show.

    thumbs = make_thumbnails(images, ids)          # PIL images (any mode) -> uint8 thumbnails
    save_thumbnails(thumbs, "runs/fit/detector")   # thumbs.safetensors, written atomically
    thumbs = load_thumbnails("runs/fit/detector")  # None when the folder has no thumbnails
    thumbs.png("gen_0007")                         # PNG bytes of one thumbnail, or None for an unknown id

Stored as safetensors (no pickle): `pixels` (N, side, side) uint8, each thumbnail in the top-left corner padded
with zeros, `sizes` (N, 2) int32 height and width, and the ids as JSON in the file's metadata.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fingerprint.io import write_bytes_atomic

__all__ = ["THUMBS_FILE", "DEFAULT_SIDE", "Thumbnails", "make_thumbnails", "save_thumbnails", "load_thumbnails"]

THUMBS_FILE = "thumbs.safetensors"
DEFAULT_SIDE = 64


@dataclass
class Thumbnails:
    """Thumbnails by id."""

    ids: list[str]
    """The gallery ids, one per row."""
    pixels: np.ndarray
    """(N, side, side) uint8: each thumbnail in the top-left corner, zero-padded."""
    sizes: np.ndarray
    """(N, 2) int32: each thumbnail's height and width."""
    _rows: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.pixels = np.ascontiguousarray(self.pixels, dtype=np.uint8)
        self.sizes = np.ascontiguousarray(self.sizes, dtype=np.int32)
        n = len(self.ids)
        if self.pixels.ndim != 3 or len(self.pixels) != n or self.sizes.shape != (n, 2):
            raise ValueError(f"thumbnails: {n} ids, pixels {self.pixels.shape}, sizes {self.sizes.shape} disagree")
        self._rows = {i: r for r, i in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._rows

    @property
    def side(self) -> int:
        return int(self.pixels.shape[1]) if self.pixels.ndim == 3 and len(self.pixels) else 0

    def get(self, image_id: str) -> np.ndarray | None:
        """The (h, w) uint8 thumbnail of `image_id`, or None if it has none."""
        row = self._rows.get(image_id)
        if row is None:
            return None
        h, w = (int(v) for v in self.sizes[row])
        return self.pixels[row, :h, :w]

    def png(self, image_id: str) -> bytes | None:
        """The thumbnail of `image_id` as PNG bytes, or None if it has none."""
        pixels = self.get(image_id)
        if pixels is None:
            return None
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="PNG")
        return buf.getvalue()


def make_thumbnails(images: Sequence[Image.Image], ids: Sequence[str], side: int = DEFAULT_SIDE) -> Thumbnails:
    """Thumbnails (longest side `side`, aspect kept, never enlarged) of `images`, converted to 8-bit gray."""
    if len(images) != len(ids):
        raise ValueError(f"make_thumbnails: {len(images)} images for {len(ids)} ids")
    if side < 1:
        raise ValueError(f"make_thumbnails: side must be >= 1 (got {side})")
    pixels = np.zeros((len(images), side, side), dtype=np.uint8)
    sizes = np.zeros((len(images), 2), dtype=np.int32)
    for row, im in enumerate(images):
        small = (im if im.mode == "L" else im.convert("L")).copy()
        small.thumbnail((side, side), Image.Resampling.LANCZOS)
        arr = np.asarray(small, dtype=np.uint8)
        pixels[row, : arr.shape[0], : arr.shape[1]] = arr
        sizes[row] = arr.shape
    return Thumbnails(list(ids), pixels, sizes)


def save_thumbnails(thumbs: Thumbnails, folder: str | Path) -> Path:
    """Write `folder`/thumbs.safetensors atomically; returns its path."""
    from safetensors.numpy import save

    data = save({"pixels": thumbs.pixels, "sizes": thumbs.sizes}, metadata={"ids": json.dumps(thumbs.ids)})
    return write_bytes_atomic(Path(folder) / THUMBS_FILE, data)


def load_thumbnails(folder: str | Path) -> Thumbnails | None:
    """The thumbnails saved in a detector `folder`, or None when it has none (they are optional)."""
    from safetensors import safe_open

    path = Path(folder) / THUMBS_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as fh:
            ids = json.loads((fh.metadata() or {})["ids"])
            return Thumbnails(list(ids), fh.get_tensor("pixels"), fh.get_tensor("sizes"))
    except Exception as e:  # safetensors raises its own SafetensorError on a damaged file
        raise ValueError(f"{path}: damaged thumbnails file ({type(e).__name__}: {e}); delete it (the detector "
                         "works without) or save the detector again") from e
