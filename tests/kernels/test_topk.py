"""topk_search against brute force (a stable full sort)."""

from __future__ import annotations

import numpy as np
import pytest

from clipengine.kernels.similarity import cuda_available
from clipengine.kernels.topk import exact_topk_screened, row_norm_bound, topk_search


def brute_force(embeddings, queries, k):
    scores = queries @ embeddings.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def normalized(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("chunk_rows", [1, 13, 256, 10_000])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_matches_brute_force(k, chunk_rows):
    rng = np.random.default_rng(k * 1000 + chunk_rows)
    emb, queries = normalized(rng, (1500, 16)), normalized(rng, (4, 16))
    index, score = topk_search(emb, queries, k, chunk_rows=chunk_rows)
    want_index, want_score = brute_force(emb, queries, k)
    assert index.dtype == np.int64 and score.dtype == np.float32 and index.shape == (4, k)
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_allclose(score, want_score, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [3, 7, 1000])
def test_ties_resolve_to_the_lower_index(chunk_rows):
    rng = np.random.default_rng(2)
    base = normalized(rng, (4, 8))
    emb = base[rng.integers(0, 4, size=200)]  # only four distinct rows: ties everywhere
    queries = normalized(rng, (3, 8))
    index, score = topk_search(emb, queries, 17, chunk_rows=chunk_rows)
    want_index, want_score = brute_force(emb, queries, 17)
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_allclose(score, want_score, rtol=1e-6)


def test_k_larger_than_n_and_memmap(tmp_path):
    rng = np.random.default_rng(3)
    emb = normalized(rng, (9, 5))
    np.save(tmp_path / "e.npy", emb)
    mapped = np.load(tmp_path / "e.npy", mmap_mode="r")
    index, score = topk_search(mapped, emb[:2], 50, chunk_rows=4)
    assert index.shape == (2, 9)
    assert index[0, 0] == 0 and index[1, 0] == 1
    np.testing.assert_array_equal(index, brute_force(emb, emb[:2], 9)[0])


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        topk_search(np.zeros((3, 4), np.float32), np.zeros((1, 5), np.float32), 1)
    with pytest.raises(ValueError):
        topk_search(np.zeros((3, 4), np.float32), np.zeros((1, 4), np.float32), 0)


def exact_brute_force(embeddings, queries, k):
    """float32 of the float64 dot, then (score descending, row ascending): what the GPU path returns."""
    scores = (queries.astype(np.float64) @ embeddings.astype(np.float64).T).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def screened_on_numpy(embeddings, queries, k, chunk_rows):
    """The GPU path's selection (exact_topk_screened) run with NumPy blocks instead of CuPy ones."""
    n = len(embeddings)
    chunks = ((start, embeddings[start:start + chunk_rows], row_norm_bound(embeddings[start:start + chunk_rows]))
              for start in range(0, n, chunk_rows))

    def exact(keep, query64):
        return (embeddings[keep].astype(np.float64) @ query64).astype(np.float32)

    return exact_topk_screened(chunks, n, queries, k, exact, xp=np)


def near_ties(rng, n=3000, dim=48):
    """Copies of a few rows nudged by an ulp here and there (exact scores a hair apart, float32 GEMM scores
    misordering them, many equal float32 scores: ties by index), exact duplicates, and rows scaled up;
    queries close to the base rows, so the best scores are near-ties."""
    base = normalized(rng, (20, dim))
    rows = base[rng.integers(0, 20, n)].copy()
    nudge = rng.random(rows.shape) < 0.3
    rows[nudge] = np.nextafter(rows[nudge], np.where(rng.random(int(nudge.sum())) < 0.5, -1, 1).astype(np.float32))
    rows[rng.random(n) < 0.1] = base[0]  # exact duplicates
    rows[rng.random(n) < 0.05] *= np.float32(4.0)
    queries = np.concatenate([base[:3], base[3:5] + np.float32(1e-3) * normalized(rng, (2, dim))])
    return rows.astype(np.float32), queries.astype(np.float32)


def cancelling(rng, n=4000, dim=256):
    """Scores near zero from large terms that cancel, rows an ulp apart: the screening's error bound, not the
    scores' size, decides which rows can still win."""
    half = dim // 2
    base = rng.standard_normal((10, half)).astype(np.float32)
    rows = np.concatenate([base, -base], axis=1)[rng.integers(0, 10, n)]  # exact dot with the query: 0
    nudge = rng.random(rows.shape) < 0.02
    toward = np.where(rng.random(int(nudge.sum())) < 0.5, -np.inf, np.inf).astype(np.float32)
    rows[nudge] = np.nextafter(rows[nudge], toward)
    query = np.full((1, dim), 1.0 / np.sqrt(dim), np.float32)
    return rows, query


@pytest.mark.parametrize("chunk_rows", [1000, 100_000])
@pytest.mark.parametrize("k", [1, 10, 50])
def test_gpu_selection_is_exact_when_scores_cancel(k, chunk_rows):
    emb, query = cancelling(np.random.default_rng(k))
    index, score = screened_on_numpy(emb, query, k, chunk_rows)
    want_index, want_score = exact_brute_force(emb, query, k)
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_array_equal(score, want_score)


@pytest.mark.parametrize("chunk_rows", [1, 7, 500, 100_000])
@pytest.mark.parametrize("k", [1, 10, 64])
def test_gpu_selection_is_exact_on_near_ties(k, chunk_rows):
    rng = np.random.default_rng(k + chunk_rows)
    emb, queries = near_ties(rng)
    index, score = screened_on_numpy(emb, queries, k, chunk_rows)
    want_index, want_score = exact_brute_force(emb, queries, k)
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_array_equal(score, want_score)


def test_gpu_selection_matches_the_cpu_path_on_random_rows():
    rng = np.random.default_rng(5)
    emb, queries = normalized(rng, (20_000, 32)), normalized(rng, (6, 32))
    index, score = screened_on_numpy(emb, queries, 25, 4096)
    cpu_index, cpu_score = topk_search(emb, queries, 25)
    np.testing.assert_array_equal(index, cpu_index)
    np.testing.assert_allclose(score, cpu_score, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_is_exact_and_keeps_the_rows_resident(device, tmp_path):
    from clipengine.kernels import topk

    rng = np.random.default_rng(4)
    emb, queries = near_ties(rng, n=50_000, dim=64)
    np.save(tmp_path / "e.npy", emb)
    mapped = np.load(tmp_path / "e.npy", mmap_mode="r")
    index, score = topk_search(mapped, queries, 20, chunk_rows=8192, device=device)
    want_index, want_score = exact_brute_force(emb, queries, 20)
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_array_equal(score, want_score)
    resident = topk.resident_rows(mapped, device)
    again = np.load(tmp_path / "e.npy", mmap_mode="r")  # the same file opened again: no second copy
    assert topk.resident_rows(again, device) is resident
    index2, _ = topk_search(again, queries[:2], 20, device=device)
    np.testing.assert_array_equal(index2, want_index[:2])
    topk.release_resident_rows()

