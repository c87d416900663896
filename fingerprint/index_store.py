"""A stored gallery index: embeddings of the generated images (and the real reference pool) computed once by a
fitted detector, kept beside it, and read back instead of embedding the images again.

    <detector>/index/
        manifest.json              which detector made it (sha256 of its arrays), model version, metric, shards
        gallery-00000.npy          (rows, D) float32 embeddings, in shard order
        gallery-00000.ids.json     their image ids
        reference-00000.npy ...    the real reference pool, for kinds that calibrate against it
        gallery.faiss              the approximate index, when one was built (--approximate ivf|hnsw)

Written by `fingerprint embed` (jobs/embed_ray.py, a Ray Data job); read by `fingerprint predict` and the
service with :func:`use_index`. Shards are plain ``.npy`` files, memory-mapped when read, so reading the index
costs what reading its vectors costs and never touches an image. An index is refused for a detector other than
the one that made it: embeddings of another network would be silently wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fingerprint.io import jsonable, write_text_atomic
from fingerprint.knn import SEARCHES, ApproximateSettings, Gallery, Search

__all__ = ["INDEX_DIR", "MANIFEST", "StoredIndexError", "IndexManifest", "ShardWriter", "StoredIndex",
           "detector_digest", "find_index", "read_index", "use_index", "use_stored_index", "write_manifest"]

INDEX_DIR = "index"
MANIFEST = "manifest.json"
FAISS_FILE = "gallery.faiss"
SCHEMA_VERSION = 1


class StoredIndexError(ValueError):
    """A stored index that cannot be used (missing files, another detector's, a kind without a gallery)."""


def detector_digest(path: str | Path) -> str:
    """sha256 of a detector folder's arrays.safetensors: what it learnt, so two versions are told apart."""
    h = hashlib.sha256()
    with open(Path(path) / "arrays.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Shard:
    vectors: str
    """File name of the (rows, D) float32 .npy array."""
    ids: str
    """File name of the JSON list of the rows' image ids."""
    rows: int


@dataclass
class IndexManifest:
    """manifest.json of a stored index."""

    detector_sha256: str
    """sha256 of the arrays.safetensors of the detector whose ``features`` made the embeddings."""
    kind: str
    metric: str
    """'cosine' or 'l2': how the detector compares embeddings."""
    dim: int
    gallery: list[Shard] = field(default_factory=list)
    reference: list[Shard] = field(default_factory=list)
    """Empty when the kind does not compare with the real pool (only its ids are kept then)."""
    reference_ids: list[str] = field(default_factory=list)
    search: str = "exact"
    """'exact', or the approximate faiss index in gallery.faiss: 'ivf' or 'hnsw'."""
    approximate: dict[str, Any] = field(default_factory=dict)
    """The ApproximateSettings it was built with."""
    registered_model: str | None = None
    model_version: str | None = None
    """The registry version the detector was, where one was given."""
    detector_name: str = ""
    source: str = ""
    """The data folder the images came from."""
    created_at: str = ""
    seconds: float = 0.0
    """Wall time of the embedding job."""
    schema_version: int = SCHEMA_VERSION

    @property
    def gallery_size(self) -> int:
        return sum(s.rows for s in self.gallery)


class ShardWriter:
    """Writes embeddings with their ids in shards of ``shard_rows`` as they arrive (bounded memory)."""

    def __init__(self, folder: str | Path, prefix: str, shard_rows: int = 65536) -> None:
        self.folder, self.prefix, self.shard_rows = Path(folder), prefix, int(shard_rows)
        self.shards: list[Shard] = []
        self._ids: list[str] = []
        self._vectors: list[np.ndarray] = []
        self._pending = 0
        self.dim: int | None = None

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(ids), -1)
        if self.dim is None:
            self.dim = vectors.shape[1]
        elif vectors.shape[1] != self.dim:
            raise ValueError(f"{self.prefix}: embeddings of dimension {vectors.shape[1]} after {self.dim}")
        self._ids += [str(i) for i in ids]
        self._vectors.append(vectors)
        self._pending += len(ids)
        while self._pending >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        if rows == 0:
            return
        block = np.concatenate(self._vectors) if len(self._vectors) > 1 else self._vectors[0]
        name = f"{self.prefix}-{len(self.shards):05d}"
        np.save(self.folder / f"{name}.npy", np.ascontiguousarray(block[:rows]))
        (self.folder / f"{name}.ids.json").write_text(json.dumps(self._ids[:rows]))
        self.shards.append(Shard(f"{name}.npy", f"{name}.ids.json", rows))
        self._ids = self._ids[rows:]
        self._vectors = [block[rows:]] if rows < len(block) else []
        self._pending -= rows

    def close(self) -> list[Shard]:
        self._flush(self._pending)
        return self.shards


def write_manifest(folder: str | Path, manifest: IndexManifest) -> Path:
    manifest.created_at = manifest.created_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return write_text_atomic(Path(folder) / MANIFEST,
                             json.dumps(dataclasses.asdict(manifest), indent=2, default=jsonable))


@dataclass
class StoredIndex:
    """A stored index read back: manifest, vectors (memory-mapped shards joined) and ids."""

    folder: Path
    manifest: IndexManifest
    gallery: np.ndarray
    gallery_ids: list[str]
    reference: np.ndarray | None
    reference_ids: list[str]

    def faiss_index(self) -> Any:
        if self.manifest.search == "exact":
            return None
        return Gallery.read_index(self.folder / FAISS_FILE)

    def build_gallery(self, metric: str) -> Gallery:
        """The gallery for search, with the stored approximate index where there is one (never rebuilt)."""
        search: Search = self.manifest.search  # type: ignore[assignment]
        return Gallery(self.gallery, metric, search=search,  # type: ignore[arg-type]
                       approximate=ApproximateSettings(**self.manifest.approximate), faiss_index=self.faiss_index())


def _read_shards(folder: Path, shards: list[Shard], dim: int) -> tuple[np.ndarray, list[str]]:
    ids: list[str] = []
    parts = []
    for s in shards:
        for name in (s.vectors, s.ids):
            if not (folder / name).is_file():
                raise StoredIndexError(f"{folder}: shard {name} named in {MANIFEST} is missing; "
                                       "rerun `fingerprint embed`")
        v = np.load(folder / s.vectors, mmap_mode="r")
        shard_ids = json.loads((folder / s.ids).read_text())
        if v.shape != (s.rows, dim) or len(shard_ids) != s.rows:
            raise StoredIndexError(f"{folder}/{s.vectors}: holds {v.shape} vectors and {len(shard_ids)} ids, "
                              f"{MANIFEST} says ({s.rows}, {dim}); rerun `fingerprint embed`")
        parts.append(v)
        ids += shard_ids
    if not parts:
        return np.zeros((0, dim), dtype=np.float32), ids
    # Copied into memory: the folder may be a temporary download that is removed after loading.
    return (np.array(parts[0]) if len(parts) == 1 else np.concatenate(parts)), ids


def read_index(folder: str | Path) -> StoredIndex:
    """Read a stored index folder (see the module docstring); raises StoredIndexError naming what is wrong."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise StoredIndexError(f"{folder}: no stored index here (no {MANIFEST}); write one with `fingerprint embed`")
    raw = json.loads(path.read_text())
    if int(raw.get("schema_version", 0)) > SCHEMA_VERSION:
        raise StoredIndexError(f"{path}: written by a newer fingerprint (schema {raw['schema_version']}); upgrade")
    raw["gallery"] = [Shard(**s) for s in raw.get("gallery", [])]
    raw["reference"] = [Shard(**s) for s in raw.get("reference", [])]
    known = {f.name for f in dataclasses.fields(IndexManifest)}
    manifest = IndexManifest(**{k: v for k, v in raw.items() if k in known})
    if manifest.search not in SEARCHES:
        raise StoredIndexError(f"{path}: unknown search {manifest.search!r}")
    if manifest.search != "exact" and not (folder / FAISS_FILE).is_file():
        raise StoredIndexError(f"{folder}: {MANIFEST} names a {manifest.search} index but {FAISS_FILE} is missing")
    gallery, gallery_ids = _read_shards(folder, manifest.gallery, manifest.dim)
    if len(gallery_ids) == 0:
        raise StoredIndexError(f"{folder}: the stored gallery is empty")
    reference, reference_ids = None, list(manifest.reference_ids)
    if manifest.reference:
        reference, reference_ids = _read_shards(folder, manifest.reference, manifest.dim)
    return StoredIndex(folder, manifest, gallery, gallery_ids, reference, reference_ids)


def find_index(detector_dir: str | Path, index: str | Path | None = None) -> Path | None:
    """The index folder to use: ``index`` when given (it must exist), else ``<detector>/index`` if present."""
    if index:
        if not (Path(index) / MANIFEST).is_file():
            raise StoredIndexError(f"--index: {index} holds no {MANIFEST}; give the folder `fingerprint embed` wrote")
        return Path(index)
    candidate = Path(detector_dir) / INDEX_DIR
    return candidate if (candidate / MANIFEST).is_file() else None


def use_index(det: Any, detector_dir: str | Path, index: str | Path) -> StoredIndex:
    """Make ``det`` (loaded from ``detector_dir``) search the stored index instead of its own gallery.

    The gallery (and the reference pool of kinds that calibrate against it) comes from the stored embeddings;
    what the detector learnt is kept. Refused when the index was made by another detector.
    """
    from fingerprint.detectors.neighbours import FeatureNN

    stored = read_index(index)
    m = stored.manifest
    if not isinstance(det, FeatureNN):
        raise StoredIndexError(f"{index}: a stored index serves nearest-neighbour kinds; {det.kind} has no gallery")
    digest = detector_digest(detector_dir)
    if m.detector_sha256 != digest:
        raise StoredIndexError(f"{index}: made by detector {m.detector_sha256[:12]} but {detector_dir} is "
                          f"{digest[:12]}; rerun `fingerprint embed --model {detector_dir}`")
    if m.metric != det.metric:
        raise StoredIndexError(f"{index}: metric {m.metric} but the detector compares with {det.metric}")
    det.gallery = stored.build_gallery(det.metric)
    # Cosine search holds the gallery as unit rows, which score exactly as the stored vectors do: the detector keeps
    # those rows rather than a second copy of the gallery (512 MB more at 1M x 128).
    det._gallery_features = det.gallery.vectors.numpy() if det.metric == "cosine" else stored.gallery
    det.gallery_ids = list(stored.gallery_ids)
    calibrates = hasattr(det, "_set_reference_features") and getattr(det.settings, "calibrate", False)
    if stored.reference is not None and calibrates:
        det._set_reference_features(stored.reference)
        det._set_reference(stored.reference_ids, None)
    elif stored.reference_ids and not calibrates:
        det._set_reference(stored.reference_ids, None)
    return stored


def use_stored_index(det: Any, detector_dir: str | Path, index: str | Path | None = None) -> StoredIndex | None:
    """Use ``index`` (or ``<detector>/index`` when present) for ``det``'s gallery; None when there is none."""
    import logging

    found = find_index(detector_dir, index)
    if found is None:
        return None
    stored = use_index(det, detector_dir, found)
    logging.getLogger(__name__).info(
        "using the stored index %s: %d generated (%s search), made by detector %s%s", found,
        len(stored.gallery_ids), stored.manifest.search, stored.manifest.detector_sha256[:12],
        f", version {stored.manifest.model_version}" if stored.manifest.model_version else "")
    return stored
