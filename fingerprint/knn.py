"""Exact k-nearest-neighbour search: the one place where queries meet a gallery.

A :class:`Gallery` holds its vectors prepared once (unit rows for cosine, squared norms for L2) and answers
``search(queries, k)`` block by block with ``torch.topk``: memory stays at one (query block x gallery block)
matrix whatever the gallery size, and nothing is re-normalised per call. Written by hand because faiss's exact
index would add a dependency for what two matrix products and a top-k do here; an approximate index can take
this module's place behind the same ``search``.

Similarities are "higher = closer" for every metric: cosine similarity, or the negative squared L2 distance.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Metric = Literal["cosine", "l2"]

__all__ = ["Gallery", "Metric", "unit_rows", "topk_mean"]


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def topk_mean(similarities: np.ndarray) -> np.ndarray:
    """Mean over the k columns of a (N, k) similarity matrix, in float64."""
    return np.asarray(similarities, dtype=np.float64).mean(axis=1)


class Gallery:
    """Vectors searched by nearest neighbour; prepared once at construction.

    ``exclude`` in :meth:`search` gives, per query, one gallery row it must not match (its own row when a set is
    searched against itself), or -1.
    """

    def __init__(self, vectors: np.ndarray, metric: Metric = "cosine", *, query_block: int = 1024,
                 gallery_block: int = 16384, dtype: torch.dtype = torch.float32) -> None:
        if metric not in ("cosine", "l2"):
            raise ValueError(f"unknown metric {metric!r}; use cosine or l2")
        v = np.asarray(vectors)
        if v.ndim != 2 or len(v) == 0:
            raise ValueError(f"a gallery needs a non-empty (N, D) array, got shape {v.shape}")
        self.metric: Metric = metric
        self.dtype = dtype
        prepared = unit_rows(v) if metric == "cosine" else np.asarray(v, dtype=np.float32)
        self.vectors = torch.from_numpy(np.ascontiguousarray(prepared)).to(dtype)
        self.sq_norms = (self.vectors.double() ** 2).sum(1).to(dtype) if metric == "l2" else None
        self.query_block, self.gallery_block = query_block, gallery_block

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def _prepare(self, queries: np.ndarray) -> torch.Tensor:
        q = np.asarray(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries of shape {q.shape} do not match the gallery's dimension {self.dim}")
        q = unit_rows(q) if self.metric == "cosine" else np.asarray(q, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(q)).to(self.dtype)

    @torch.no_grad()
    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, indices), each (N, k), most similar first. ``k`` is capped at what the gallery holds."""
        q = self._prepare(queries)
        n = q.shape[0]
        k = min(int(k), len(self) - (1 if exclude is not None and np.any(np.asarray(exclude) >= 0) else 0))
        if k < 1:
            raise ValueError("the gallery must hold at least one vector other than the query itself")
        ex = None if exclude is None else torch.as_tensor(np.asarray(exclude, dtype=np.int64))
        sims_out = np.empty((n, k), dtype=np.float32)
        idx_out = np.empty((n, k), dtype=np.int64)
        for q0 in range(0, n, self.query_block):
            qb = q[q0 : q0 + self.query_block]
            q_sq = (qb.double() ** 2).sum(1).to(self.dtype) if self.metric == "l2" else None
            best_s = torch.full((qb.shape[0], 0), -torch.inf, dtype=self.dtype)
            best_i = torch.zeros((qb.shape[0], 0), dtype=torch.int64)
            for g0 in range(0, len(self), self.gallery_block):
                gb = self.vectors[g0 : g0 + self.gallery_block]
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
