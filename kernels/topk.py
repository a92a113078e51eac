"""Exact top-k inner-product search, streamed over the rows in chunks (CPU: NumPy; GPU: CuPy).

CPU, per chunk: one GEMM of the chunk against all queries, a partial selection of each query's k best
(``argpartition``), then a merge with the running best; ties go to the lower row index, so the result
equals a stable full sort. Memory: about ``chunk_rows × (D + Q)`` floats besides the (Q, k) results.

GPU: the rows are copied to the device once and stay there (:func:`resident_rows`; one copy per process,
reused by every later query batch while the file is unchanged). A float32 GEMM screens the rows; since
any summation order of a float32 dot errs by at most ``E = γ_D ‖x‖ ‖q‖`` (γ_D = D·2⁻²⁴ / (1 − D·2⁻²⁴)),
every row whose screened score is within ``2E`` + a few float32 ulps of the k-th best is re-scored
exactly (float64 dot, rounded to float32) and the order is (score descending, row ascending), the same
answer as the brute force. Rows that do not fit in the GPU's free memory are streamed per query batch
through the same exact selection.
This module never imports the engine.
"""

from __future__ import annotations

import os
import weakref
from typing import NamedTuple

import numpy as np

from clipengine.kernels.cuda import parse_device

DEFAULT_CHUNK_ROWS = 65_536  # CPU: rows per GEMM
DEFAULT_GPU_CHUNK_ROWS = 1 << 22  # GPU: rows per screening GEMM (scores of 16 queries: 256 MiB)
GPU_MEMORY_SHARE = 0.8  # resident rows may take at most this share of the GPU's free memory
_ULP_MARGIN = 2.0**-20  # × |threshold|: eight float32 ulps of it (see _margin)
_ABSOLUTE_MARGIN = 2.0**-140


