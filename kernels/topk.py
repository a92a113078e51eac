"""Exact top-k inner-product search, streamed over the rows in chunks (CPU: NumPy; GPU: CuPy).

Per chunk: one GEMM of the chunk against all queries, a partial selection of each
query's k best (``argpartition``), then a merge with the running best. Ties are
broken towards the lower row index on the CPU, so the result equals a stable
full sort (on the GPU equal scores at the k-th place may pick another equal row). Memory: about ``chunk_rows × (D + Q)`` floats besides the (Q, k) results.
This module never imports the engine.
"""

from __future__ import annotations

import numpy as np

DEFAULT_CHUNK_ROWS = 65_536


def topk_search(
    embeddings: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of ``embeddings`` (N, D) float32 with the largest inner product with each query.

    ``queries`` (Q, D) float32. Returns ``indices`` (Q, min(k, N)) int64 and ``scores``
    (Q, min(k, N)) float32, best first (equal scores: lower index first).
    """
    if embeddings.ndim != 2 or queries.ndim != 2 or embeddings.shape[1] != queries.shape[1]:
        raise ValueError("embeddings (N, D) and queries (Q, D) must share D")
    if k < 1:
        raise ValueError("k must be ≥ 1")
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be ≥ 1")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n, n_queries = embeddings.shape[0], queries.shape[0]
    k = min(k, n)
    best_index = np.empty((n_queries, 0), dtype=np.int64)
    best_score = np.empty((n_queries, 0), dtype=np.float32)
    if device == "cpu":
        chunks = _chunk_candidates_cpu(embeddings, queries, k, chunk_rows)
    elif device == "cuda":
        chunks = _chunk_candidates_cuda(embeddings, queries, k, chunk_rows)
    else:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    for index, score in chunks:
        best_index, best_score = _merge(
            np.concatenate([best_index, index], axis=1), np.concatenate([best_score, score], axis=1), k
        )
    return best_index, best_score


def _merge(index: np.ndarray, score: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep each row's k best by (score descending, index ascending)."""
    order = np.lexsort((index, -score), axis=-1)[:, :k]
    return np.take_along_axis(index, order, axis=1), np.take_along_axis(score, order, axis=1)


def _chunk_candidates_cpu(embeddings, queries, k, chunk_rows):
    n = embeddings.shape[0]
    queries_t = np.ascontiguousarray(queries.T)  # (D, Q)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        block = np.ascontiguousarray(embeddings[start:stop], dtype=np.float32)
        scores = np.ascontiguousarray((block @ queries_t).T)  # (Q, r)
        kk = min(k, stop - start)
        if kk == scores.shape[1]:
            part = np.broadcast_to(np.arange(kk), scores.shape).copy()
        else:
            part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        part_scores = np.take_along_axis(scores, part, axis=1)
        # argpartition picks arbitrarily among scores equal to the k-th: redo those queries exactly
        kth = part_scores.min(axis=1)
        ambiguous = np.flatnonzero((scores >= kth[:, None]).sum(axis=1) > kk)
        for q in ambiguous:
            candidates = np.flatnonzero(scores[q] >= kth[q])
            order = np.lexsort((candidates, -scores[q, candidates]))[:kk]
            part[q] = candidates[order]
            part_scores[q] = scores[q, part[q]]
        yield part + start, part_scores


def _chunk_candidates_cuda(embeddings, queries, k, chunk_rows):
    import cupy

    n = embeddings.shape[0]
    d_queries_t = cupy.asarray(np.ascontiguousarray(queries.T))
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        block = cupy.asarray(np.ascontiguousarray(embeddings[start:stop], dtype=np.float32))
        scores = cupy.ascontiguousarray((block @ d_queries_t).T)  # (Q, r)
        kk = min(k, stop - start)
        if kk < scores.shape[1]:
            order = cupy.argsort(-scores, axis=1)[:, :kk]  # a full device sort per chunk; ties may reorder
        else:
            order = cupy.broadcast_to(cupy.arange(kk), scores.shape)
        part_scores = cupy.take_along_axis(scores, order, axis=1)
        yield cupy.asnumpy(order).astype(np.int64) + start, cupy.asnumpy(part_scores)

