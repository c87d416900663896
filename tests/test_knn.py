"""fingerprint.knn.Gallery: blocked exact k-NN search against a brute-force numpy argsort."""

from __future__ import annotations

import numpy as np
import pytest

from fingerprint.features.handcrafted import ssim_matrix
from fingerprint.knn import ApproximateSettings, Gallery, SSIMGallery, topk_mean, unit_rows


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


# ------------------------------------------------------------------------------ bounded blocks, approximate


def test_exact_search_works_in_bounded_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every similarity matrix the exact search builds is at most (query block x gallery block)."""
    import torch

    rng = np.random.default_rng(3)
    gallery = rng.normal(size=(1000, 8)).astype(np.float32)
    queries = rng.normal(size=(37, 8)).astype(np.float32)
    g = Gallery(gallery, "cosine", query_block=16, gallery_block=100)
    shapes: list[tuple[int, ...]] = []
    real_topk = torch.topk

    def recording_topk(x, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        shapes.append(tuple(x.shape))
        return real_topk(x, *args, **kwargs)

    monkeypatch.setattr(torch, "topk", recording_topk)
    sims, idx = g.search(queries, 5)
    assert shapes and all(s[0] <= 16 and s[1] <= 100 for s in shapes)
    # Every gallery block of every query block was visited.
    assert sum(1 for s in shapes if s[1] > 10) == 3 * 10
    want_s, want_i = _brute(gallery, queries, "cosine", 5)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(sims, want_s, rtol=1e-5, atol=1e-5)


def test_default_blocks_fit_the_element_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a fixed gallery block, few queries scan in larger blocks, never above the element budget."""
    import torch

    rng = np.random.default_rng(5)
    gallery = rng.normal(size=(5000, 4)).astype(np.float32)
    g = Gallery(gallery, "l2", query_block=8, block_elements=8 * 1024)
    shapes: list[tuple[int, ...]] = []
    real_topk = torch.topk
    monkeypatch.setattr(torch, "topk", lambda x, *a, **kw: (shapes.append(tuple(x.shape)), real_topk(x, *a, **kw))[1])
    widest = {}
    for n in (1, 8, 20):
        shapes.clear()
        sims, idx = g.search(gallery[:n] + 0.01, 3)
        assert all(s[0] * s[1] <= 8 * 1024 for s in shapes if s[1] > 3)
        widest[n] = max(s[1] for s in shapes)
        want_s, want_i = _brute(gallery, gallery[:n] + 0.01, "l2", 3)
        np.testing.assert_array_equal(idx, want_i)
    # One query: the whole gallery in one block; 8 queries per block: 1024 gallery rows at a time.
    assert widest[1] == 5000 and widest[8] == 1024


def test_gallery_is_prepared_once() -> None:
    """Searching does not touch the prepared vectors: cosine rows are unit length from construction on."""
    rng = np.random.default_rng(4)
    g = Gallery(rng.normal(size=(50, 6)) * 7, "cosine")
    before = g.vectors.clone()
    np.testing.assert_allclose(g.vectors.norm(dim=1).numpy(), 1.0, rtol=1e-6)
    g.search(rng.normal(size=(3, 6)), 4)
    assert bool((g.vectors == before).all())


def _clustered(n: int, d: int, seed: int, centres: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d))
    return (c[rng.integers(0, centres, n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("search", ["ivf", "hnsw"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_approximate_recall_against_exact(search: str, metric: str) -> None:
    gallery = _clustered(4000, 16, 5)
    queries = _clustered(200, 16, 6)
    exact = Gallery(gallery, metric)
    approx = Gallery(gallery, metric, search=search)  # type: ignore[arg-type]
    e_s, e_i = exact.search(queries, 5)
    a_s, a_i = approx.search(queries, 5)
    recall = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(a_i, e_i, strict=True)])
    assert recall >= 0.95, recall
    assert a_i.shape == (200, 5) and a_i.dtype == np.int64 and a_s.dtype == np.float32
    assert np.all(a_i >= 0) and np.all(np.diff(a_s, axis=1) <= 1e-6)
    # The similarities are true similarities of the rows returned (not approximations of them).
    want = _brute(gallery, queries, metric, 4000)
    true = np.take_along_axis(want[0], np.argsort(want[1], axis=1), axis=1)
    np.testing.assert_allclose(a_s, np.take_along_axis(true, a_i, axis=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("search", ["ivf", "hnsw"])
def test_approximate_exclude_and_short_answers(search: str) -> None:
    vectors = _clustered(300, 8, 7)
    g = Gallery(vectors, "cosine", search=search,  # type: ignore[arg-type]
                approximate=ApproximateSettings(nlist=30, nprobe=1, ef_search=8))
    exclude = np.arange(300)
    sims, idx = g.search(vectors, 3, exclude=exclude)
    assert idx.shape == (300, 3) and np.all(idx >= 0)
    assert not np.any(idx == exclude[:, None])
    # k larger than one probed cell holds: short answers fall back to the exact search, never -1.
    sims, idx = g.search(vectors[:5], 120)
    assert idx.shape == (5, 120) and np.all(idx >= 0)
    want_s, want_i = _brute(vectors, vectors[:5], "cosine", 120)
    np.testing.assert_allclose(np.sort(sims, axis=1), np.sort(want_s, axis=1), rtol=1e-4, atol=1e-4)


def test_approximate_index_round_trip(tmp_path) -> None:  # noqa: ANN001
    vectors = _clustered(500, 8, 8)
    g = Gallery(vectors, "l2", search="ivf")
    path = g.write_index(tmp_path / "gallery.faiss")
    again = Gallery(vectors, "l2", search="ivf", faiss_index=Gallery.read_index(path))
    q = _clustered(20, 8, 9)
    for a, b in zip(g.search(q, 4), again.search(q, 4), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="rebuild"):
        Gallery(vectors[:400], "l2", search="ivf", faiss_index=Gallery.read_index(path))
    with pytest.raises(ValueError, match="no faiss index"):
        Gallery(vectors, "l2").write_index(tmp_path / "x.faiss")
    with pytest.raises(ValueError, match="search"):
        Gallery(vectors, "l2", search="lsh")  # type: ignore[arg-type]


@pytest.mark.parametrize("block_elements", [1 << 22, 40])
def test_ssim_search_equals_the_full_ssim_matrix(block_elements: int) -> None:
    """Blocks of queries (40 pair values = 2 queries against 20 images) give what the whole matrix gives."""
    rng = np.random.default_rng(3)
    gallery, queries = rng.random((20, 16, 16)), rng.random((7, 16, 16))
    g = SSIMGallery(gallery, block_elements=block_elements)
    full = ssim_matrix(queries, gallery)
    sims, idx = g.search(queries, 3)
    np.testing.assert_array_equal(idx, np.argsort(-full, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(sims, np.sort(full, axis=1)[:, ::-1][:, :3], rtol=1e-6)
    # A set searched against itself: each image's own row is skipped, not matched with SSIM 1.
    sims, idx = g.search(gallery[:5], 2, exclude=np.array([0, 1, 2, 3, -1]))
    assert all(i not in row for i, row in zip(range(4), idx[:4], strict=True)) and idx[4, 0] == 4
    with pytest.raises(ValueError, match="do not match"):
        g.search(rng.random((2, 8, 8)), 1)
    with pytest.raises(ValueError, match="non-empty"):
        SSIMGallery(np.zeros((0, 16, 16)))