def topk_search(
    embeddings,
    queries: np.ndarray,
    k: int,
    *,
    chunk_rows: int | None = None,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of ``embeddings`` (N, D) float32 with the largest inner product with each query.

    ``queries`` (Q, D) float32. ``embeddings`` may also be a :class:`DeviceRows` (then ``device`` is its
    device). Returns ``indices`` (Q, min(k, N)) int64 and ``scores`` (Q, min(k, N)) float32, best first
    (equal scores: lower index first). ``device``: "cpu", "cuda" or "cuda:N". ``chunk_rows`` None: the
    device's default.
    """
    if isinstance(embeddings, DeviceRows):
        device = embeddings.device
    kind, _ = parse_device(device)
    shape = embeddings.shape
    if len(shape) != 2 or queries.ndim != 2 or shape[1] != queries.shape[1]:
        raise ValueError("embeddings (N, D) and queries (Q, D) must share D")
    if k < 1:
        raise ValueError("k must be ≥ 1")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError("chunk_rows must be ≥ 1")
    if kind == "cuda":
        return _topk_cuda(embeddings, queries, k, chunk_rows or DEFAULT_GPU_CHUNK_ROWS, device)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n, n_queries = shape[0], queries.shape[0]
    k = min(k, n)
    best_index = np.empty((n_queries, 0), dtype=np.int64)
    best_score = np.empty((n_queries, 0), dtype=np.float32)
    for index, score in _chunk_candidates_cpu(embeddings, queries, k, chunk_rows or DEFAULT_CHUNK_ROWS):
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


# ---- GPU ----------------------------------------------------------------------------------------


class DeviceRows(NamedTuple):
    """(N, D) float32 rows held on a CUDA device, with the bound the screening needs."""

    rows: object  # cupy.ndarray (N, D) float32, C-contiguous
    max_norm: float  # ≥ max_i ‖x_i‖
    device: str  # "cuda:N"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.rows.shape)


_RESIDENT: dict[tuple, tuple[object, DeviceRows]] = {}  # one entry: the rows most recently made resident


def resident_rows(embeddings: np.ndarray, device: str = "cuda") -> DeviceRows | None:
    """``embeddings`` (N, D) float (a ``numpy.memmap`` or an in-memory array) copied to ``device`` once.

    The copy is kept for the process and returned again for the same memory-mapped file (path, offset,
    size, mtime) or the same array object (which must not be changed in place meanwhile); making other
    rows resident releases it. Returns None when the rows do not fit in :data:`GPU_MEMORY_SHARE` of the
    device's free memory (the caller then streams them).
    """
    import cupy

    from clipengine.kernels.cuda import cupy_device

    with cupy_device(device) as dev:
        name = f"cuda:{dev.id}"
        key = (*_identity(embeddings), name)
        entry = _RESIDENT.get(key)
        if entry is not None and (entry[0] is None or entry[0]() is embeddings):
            return entry[1]
        _RESIDENT.clear()  # the previous rows' device memory goes back to the pool first
        n, dim = embeddings.shape
        free, _ = cupy.cuda.runtime.memGetInfo()
        if n * dim * 4 > GPU_MEMORY_SHARE * (free + cupy.get_default_memory_pool().free_bytes()):
            return None
        rows = cupy.empty((n, dim), dtype=cupy.float32)
        max_norm = 0.0
        step = max(1, (256 << 20) // max(1, 4 * dim))  # 256 MiB of host rows per copy
        for start in range(0, n, step):
            block = cupy.asarray(np.ascontiguousarray(embeddings[start:start + step], dtype=np.float32))
            rows[start:start + len(block)] = block
            max_norm = max(max_norm, row_norm_bound(block))
        resident = DeviceRows(rows, max_norm, name)
        owner = None if isinstance(embeddings, np.memmap) else weakref.ref(embeddings)
        _RESIDENT[key] = (owner, resident)
        return resident


def release_resident_rows() -> None:
    """Drop the resident copy (its memory returns to CuPy's pool)."""
    _RESIDENT.clear()


def _identity(embeddings) -> tuple:
    if isinstance(embeddings, np.memmap) and getattr(embeddings, "filename", None):
        stat = os.stat(embeddings.filename)
        return ("file", os.path.realpath(embeddings.filename), int(embeddings.offset), stat.st_size,
                stat.st_mtime_ns, embeddings.shape, embeddings.dtype.str)
    return ("object", id(embeddings), embeddings.shape, embeddings.dtype.str)


def dot_error_bound(dim: int, max_norm: float, query_norm: float) -> float:
    """E ≥ |fl32(x·q) − x·q| for any summation order of a D-term float32 dot with ‖x‖ ≤ max_norm."""
    unit = dim * 2.0**-24
    return unit / (1.0 - unit) * max_norm * query_norm * (1.0 + 2.0**-20) if unit < 0.5 else np.inf


def _topk_cuda(embeddings, queries, k, chunk_rows, device):
    import cupy

    from clipengine.kernels.cuda import cupy_device

    with cupy_device(device):
        resident = embeddings if isinstance(embeddings, DeviceRows) else resident_rows(embeddings, device)
        if resident is not None:
            rows = resident.rows
            n = rows.shape[0]
            chunks = ((start, rows[start:start + chunk_rows], resident.max_norm) for start in range(0, n, chunk_rows))

            def exact(keep, query64):
                return (rows[cupy.asarray(keep)].astype(cupy.float64) @ cupy.asarray(query64)).astype(cupy.float32).get()
        else:  # streamed: each query batch copies the rows again, chunk by chunk
            n = embeddings.shape[0]

            def streamed():
                for start in range(0, n, chunk_rows):
                    block = cupy.asarray(np.ascontiguousarray(embeddings[start:start + chunk_rows], np.float32))
                    yield start, block, row_norm_bound(block)

            chunks = streamed()

            def exact(keep, query64):
                return (np.asarray(embeddings[keep], dtype=np.float64) @ query64).astype(np.float32)

        from cupy import _core
        from cupy._core import _routines_linalg

        previous = _core.get_compute_type(np.float32)
        # the screening's error bound is for float32 arithmetic: never TF32/BF16, whatever CUPY_TF32 says
        _core.set_compute_type(np.float32, _routines_linalg.COMPUTE_TYPE_FP32)
        try:
            return exact_topk_screened(chunks, n, queries, k, exact, xp=cupy)
        finally:
            _core.set_compute_type(np.float32, previous)


def row_norm_bound(block) -> float:
    """≥ the largest row norm of ``block`` (r, D) (a CuPy or NumPy array)."""
    if block.shape[0] == 0:
        return 0.0
    squares = (block.astype("float64") ** 2).sum(axis=1)
    return float(squares.max()) ** 0.5 * (1.0 + 2.0**-20) + _ABSOLUTE_MARGIN


def _margin(threshold):
    """A gap below ``threshold`` wider than one float32 ulp of it: a score under ``threshold − margin`` rounds
    to a float32 strictly below any score ≥ ``threshold``."""
    return _ULP_MARGIN * np.abs(threshold) + _ABSOLUTE_MARGIN


def exact_topk_screened(chunks, n, queries, k, exact, *, xp=np):
    """The exact top k from a float32 screening on the device.

    ``chunks`` yields ``(first_row, block (r, D) float32 on the device, norm bound of its rows)``;
    ``exact(rows (m,) int64, query (D,) float64)`` → (m,) float32 exact scores of those rows.
    Per chunk: screened scores a = fl32(block @ q) with error ≤ e (:func:`dot_error_bound`), so each row's
    exact score lies in [a − e, a + e]. A running threshold t (the k-th largest lower bound seen so far, never
    above the global one) keeps every row with a + e ≥ t − margin; every row whose lower bound reaches the
    global k-th largest T is kept, so at the end T is found among the kept rows, the rows with
    a + e ≥ T − margin are re-scored exactly, and the order is
    (score descending, row ascending). ``margin`` (several float32 ulps of the threshold) makes a dropped
    row's float32 score strictly below those of k kept rows, so equal float32 scores never cross the cut.
    ``xp``: the array module of the blocks (``cupy`` on the GPU; ``numpy`` runs the same selection on the CPU).
    The float32 products must be float32 arithmetic (not TF32): the caller sets that.
    """

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n_queries, dim = queries.shape
    k = min(k, n)
    indices = np.empty((n_queries, k), np.int64)
    best = np.empty((n_queries, k), np.float32)
    if n_queries == 0 or k == 0:
        for _ in chunks:
            pass
        return indices, best
    queries64 = queries.astype(np.float64)
    q_norm = np.linalg.norm(queries64, axis=1) * (1.0 + 2.0**-20)
    d_queries_t = xp.asarray(np.ascontiguousarray(queries.T))  # (D, Q)
    threshold = np.full(n_queries, -np.inf)
    best_lower = np.empty((n_queries, 0))
    found: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(n_queries)]
    for start, block, norm in chunks:
        r = block.shape[0]
        if r == 0:
            continue
        error = np.array([dot_error_bound(dim, norm, qn) for qn in q_norm])  # (Q,)
        scores = block @ d_queries_t  # (r, Q) float32 screened scores
        kk = min(k, r)
        # the kk best lower bounds of this chunk join the running k best; their k-th is a threshold t that
        # k rows reach, so t ≤ the k-th largest lower bound over all rows
        top = _to_host(xp.partition(scores, r - kk, axis=0)[r - kk:]).astype(np.float64).T - error[:, None]
        best_lower = np.sort(np.concatenate([best_lower, top], axis=1), axis=1)[:, -k:]
        if best_lower.shape[1] == k:
            threshold = best_lower[:, 0]
        wanted = threshold - error - _margin(threshold)
        cut = wanted.astype(np.float32)
        cut = np.where(cut > wanted, np.nextafter(cut, np.float32(-np.inf)), cut)  # rounded down
        rows_hit, queries_hit = xp.nonzero(scores >= xp.asarray(cut)[None, :])
        screened = _to_host(scores[rows_hit, queries_hit]).astype(np.float64)
        rows_hit, queries_hit = _to_host(rows_hit).astype(np.int64) + start, _to_host(queries_hit)
        for q in np.unique(queries_hit):
            mine = queries_hit == q
            found[q].append((rows_hit[mine], screened[mine], np.full(int(mine.sum()), error[q])))
    for q in range(n_queries):
        rows_q = np.concatenate([part[0] for part in found[q]])
        screened = np.concatenate([part[1] for part in found[q]])
        error = np.concatenate([part[2] for part in found[q]])
        lower = screened - error
        floor = np.partition(lower, len(lower) - k)[len(lower) - k]  # the k-th largest lower bound, T
        keep = np.sort(rows_q[screened + error >= floor - _margin(floor)])
        scores_q = exact(keep, queries64[q])
        order = np.lexsort((keep, -scores_q))[:k]
        indices[q], best[q] = keep[order], scores_q[order]
    return indices, best


def _to_host(array) -> np.ndarray:
    return array.get() if hasattr(array, "get") else np.asarray(array)
