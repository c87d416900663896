"""k-nearest-neighbour search: the one place where queries meet a gallery.

A :class:`Gallery` holds its vectors prepared once (unit rows for cosine, squared norms for L2) and answers
``search(queries, k)``. The exact search (the default) runs block by block with ``torch.topk`` and merges each
block's top-k into the running top-k: memory stays at one (query block x gallery block) matrix whatever the
gallery size, and nothing is re-normalised per call. Written by hand because faiss's exact index is no faster
here than two matrix products and a top-k.

``search="ivf"`` or ``"hnsw"`` answers from an approximate faiss index (IVF-Flat or HNSW-Flat) built once over
the same prepared vectors; it trades a little recall for time on large galleries. A query whose approximate
answer comes back short (fewer than k hits in the probed cells) is answered exactly instead, so every result
row holds k real gallery rows.

Similarities are "higher = closer" for every metric: cosine similarity, or the negative squared L2 distance.
:class:`SSIMGallery` answers the same ``search`` for SSIM, which compares image pairs and has no embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

Metric = Literal["cosine", "l2"]
Search = Literal["exact", "ivf", "hnsw"]
SEARCHES: tuple[str, ...] = ("exact", "ivf", "hnsw")

__all__ = ["ApproximateSettings", "Gallery", "Metric", "SEARCHES", "SSIMGallery", "Search", "unit_rows", "topk_mean",
           "make_gallery"]


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def topk_mean(similarities: np.ndarray) -> np.ndarray:
    """Mean over the k columns of a (N, k) similarity matrix, in float64."""
    return np.asarray(similarities, dtype=np.float64).mean(axis=1)


@dataclass
class ApproximateSettings:
    """How an approximate (faiss) index is built and searched."""

    nlist: int = 0
    """IVF: number of cells the gallery is clustered into; 0 picks about 2 x sqrt(gallery size)."""
    nprobe: int = 32
    """IVF: cells visited per query (more = higher recall, slower)."""
    hnsw_m: int = 32
    """HNSW: graph neighbours per vector (more = higher recall, more memory, slower build)."""
    ef_construction: int = 64
    """HNSW: candidate list size while building."""
    ef_search: int = 128
    """HNSW: candidate list size while searching (at least k is used)."""
    train_size: int = 100_000
    """IVF: gallery vectors (a seeded sample) the cells are trained on."""
    niter: int = 10
    """IVF: k-means iterations when training the cells."""
    seed: int = 0
    """Seed of the IVF training sample and of faiss's k-means."""

    def cells(self, n: int) -> int:
        if self.nlist > 0:
            return int(self.nlist)
        # faiss wants about 39 training vectors per cell.
        return max(1, min(min(n, self.train_size) // 39, int(2 * math.sqrt(n))))


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("approximate search needs faiss: pip install faiss-cpu") from e
    return faiss


class Gallery:
    """Vectors searched by nearest neighbour; prepared once at construction.

    ``exclude`` in :meth:`search` gives, per query, one gallery row it must not match (its own row when a set is
    searched against itself), or -1. ``search`` picks exact (default) or an approximate faiss index ("ivf",
    "hnsw"); ``faiss_index`` passes one already built (read from a stored index) instead of building it.

    The exact search holds one (query block x gallery block) similarity matrix at a time: ``gallery_block`` rows
    of the gallery, or, when None, as many as keep the matrix within ``block_elements`` values (64 MB in
    float32), so a small batch of queries scans the gallery in few large blocks, which is several times faster
    than many small ones, in the same memory.
    """

    def __init__(self, vectors: np.ndarray, metric: Metric = "cosine", *, query_block: int = 1024,
                 gallery_block: int | None = None, block_elements: int = 1 << 24,
                 dtype: torch.dtype = torch.float32, search: Search = "exact",
                 approximate: ApproximateSettings | None = None, faiss_index: Any = None) -> None:
        if metric not in ("cosine", "l2"):
            raise ValueError(f"unknown metric {metric!r}; use cosine or l2")
        if search not in SEARCHES:
            raise ValueError(f"unknown search {search!r}; use one of {', '.join(SEARCHES)}")
        v = np.asarray(vectors)
        if v.ndim != 2 or len(v) == 0:
            raise ValueError(f"a gallery needs a non-empty (N, D) array, got shape {v.shape}")
        self.metric: Metric = metric
        self.dtype = dtype
        prepared = unit_rows(v) if metric == "cosine" else np.asarray(v, dtype=np.float32)
        self.vectors = torch.from_numpy(np.ascontiguousarray(prepared)).to(dtype)
        self.sq_norms = (self.vectors.double() ** 2).sum(1).to(dtype) if metric == "l2" else None
        self.query_block, self.gallery_block, self.block_elements = query_block, gallery_block, block_elements
        self.search_kind: Search = search
        self.approximate = approximate or ApproximateSettings()
        self.index: Any = None
        if search != "exact":
            self.index = faiss_index if faiss_index is not None else self._build(prepared)
            if self.index.ntotal != len(self) or self.index.d != self.dim:
                raise ValueError(f"the faiss index holds {self.index.ntotal} vectors of dimension {self.index.d}, "
                                 f"the gallery {len(self)} of dimension {self.dim}; rebuild the index")
            self._tune()

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    # -- approximate index

    def _build(self, prepared: np.ndarray) -> Any:
        faiss = _faiss()
        s, n, d = self.approximate, len(prepared), prepared.shape[1]
        fmetric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        x = np.ascontiguousarray(prepared, dtype=np.float32)
        if self.search_kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, s.hnsw_m, fmetric)
            index.hnsw.efConstruction = s.ef_construction
            index.add(x)
            return index
        quantizer = faiss.IndexFlatIP(d) if self.metric == "cosine" else faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, s.cells(n), fmetric)
        index.cp.seed = s.seed
        index.cp.niter = s.niter
        index.cp.min_points_per_centroid = 1  # small galleries: do not warn, train on what there is
        sample = x if n <= s.train_size else x[np.sort(np.random.default_rng(s.seed).choice(n, s.train_size,
                                                                                             replace=False))]
        index.train(sample)
        index.add(x)
        return index

    def _tune(self) -> None:
        s = self.approximate
        if hasattr(self.index, "nprobe"):
            self.index.nprobe = min(s.nprobe, self.index.nlist)
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = s.ef_search

    def write_index(self, path: str | Path) -> Path:
        """Write the approximate index (faiss format) to ``path``; only for ``search`` other than exact."""
        if self.index is None:
            raise ValueError("an exact gallery has no faiss index to write")
        path = Path(path)
        _faiss().write_index(self.index, str(path))
        return path

    @staticmethod
    def read_index(path: str | Path) -> Any:
        """A faiss index written by :meth:`write_index`, to pass as ``faiss_index``."""
        return _faiss().read_index(str(path))

    # -- search

    def _prepare(self, queries: np.ndarray) -> torch.Tensor:
        q = np.asarray(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries of shape {q.shape} do not match the gallery's dimension {self.dim}")
        q = unit_rows(q) if self.metric == "cosine" else np.asarray(q, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(q)).to(self.dtype)

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, indices), each (N, k), most similar first. ``k`` is capped at what the gallery holds."""
        q = self._prepare(queries)
        k = min(int(k), len(self) - (1 if exclude is not None and np.any(np.asarray(exclude) >= 0) else 0))
        if k < 1:
            raise ValueError("the gallery must hold at least one vector other than the query itself")
        ex = None if exclude is None else np.asarray(exclude, dtype=np.int64)
        if self.index is None:
            return self._exact(q, k, ex)
        return self._approximate(q, k, ex)

    def _approximate(self, q: torch.Tensor, k: int, ex: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = max(self.approximate.ef_search, k + 1)
        qn = np.ascontiguousarray(q.float().numpy())
        extra = 0 if ex is None else 1
        dist, idx = self.index.search(qn, k + extra)
        sims = dist.astype(np.float32) if self.metric == "cosine" else -dist.astype(np.float32)
        if ex is not None:
            # Drop the excluded row where it came back, else the last (k+1-th) hit.
            drop = idx == ex[:, None]
            drop[~drop.any(axis=1), -1] = True
            keep = ~drop
            sims = sims[keep].reshape(len(qn), k)
            idx = idx[keep].reshape(len(qn), k)
        short = np.flatnonzero((idx < 0).any(axis=1))
        if short.size:  # too few vectors in the probed cells: answer those queries exactly
            s_sims, s_idx = self._exact(q[torch.from_numpy(short)], k, None if ex is None else ex[short])
            sims[short], idx[short] = s_sims, s_idx
        return np.ascontiguousarray(sims), np.ascontiguousarray(idx.astype(np.int64))

    @torch.no_grad()
    def _exact(self, q: torch.Tensor, k: int, exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        n = q.shape[0]
        ex = None if exclude is None else torch.as_tensor(exclude)
        sims_out = np.empty((n, k), dtype=np.float32)
        idx_out = np.empty((n, k), dtype=np.int64)
        for q0 in range(0, n, self.query_block):
            qb = q[q0 : q0 + self.query_block]
            q_sq = (qb.double() ** 2).sum(1).to(self.dtype) if self.metric == "l2" else None
            best_s = torch.full((qb.shape[0], 0), -torch.inf, dtype=self.dtype)
            best_i = torch.zeros((qb.shape[0], 0), dtype=torch.int64)
            step = self.gallery_block or max(1024, self.block_elements // qb.shape[0])
            for g0 in range(0, len(self), step):
                gb = self.vectors[g0 : g0 + step]
                s = qb @ gb.T
                if self.metric == "l2":
                    # -(|q|^2 + |g|^2 - 2 q.g), clamped: rounding must not make a distance negative.
                    s = -(q_sq[:, None] + self.sq_norms[g0 : g0 + len(gb)][None] - 2 * s).clamp_min_(0)
                if ex is not None:
                    rows = ex[q0 : q0 + qb.shape[0]]
                    hit = (rows >= g0) & (rows < g0 + len(gb))
                    s[hit.nonzero().squeeze(1), (rows[hit] - g0)] = -torch.inf
                kb = min(k, s.shape[1])
                top_s, top_i = torch.topk(s, kb, dim=1)
                merged_s = torch.cat([best_s, top_s], dim=1)
                merged_i = torch.cat([best_i, top_i + g0], dim=1)
                keep = torch.topk(merged_s, min(k, merged_s.shape[1]), dim=1)
                best_s, best_i = keep.values, torch.gather(merged_i, 1, keep.indices)
            sims_out[q0 : q0 + qb.shape[0]] = best_s.float().numpy()
            idx_out[q0 : q0 + qb.shape[0]] = best_i.numpy()
        return sims_out, idx_out


class SSIMGallery:
    """Images searched by structural similarity (mean SSIM); the same ``search`` as :class:`Gallery`.

    SSIM is a function of an image pair, not of two vectors, so there is no index: each query block's SSIM with
    the whole gallery is computed (``fingerprint.features.handcrafted.ssim_matrix``) and its top-k kept. Query
    blocks hold at most ``block_elements`` pair values, so memory is bounded by the block, not the query count.
    """

    metric = "ssim"

    def __init__(self, pixels: np.ndarray, *, block_elements: int = 1 << 22) -> None:
        p = np.asarray(pixels, dtype=np.float32)
        if p.ndim != 3 or len(p) == 0:
            raise ValueError(f"an SSIM gallery needs a non-empty (N, H, W) array of images, got shape {p.shape}")
        self.pixels = p
        self.block_elements = block_elements

    def __len__(self) -> int:
        return len(self.pixels)

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, indices), each (N, k), most similar first; ``exclude``: a gallery row per query to skip,
        or -1."""
        from fingerprint.features.handcrafted import ssim_matrix

        q = np.asarray(queries, dtype=np.float32)
        if q.ndim != 3 or q.shape[1:] != self.pixels.shape[1:]:
            raise ValueError(f"queries of shape {q.shape} do not match the gallery's images {self.pixels.shape[1:]}")
        k = min(int(k), len(self) - (1 if exclude is not None and np.any(np.asarray(exclude) >= 0) else 0))
        if k < 1:
            raise ValueError("the gallery must hold at least one image other than the query itself")
        step = max(1, self.block_elements // len(self))
        sims_out = np.empty((len(q), k), dtype=np.float32)
        idx_out = np.empty((len(q), k), dtype=np.int64)
        for q0 in range(0, len(q), step):
            sim = ssim_matrix(q[q0:q0 + step], self.pixels)
            if exclude is not None:
                rows = np.asarray(exclude[q0:q0 + step], dtype=np.int64)
                hit = np.flatnonzero(rows >= 0)
                sim[hit, rows[hit]] = -np.inf
            idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
            sims_out[q0:q0 + len(sim)] = np.take_along_axis(sim, idx, axis=1)
            idx_out[q0:q0 + len(sim)] = idx
        return sims_out, idx_out


def make_gallery(vectors: np.ndarray, metric: str) -> Gallery | SSIMGallery:
    """The search for ``metric``: :class:`SSIMGallery` over pixels for 'ssim', else :class:`Gallery`."""
    return SSIMGallery(vectors) if metric == "ssim" else Gallery(vectors, metric)  # type: ignore[arg-type]
