"""topk_search against brute force (a stable full sort)."""

from __future__ import annotations

import numpy as np
import pytest

from clipengine.kernels.similarity import cuda_available
from clipengine.kernels.topk import topk_search


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


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA device")
def test_cuda_matches_brute_force():
    rng = np.random.default_rng(4)
    emb, queries = normalized(rng, (50_000, 64)), normalized(rng, (8, 64))
    index, score = topk_search(emb, queries, 20, chunk_rows=8192, device="cuda")
    want_index, want_score = brute_force(emb, queries, 20)
    np.testing.assert_allclose(score, want_score, rtol=1e-5, atol=1e-5)
    assert (index == want_index).mean() > 0.99

