"""fingerprint.knn.Gallery: blocked exact k-NN search against a brute-force numpy argsort."""

from __future__ import annotations

import numpy as np
import pytest

from fingerprint.knn import Gallery, topk_mean, unit_rows


def _brute(gallery: np.ndarray, queries: np.ndarray, metric: str, k: int,
           exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    g, q = gallery.astype(np.float64), queries.astype(np.float64)
    if metric == "cosine":
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        sim = q @ g.T
    else:
        sim = -((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    if exclude is not None:
        for i, row in enumerate(exclude):
            if row >= 0:
                sim[i, row] = -np.inf
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, idx, axis=1), idx


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize(("query_block", "gallery_block"), [(1024, 16384), (4, 7), (3, 1)])
def test_search_equals_brute_force(metric: str, query_block: int, gallery_block: int) -> None:
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(23, 6)).astype(np.float32)
    queries = rng.normal(size=(10, 6)).astype(np.float32)
    g = Gallery(gallery, metric, query_block=query_block, gallery_block=gallery_block)
    sims, idx = g.search(queries, 5)
    want_s, want_i = _brute(gallery, queries, metric, 5)
    assert sims.shape == idx.shape == (10, 5) and sims.dtype == np.float32 and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(sims, want_s, rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(sims, axis=1) <= 0)  # most similar first
    np.testing.assert_allclose(topk_mean(sims), want_s.mean(axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_exclude_skips_one_row_per_query(metric: str) -> None:
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(17, 4)).astype(np.float32)
    g = Gallery(vectors, metric, query_block=5, gallery_block=4)
    # The gallery searched against itself: without exclusion every vector finds itself first.
    _, idx = g.search(vectors, 1)
    np.testing.assert_array_equal(idx[:, 0], np.arange(17))
    exclude = np.arange(17)
    exclude[::3] = -1  # some queries are not in the gallery
    sims, idx = g.search(vectors, 4, exclude=exclude)
    want_s, want_i = _brute(vectors, vectors, metric, 4, exclude)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(sims, want_s, rtol=1e-5, atol=1e-5)
    hit = exclude >= 0
    assert not np.any(idx[hit] == exclude[hit, None])
    np.testing.assert_array_equal(idx[~hit, 0], np.flatnonzero(~hit))


def test_k_is_capped_at_the_gallery() -> None:
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(5, 3))
    g = Gallery(vectors, "l2", gallery_block=2)
    sims, idx = g.search(vectors[:2], 50)
    assert idx.shape == (2, 5) and sorted(idx[0].tolist()) == list(range(5))
    want_s, want_i = _brute(vectors, vectors[:2], "l2", 5)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(sims, want_s, rtol=1e-5, atol=1e-5)
    # With its own row excluded a query has one neighbour fewer.
    _, idx = g.search(vectors[:2], 50, exclude=np.array([0, 1]))
    assert idx.shape == (2, 4)
    with pytest.raises(ValueError, match="other than the query"):
        Gallery(vectors[:1], "cosine").search(vectors[:1], 1, exclude=np.array([0]))


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="metric"):
        Gallery(np.ones((2, 2)), "dot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        Gallery(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="dimension"):
        Gallery(np.ones((2, 3))).search(np.ones((1, 4)), 1)
    np.testing.assert_allclose(np.linalg.norm(unit_rows(np.array([[3.0, 4.0], [0.0, 0.0]])), axis=1), [1.0, 0.0])
