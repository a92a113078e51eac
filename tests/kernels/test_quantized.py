"""topk_quantized (int8 screening + exact re-rank) against brute force, on adversarial data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from clipengine.kernels import quantized as kq
from clipengine.kernels.quantized import quantize_rows, topk_quantized
from clipengine.kernels.topk import topk_search


def brute_force(embeddings, queries, k):
    """float32 of the float64 dot; order (score desc, row asc)."""
    scores = (np.asarray(queries, np.float64) @ np.asarray(embeddings, np.float64).T).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def assert_exact(embeddings, queries, k, **kwargs):
    index, score = topk_quantized(quantize_rows(embeddings), embeddings, queries, k, **kwargs)
    want_index, want_score = brute_force(embeddings, queries, k)
    assert index.dtype == np.int64 and score.dtype == np.float32
    assert index.shape == want_index.shape == (len(queries), min(k, len(embeddings)))
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_array_equal(score, want_score)


def normalized(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("n, dim", [(1, 3), (7, 5), (63, 16), (65, 16), (1000, 32), (4099, 512)])
@pytest.mark.parametrize("k", [1, 20, 5000])
def test_matches_brute_force(n, dim, k):
    rng = np.random.default_rng(n * 7 + dim)
    assert_exact(normalized(rng, (n, dim)), normalized(rng, (3, dim)), k)


def test_agrees_with_the_float32_path():
    rng = np.random.default_rng(1)
    emb, queries = normalized(rng, (3000, 64)), normalized(rng, (4, 64))
    index, score = topk_quantized(quantize_rows(emb), emb, queries, 20)
    want_index, want_score = topk_search(emb, queries, 20)
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_allclose(score, want_score, rtol=1e-6, atol=1e-6)


def test_near_ties_within_the_int8_error():
    """Rows that differ far below the int8 step: the screening keeps them all, the re-rank orders them."""
    rng = np.random.default_rng(2)
    base = normalized(rng, (1, 128))[0]
    emb = base + rng.standard_normal((3000, 128)).astype(np.float32) * np.float32(1e-6)
    emb[::7] = base  # exact duplicates among the near-ties
    queries = np.stack([base, normalized(rng, (128,))])
    assert_exact(emb, queries, 50)


def test_duplicates_rank_the_lower_row_first():
    rng = np.random.default_rng(3)
    distinct = normalized(rng, (3, 24))
    emb = distinct[rng.integers(0, 3, size=777)]
    assert_exact(emb, normalized(rng, (5, 24)), 100)


def test_every_row_a_candidate():
    """Identical rows: nothing can be ruled out, every row is re-scored (on several threads), the first k win."""
    rng = np.random.default_rng(8)
    emb = np.tile(normalized(rng, (1, 8)), (kq._PARALLEL_RERANK_ROWS + 5, 1))
    emb[-1] *= 2  # one row above all the ties
    assert_exact(emb, normalized(rng, (2, 8)), 5)


def test_candidate_counts_say_how_many_rows_were_reranked():
    """Identical rows leave every row a candidate; well separated rows leave few, never fewer than k."""
    rng = np.random.default_rng(9)
    same = np.tile(normalized(rng, (1, 16)), (300, 1))
    counts = np.zeros(2, np.int64)
    topk_quantized(quantize_rows(same), same, normalized(rng, (2, 16)), 5, candidate_counts=counts)
    assert counts.tolist() == [300, 300]
    spread = normalized(rng, (5000, 64))
    queries = spread[:3] + np.float32(0.01) * normalized(rng, (3, 64))
    counts = np.zeros(3, np.int64)
    index, _ = topk_quantized(quantize_rows(spread), spread, queries, 10, candidate_counts=counts)
    assert np.all(counts >= 10) and np.all(counts < 500)
    # the count is what the screening keeps: every row whose upper bound reaches the k-th lower bound
    with pytest.raises(ValueError, match="candidate_counts"):
        topk_quantized(quantize_rows(spread), spread, queries, 10, candidate_counts=np.zeros(2, np.int64))


def test_zero_rows_zero_query_and_unnormalized_rows():
    rng = np.random.default_rng(4)
    norms = np.exp(rng.uniform(-8, 8, size=(500, 1))).astype(np.float32)
    emb = rng.standard_normal((500, 40)).astype(np.float32) * norms
    emb[rng.integers(0, 500, size=60)] = 0.0
    emb[10, 3] = 1e6  # one huge coordinate: its row's scale is coarse, its residual large
    emb[11] = 1e-40  # subnormal: the float32 scale rounds to zero
    queries = np.concatenate([rng.standard_normal((3, 40)).astype(np.float32) * 100, np.zeros((1, 40), np.float32)])
    assert_exact(emb, queries, 30)
    assert_exact(np.zeros((9, 4), np.float32), queries[:, :4], 4)


def test_queries_over_several_passes_and_memmap(tmp_path):
    rng = np.random.default_rng(5)
    emb, queries = normalized(rng, (2001, 24)), normalized(rng, (7, 24))
    np.save(tmp_path / "e.npy", emb)
    mapped = np.load(tmp_path / "e.npy", mmap_mode="r")
    index, score = topk_quantized(quantize_rows(mapped, chunk_rows=300), mapped, queries, 9, queries_per_pass=3)
    want_index, want_score = brute_force(emb, queries, 9)
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_array_equal(score, want_score)


def test_the_bound_holds_for_every_row():
    """|x_i·q − a_i| ≤ e_i: the lower and upper bounds the scan gives bracket the exact score."""
    rng = np.random.default_rng(6)
    emb = rng.standard_normal((3000, 96)).astype(np.float32) * rng.uniform(0.01, 10, size=(3000, 1)).astype(np.float32)
    quantized = quantize_rows(emb)
    # the residual x_i − s_i c_i of a row as the query: Cauchy–Schwarz is attained there, the bound is tight
    largest = np.argsort(np.linalg.norm(emb, axis=1))[-2:]  # where the shared slack M‖ρ‖ weighs least
    residual_directions = emb[largest].astype(np.float64) - quantized.scales[largest, None] * quantized.codes[largest]
    queries = np.concatenate([rng.standard_normal((1, 96)), residual_directions * 1000])
    q_codes, q_scale, q_norm, slack = kq._quantize_queries(queries, 32767, quantized.max_norm)
    approx = np.empty((3, 3000), np.float32)
    heaps = np.full((kq._SCAN_PARTS, 3, 1), -np.inf)
    kq._screen(quantized.codes, quantized.scales, quantized.residuals, q_codes, q_scale, q_norm, slack, approx, heaps)
    exact = queries @ emb.astype(np.float64).T
    error = quantized.residuals.astype(np.float64) * q_norm[:, None] + slack[:, None]
    assert (np.abs(exact - approx) <= error).all()
    attained = np.abs(exact - approx)[[1, 2], largest] / error[[1, 2], largest]
    assert (attained > 0.95).all()
    relative = error / (np.linalg.norm(emb, axis=1) * q_norm[:, None])
    assert np.median(relative) < 0.02  # and it is tight (the slack M‖ρ‖ is shared, so small rows get more)
    assert np.isclose(heaps.max(axis=0)[:, 0], (approx - error).max(axis=1), rtol=1e-5).all()


def test_quantized_rows():
    rng = np.random.default_rng(7)
    emb = rng.standard_normal((100, 33)).astype(np.float32)
    q = quantize_rows(emb)
    assert q.codes.dtype == np.int8 and np.abs(q.codes.astype(int)).max() == 127
    residual = np.linalg.norm(emb - q.scales[:, None].astype(np.float64) * q.codes, axis=1)
    assert (residual <= q.residuals).all() and (q.residuals <= residual * 1.001 + 1e-30).all()
    assert q.max_norm >= (np.linalg.norm(emb.astype(np.float64), axis=1) + q.residuals).max()


def test_rejects_bad_input():
    emb = np.ones((4, 3), np.float32)
    q = quantize_rows(emb)
    with pytest.raises(ValueError, match="share D"):
        topk_quantized(q, emb, np.ones((1, 4), np.float32), 1)
    with pytest.raises(ValueError, match="k must be"):
        topk_quantized(q, emb, np.ones((1, 3), np.float32), 0)
    with pytest.raises(ValueError, match="quantized rows"):
        topk_quantized(q, np.ones((5, 3), np.float32), np.ones((1, 3), np.float32), 1)
    with pytest.raises(ValueError, match="NaN"):
        topk_quantized(q, emb, np.full((1, 3), np.nan, np.float32), 1)
    bad = emb.copy()
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match="rows 0..3"):
        quantize_rows(bad)


@settings(max_examples=60, deadline=None)
@given(
    emb=st.integers(1, 40).flatmap(
        lambda n: arrays(np.float32, (n, 6),
                         elements=st.floats(-1e3, 1e3, width=32) | st.sampled_from([0.0, 1.0, -1.0]))
    ),
    query=arrays(np.float32, (6,), elements=st.floats(-1e3, 1e3, width=32)),
    k=st.integers(1, 45),
)
def test_property_matches_brute_force(emb, query, k):
    assert_exact(emb, query[None], k)


def test_rejects_a_device_it_cannot_name():
    rng = np.random.default_rng(0)
    emb = normalized(rng, (10, 4))
    with pytest.raises(ValueError, match="device must be"):
        topk_quantized(quantize_rows(emb), emb, emb[:1], 3, device="gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("clipengine.kernels.similarity", fromlist=["x"]).cuda_available(),
                    reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
@pytest.mark.parametrize("dim", [512, 30])  # char4 loads; the scalar loop for widths not a multiple of 4
def test_cuda_screening_equals_brute_force_and_stays_resident(device, dim, tmp_path):
    rng = np.random.default_rng(dim)
    base = normalized(rng, (50, dim))
    emb = base[rng.integers(0, 50, 40_000)] + np.float32(1e-3) * normalized(rng, (40_000, dim))
    emb[::97] = base[0]  # exact duplicates: ties by row
    queries = np.concatenate([base[:5], normalized(rng, (20, dim))])  # 25 queries: two launches
    quantized = quantize_rows(emb)
    for k in (1, 20, 300):
        index, score = topk_quantized(quantized, emb, queries, k, device=device)
        want_index, want_score = brute_force(emb, queries, k)
        np.testing.assert_array_equal(index, want_index)
        np.testing.assert_array_equal(score, want_score)
    resident = kq.resident_quantized(quantized, device)
    assert kq.resident_quantized(quantized, device) is resident  # loaded once, not per query batch
    kq.release_resident_quantized()
