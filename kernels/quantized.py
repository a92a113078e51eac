"""Exact top-k inner-product search through an int8 screening copy of the rows (CPU, Numba).

Built once per embeddings file (:func:`quantize_rows`): row ``x_i`` (D,) float32 becomes int8 codes
``c_i = rint(x_i / s_i)`` with ``s_i = max|x_i| / 127`` (float32), and ``r_i ≥ ‖x_i − s_i c_i‖₂``
(float32, rounded up); ``M ≥ max_i (‖x_i‖ + r_i)``. A query ``q`` becomes int16 codes ``qc = rint(q / σ)``
with residual ``ρ = q − σ qc``. One pass over the codes (:func:`topk_quantized`) gives, per row, the
exact integer dot ``c_i · qc`` and ``a_i = s_i σ (c_i · qc)``; as ``x_i·q − a_i = s_i c_i·ρ + (x_i − s_i c_i)·q``,

    |x_i·q − a_i| ≤ e_i = r_i ‖q‖ + M ‖ρ‖ + slack,   L_i = a_i − e_i ≤ x_i·q ≤ U_i = a_i + e_i.

Let t be the k-th largest ``L_i``; the candidates are the rows with ``U_i ≥ t``, re-ranked exactly.
Proof of exactness: a row with ``U_i < t`` has k rows j with ``x_j·q ≥ L_j ≥ t > U_i ≥ x_i·q``, so it is
not in the top k (``slack`` ≥ a float32 ulp plus every float rounding keeps that order strict after the scores
are rounded); hence the top k are all candidates, and ranking the candidates exactly is the brute force's answer.

Scores are ``float32(x_i · q)`` with the dot in float64 (the correctly rounded float32 score, up to a
double rounding); the order is (score descending, row ascending), as :func:`clipengine.kernels.topk.topk_search`.
The scan reads N × D bytes (a quarter of the float32 rows) and is memory bound: it dots four rows at a time
(generic LLVM vector IR; on an AVX-512 VNNI CPU it becomes ``vpmovsxbw`` + ``vpdpwssd``) and prefetches
4 KiB ahead (the hardware prefetcher stops at page boundaries; ``bench/annotate.py`` times the scan). All the queries of a pass share
the scan (each row is read once, then dotted with every query from L1). Numba threads: the caller's setting.

On a GPU (``device="cuda"``/``"cuda:N"``) the codes, scales and residuals are copied to the device once and
stay there (:func:`resident_quantized`: a quarter of the float32 rows' memory); the same integer dots, a_i
and bounds come from one CUDA kernel (:data:`CUDA_SOURCE`: a warp per row, 4-byte code loads, the queries'
codes in shared memory), the k-th largest lower bound and the candidates from CuPy, and the candidates are
re-ranked exactly on the host as on the CPU. Lower bounds are rounded down to float32 on the device, so the
GPU's candidates include the CPU's and the answer is the same.
This module never imports the engine.
"""

from __future__ import annotations

import os
import weakref
from typing import Callable, NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

QUANTIZE_CHUNK_ROWS = 65_536
QUERIES_PER_PASS = 16  # queries sharing one scan; their (Q, N) float32 screening scores are held at once
_SCAN_PARTS = 64  # row ranges scanned in parallel, each with its own running top-k of lower bounds
_SLACK_RELATIVE = 2.0**-18  # × M‖q‖: above a float32 ulp of any score plus the float64 and float32 roundings
_SLACK_ABSOLUTE = 2.0**-140  # the same near zero (subnormal float32 spacing is 2**-149)
_ROUND_UP = 1.0 + 2.0**-20  # stored bounds are rounded up past the float32 rounding (2**-24)
_PARALLEL_RERANK_ROWS = 20_000  # fewer candidates are re-scored on one thread
_PREFETCH_BYTES = 4096  # the scan asks for the rows this far ahead (the hardware prefetcher stops at 4 KiB pages)


class QuantizedRows(NamedTuple):
    """The screening copy of (N, D) rows; arrays may be memory-mapped."""

    codes: np.ndarray  # (N, D) int8
    scales: np.ndarray  # (N,) float32, s_i
    residuals: np.ndarray  # (N,) float32, r_i ≥ ‖x_i − s_i c_i‖₂
    max_norm: float  # M ≥ max_i (‖x_i‖ + r_i)


def allocate_quantized(n: int, dim: int) -> QuantizedRows:
    """Empty in-memory arrays for :func:`quantize_rows` (``out=``)."""
    return QuantizedRows(np.empty((n, dim), np.int8), np.empty(n, np.float32), np.empty(n, np.float32), 0.0)


def quantize_rows(
    embeddings: np.ndarray,
    *,
    out: QuantizedRows | None = None,
    chunk_rows: int = QUANTIZE_CHUNK_ROWS,
    on_chunk: Callable[[int], None] | None = None,
) -> QuantizedRows:
    """The int8 screening copy of ``embeddings`` (N, D) float (finite; may be a ``numpy.memmap``).

    ``out`` holds preallocated (N, D) int8 / (N,) float32 / (N,) float32 arrays (e.g. ``.npy`` files opened
    with ``numpy.lib.format.open_memmap``); its ``max_norm`` is ignored. Streamed in chunks of ``chunk_rows``;
    ``on_chunk(rows)`` after each. Raises ``ValueError`` for non-finite rows.
    """
    if embeddings.ndim != 2:
        raise ValueError("embeddings must be (N, D)")
    n, dim = embeddings.shape
    out = out if out is not None else allocate_quantized(n, dim)
    if out.codes.shape != (n, dim) or out.scales.shape != (n,) or out.residuals.shape != (n,):
        raise ValueError(f"out arrays must be ({n}, {dim}), ({n},), ({n},)")
    max_norm = 0.0
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        block = np.ascontiguousarray(embeddings[start:stop], dtype=np.float32)
        if not np.isfinite(block).all():
            raise ValueError(f"embeddings rows {start}..{stop - 1} hold NaN or infinity")
        codes = np.empty((stop - start, dim), np.int8)
        norms = np.empty(stop - start, np.float64)
        _quantize_block(block, codes, out.scales[start:stop], out.residuals[start:stop], norms)
        out.codes[start:stop] = codes
        if stop > start:
            max_norm = max(max_norm, float(np.max(norms + out.residuals[start:stop])))
        if on_chunk is not None:
            on_chunk(stop - start)
    return QuantizedRows(out.codes, out.scales, out.residuals, max_norm * _ROUND_UP + _SLACK_ABSOLUTE)


def topk_quantized(
    quantized: QuantizedRows,
    embeddings: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    queries_per_pass: int = QUERIES_PER_PASS,
    device: str = "cpu",
    candidate_counts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of ``embeddings`` (N, D) float with the largest inner product with each query, exactly.

    ``quantized`` is :func:`quantize_rows` of these same ``embeddings``; ``queries`` (Q, D) float, finite.
    Returns ``indices`` (Q, min(k, N)) int64 and ``scores`` (Q, min(k, N)) float32, best first (equal
    scores: lower index first). Only the candidate rows of ``embeddings`` are read (gathered).
    ``device``: "cpu" (Numba), "cuda" or "cuda:N" (the screening on that GPU, the index resident there).
    ``candidate_counts``: an optional (Q,) int64 array that receives how many rows each query re-ranked
    exactly (what the screening left; the rest of the N rows were never read).
    """
    from clipengine.kernels.cuda import parse_device

    on_gpu = parse_device(device)[0] == "cuda"
    codes = np.ascontiguousarray(quantized.codes)  # no copy for a C-ordered (memory-mapped) file
    if embeddings.ndim != 2 or queries.ndim != 2 or embeddings.shape[1] != queries.shape[1]:
        raise ValueError("embeddings (N, D) and queries (Q, D) must share D")
    if codes.shape != embeddings.shape:
        raise ValueError(f"the quantized rows are {codes.shape}, the embeddings {embeddings.shape}")
    if k < 1:
        raise ValueError("k must be ≥ 1")
    if not np.isfinite(queries).all():
        raise ValueError("queries hold NaN or infinity")
    n, dim = embeddings.shape
    n_queries = queries.shape[0]
    k = min(k, n)
    indices = np.empty((n_queries, k), np.int64)
    scores = np.empty((n_queries, k), np.float32)
    if n_queries == 0 or k == 0:
        return indices, scores
    q_max = min(32767, (2**31 - 1) // (127 * max(1, dim)))  # |c · qc| ≤ 127 · q_max · D fits int32
    if q_max < 1:
        raise ValueError(f"D = {dim} is too wide for int32 screening")
    counts = np.empty(n_queries, np.int64) if candidate_counts is None else candidate_counts
    if counts.shape != (n_queries,):
        raise ValueError(f"candidate_counts must have shape ({n_queries},), not {counts.shape}")
    if on_gpu:
        _topk_quantized_cuda(quantized, embeddings, queries, k, q_max, device, indices, scores, counts)
        return indices, scores
    scales, residuals = np.ascontiguousarray(quantized.scales), np.ascontiguousarray(quantized.residuals)
    for first in range(0, n_queries, queries_per_pass):
        block = np.asarray(queries[first : first + queries_per_pass], dtype=np.float64)
        q_codes, q_scale, q_norm, slack = _quantize_queries(block, q_max, quantized.max_norm)
        approx = np.empty((len(block), n), np.float32)
        n_parts = min(_SCAN_PARTS, max(1, n // (8 * k)))  # the heaps stay smaller than ``approx``
        heaps = np.full((n_parts, len(block), k), -np.inf)
        previous_chunk = numba.get_parallel_chunksize()
        numba.set_parallel_chunksize(1)  # parts handed out one at a time: a descheduled thread holds back less
        try:
            _screen(codes, scales, residuals, q_codes, q_scale, q_norm, slack, approx, heaps)
        finally:
            numba.set_parallel_chunksize(previous_chunk)
        for j, query in enumerate(block):
            bound = np.sort(heaps[:, j, :], axis=None)[-k]  # the k-th largest lower bound
            candidates = np.empty(n, np.int64)
            count = _collect(approx[j], residuals, q_norm[j], slack[j], bound, candidates)
            counts[first + j] = count
            indices[first + j], scores[first + j] = _rerank(embeddings, candidates[:count], query, k)
    return indices, scores


def _quantize_queries(queries, q_max, max_norm):
    """(Q, D) float64 → int16 codes, σ, ‖q‖ (rounded up), slack M‖ρ‖ + relative/absolute rounding terms."""
    peak = np.abs(queries).max(axis=1)
    q_scale = np.where(peak > 0, peak / q_max, 1.0)
    q_codes = np.clip(np.rint(queries / q_scale[:, None]), -q_max, q_max)
    rho_norm = np.linalg.norm(queries - q_scale[:, None] * q_codes, axis=1) * _ROUND_UP
    q_norm = np.linalg.norm(queries, axis=1) * _ROUND_UP
    slack = max_norm * rho_norm * _ROUND_UP + _SLACK_RELATIVE * max_norm * q_norm + _SLACK_ABSOLUTE
    return np.ascontiguousarray(q_codes, dtype=np.int16), q_scale, q_norm, slack


def _rerank(embeddings, candidates, query, k):
    """Exact float64 dots of the candidate rows (ascending), rounded to float32; the k best by (score desc, row asc)."""
    scores = np.empty(len(candidates), np.float32)
    # no BLAS (its idle threads keep spinning after a call); parallel only when there are many candidates
    score = _exact_scores_parallel if len(candidates) > _PARALLEL_RERANK_ROWS else _exact_scores
    score(np.asarray(embeddings), candidates, query, scores)
    order = np.argsort(-scores, kind="stable")[:k]
    return candidates[order], scores[order]


def _exact_scores_py(embeddings, candidates, query, out):
    """``out[t] = float32(embeddings[candidates[t]] · query)``, the dot in float64 in row order."""
    for t in prange(candidates.shape[0]):
        row = embeddings[candidates[t]]
        total = 0.0
        for j in range(row.shape[0]):
            total += np.float64(row[j]) * query[j]
        out[t] = np.float32(total)


_exact_scores = njit(cache=True)(_exact_scores_py)
_exact_scores_parallel = njit(parallel=True, cache=True)(_exact_scores_py)


@njit(parallel=True, cache=True)
def _quantize_block(block, codes, scales, residuals, norms):
    """``block`` (r, D) float32 → codes (r, D) int8, scales, residuals (r,) float32, norms (r,) float64."""
    n, dim = block.shape
    for i in prange(n):
        peak = 0.0
        for j in range(dim):
            peak = max(peak, abs(np.float64(block[i, j])))
        scale = np.float64(np.float32(peak / 127.0))
        residual2 = 0.0
        norm2 = 0.0
        for j in range(dim):
            x = np.float64(block[i, j])
            code = 0.0
            if scale > 0.0:
                code = min(127.0, max(-127.0, np.rint(x / scale)))
            codes[i, j] = np.int8(code)
            delta = x - scale * code
            residual2 += delta * delta
            norm2 += x * x
        scales[i] = np.float32(scale)
        residuals[i] = np.float32(np.sqrt(residual2) * _ROUND_UP + _SLACK_ABSOLUTE)
        norms[i] = np.sqrt(norm2)


@njit(cache=True, inline="always")
def _heap_replace_min(heap, value):
    """Replace the root of the min-heap ``heap`` (k,) with ``value`` (larger than it) and sift down."""
    size = heap.shape[0]
    at = 0
    while True:
        child = 2 * at + 1
        if child >= size:
            break
        if child + 1 < size and heap[child + 1] < heap[child]:
            child += 1
        if heap[child] >= value:
            break
        heap[at] = heap[child]
        at = child
    heap[at] = value


@intrinsic
def _prefetch(typingctx, array, index):
    """Hint the cache line of ``array.flat[index]`` (a C-contiguous array) into the caches, for reading."""
    if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]), "llvm.prefetch.p0"
        )
        address = builder.bitcast(builder.gep(data, [args[1]]), byte_pointer)
        builder.call(function, [address, i32(0), i32(3), i32(1)])  # read, keep in all levels, data cache
        return context.get_dummy_value()

    return types.void(array, index), codegen


_LANES = 32  # int8 × int16 products per vector step of _dot4_rows (one 512-bit register of int16)
_GROUP = 4  # rows dotted at once (four accumulator chains hide the multiply-add latency); _screen unpacks 4


@intrinsic
def _dot4_rows(typingctx, codes, first, q_row):
    """``codes[first + r] · q_row`` for r < 4, exact, as a 4-tuple of int32 (the sums must fit int32).

    ``codes`` (N, D) int8 and ``q_row`` (D,) int16, both C-contiguous. Written as generic LLVM vector IR:
    products of 32 lanes, adjacent pairs summed into 16 int32 lanes (the shape LLVM turns into
    ``vpmaddwd``/``vpdpwssd`` on x86), one accumulator per row; portable to any target LLVM supports.
    """
    if not (isinstance(codes, types.Array) and codes.ndim == 2 and codes.layout == "C" and codes.dtype == types.int8
            and isinstance(q_row, types.Array) and q_row.ndim == 1 and q_row.layout == "C"
            and q_row.dtype == types.int16 and isinstance(first, types.Integer)):
        return None
    result = types.UniTuple(types.int32, _GROUP)

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        data, shape = array.data, array.shape
        query = context.make_array(signature.args[2])(context, builder, args[2]).data
        i32, i64 = ir.IntType(32), ir.IntType(64)
        wide, half = ir.VectorType(i32, _LANES), ir.VectorType(i32, _LANES // 2)
        dim = builder.extract_value(shape, 1)
        first_row = context.cast(builder, args[1], signature.args[1], types.int64)
        rows = [builder.gep(data, [builder.mul(builder.add(first_row, i64(r)), dim)]) for r in range(_GROUP)]
        sums = [cgutils.alloca_once_value(builder, ir.Constant(half, None)) for _ in range(_GROUP)]
        even = ir.Constant(half, [2 * lane for lane in range(_LANES // 2)])
        odd = ir.Constant(half, [2 * lane + 1 for lane in range(_LANES // 2)])
        steps = builder.udiv(dim, i64(_LANES))
        with cgutils.for_range(builder, steps) as loop:
            at = builder.mul(loop.index, i64(_LANES))
            q_pointer = builder.bitcast(builder.gep(query, [at]), ir.VectorType(ir.IntType(16), _LANES).as_pointer())
            q_lanes = builder.sext(builder.load(q_pointer, align=2), wide)
            for r in range(_GROUP):
                pointer = builder.bitcast(builder.gep(rows[r], [at]), ir.VectorType(ir.IntType(8), _LANES).as_pointer())
                product = builder.mul(builder.sext(builder.load(pointer, align=1), wide), q_lanes)
                pairs = builder.add(builder.shuffle_vector(product, product, even),
                                    builder.shuffle_vector(product, product, odd))
                builder.store(builder.add(builder.load(sums[r]), pairs), sums[r])
        reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [half]),
                                                "llvm.vector.reduce.add.v16i32")
        totals = [cgutils.alloca_once_value(builder, builder.call(reduce, [builder.load(sum_)])) for sum_ in sums]
        with cgutils.for_range_slice(builder, builder.mul(steps, i64(_LANES)), dim, i64(1), inc=True) as (j, _):
            q_value = builder.sext(builder.load(builder.gep(query, [j])), i32)
            for r in range(_GROUP):
                value = builder.mul(builder.sext(builder.load(builder.gep(rows[r], [j])), i32), q_value)
                builder.store(builder.add(builder.load(totals[r]), value), totals[r])
        return context.make_tuple(builder, result, [builder.load(total) for total in totals])

    return result(codes, first, q_row), codegen


@njit(cache=True, inline="always")
def _account(i, dot, q, scale, residual, q_scale, q_norm, slack, approx, heap, floors):
    """Row i's a_i into ``approx``; its lower bound into the part's running top k (``floors[q]`` = heap[0])."""
    a = scale * q_scale[q] * dot
    approx[q, i] = a
    lower = a - residual * q_norm[q] - slack[q]
    if lower > floors[q]:
        _heap_replace_min(heap[q], lower)
        floors[q] = heap[q, 0]


@njit(parallel=True, cache=True)
def _screen(codes, scales, residuals, q_codes, q_scale, q_norm, slack, approx, heaps):
    """``approx`` (Q, N) float32 ← a_i per query; ``heaps`` (parts, Q, k) ← each part's k largest L_i.

    ``codes`` (N, D) int8 and ``q_codes`` (Q, D) int16 C-contiguous; |c_i · qc| < 2**31."""
    n, dim = codes.shape
    n_queries = q_codes.shape[0]
    n_parts = heaps.shape[0]
    per_part = (n + n_parts - 1) // n_parts
    per_part += -per_part % _GROUP
    ahead = _GROUP * max(1, _PREFETCH_BYTES // (_GROUP * max(1, dim)))
    flat = codes.reshape(-1)
    for part in prange(n_parts):
        start = min(n, part * per_part)
        stop = min(n, start + per_part)
        grouped = start + (stop - start) // _GROUP * _GROUP
        heap = heaps[part]
        floors = heap[:, 0].copy()
        for i in range(start, grouped, _GROUP):
            if i + ahead + _GROUP <= stop:
                for byte in range(0, _GROUP * dim, 64):
                    _prefetch(flat, (i + ahead) * dim + byte)
            for q in range(n_queries):
                d0, d1, d2, d3 = _dot4_rows(codes, i, q_codes[q])
                _account(i, d0, q, np.float64(scales[i]), np.float64(residuals[i]),
                         q_scale, q_norm, slack, approx, heap, floors)
                _account(i + 1, d1, q, np.float64(scales[i + 1]), np.float64(residuals[i + 1]),
                         q_scale, q_norm, slack, approx, heap, floors)
                _account(i + 2, d2, q, np.float64(scales[i + 2]), np.float64(residuals[i + 2]),
                         q_scale, q_norm, slack, approx, heap, floors)
                _account(i + 3, d3, q, np.float64(scales[i + 3]), np.float64(residuals[i + 3]),
                         q_scale, q_norm, slack, approx, heap, floors)
        for i in range(grouped, stop):
            row = codes[i]
            for q in range(n_queries):
                q_row = q_codes[q]
                dot = 0
                for j in range(dim):
                    dot += np.int32(row[j]) * np.int32(q_row[j])
                _account(i, np.int32(dot), q, np.float64(scales[i]), np.float64(residuals[i]),
                         q_scale, q_norm, slack, approx, heap, floors)


@njit(cache=True)
def _collect(approx, residuals, q_norm, slack, bound, out):
    """Rows with U_i ≥ ``bound`` into ``out``, ascending; returns their count.

    Serial on purpose: one pass over 8 bytes a row takes about a millisecond per million rows, less than a
    parallel region costs on a busy machine (each waits for its slowest thread)."""
    count = 0
    for i in range(approx.shape[0]):
        # approx is a_i rounded to float32: slack covers that rounding
        if np.float64(approx[i]) + np.float64(residuals[i]) * q_norm + slack >= bound:
            out[count] = i
            count += 1
    return count


# ---- GPU ----------------------------------------------------------------------------------------

CUDA_QUERIES = 16  # queries per launch of screen_int8 (its accumulators are registers)
_CUDA_THREADS = 256
_CUDA_SHARED_BYTES = 48 * 1024  # the queries' int16 codes live in shared memory, within the default limit

CUDA_SOURCE = r"""
#define MAX_QUERIES 16
/* One warp per row (grid-stride): a_i = s_i * sigma_q * (c_i . qc) for every query q of the launch, the
   integer dot exact in int32; approx[q, i] = (float)a_i and lower[q, i] = L_i rounded down to float. */
extern "C" __global__ void screen_int8(
    const signed char* __restrict__ codes, const float* __restrict__ scales, const float* __restrict__ residuals,
    const long long n, const int dim,
    const short* __restrict__ q_codes, const double* __restrict__ q_scale, const double* __restrict__ q_norm,
    const double* __restrict__ slack, const int n_queries,
    float* __restrict__ approx, float* __restrict__ lower)
{
    extern __shared__ short shared_q[];  /* (n_queries, dim) */
    for (int t = threadIdx.x; t < n_queries * dim; t += blockDim.x) shared_q[t] = q_codes[t];
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < n; row += warps) {
        const signed char* code = codes + row * dim;
        int acc[MAX_QUERIES];
#pragma unroll
        for (int q = 0; q < MAX_QUERIES; ++q) acc[q] = 0;
        if ((dim & 3) == 0) {  /* rows start 4-byte aligned: one char4 per lane per step, coalesced */
            const char4* code4 = (const char4*)code;
            for (int j4 = lane; j4 < (dim >> 2); j4 += 32) {
                const char4 c = code4[j4];
                const int j = j4 << 2;
#pragma unroll
                for (int q = 0; q < MAX_QUERIES; ++q) {
                    if (q < n_queries) {
                        const short* qq = shared_q + q * dim + j;
                        acc[q] += (int)c.x * qq[0] + (int)c.y * qq[1] + (int)c.z * qq[2] + (int)c.w * qq[3];
                    }
                }
            }
        } else {
            for (int j = lane; j < dim; j += 32) {
                const int c = code[j];
#pragma unroll
                for (int q = 0; q < MAX_QUERIES; ++q) {
                    if (q < n_queries) acc[q] += c * shared_q[q * dim + j];
                }
            }
        }
#pragma unroll
        for (int q = 0; q < MAX_QUERIES; ++q) {
            for (int offset = 16; offset > 0; offset >>= 1) acc[q] += __shfl_xor_sync(0xffffffffu, acc[q], offset);
        }
        if (lane < n_queries) {  /* lane q writes query q (acc indexed by constants only: it stays in registers) */
            int dot = 0;
#pragma unroll
            for (int q = 0; q < MAX_QUERIES; ++q) {
                if (q == lane) dot = acc[q];
            }
            const double a = (double)scales[row] * q_scale[lane] * (double)dot;
            const long long at = (long long)lane * n + row;
            approx[at] = (float)a;
            lower[at] = __double2float_rd(a - (double)residuals[row] * q_norm[lane] - slack[lane]);
        }
    }
}
"""


class DeviceQuantized(NamedTuple):
    """A :class:`QuantizedRows` held on a CUDA device (CuPy arrays)."""

    codes: object  # (N, D) int8
    scales: object  # (N,) float32
    residuals: object  # (N,) float32
    max_norm: float
    device: str  # "cuda:N"


_RESIDENT: dict[tuple, tuple[object, DeviceQuantized]] = {}  # one entry: the index most recently made resident


def resident_quantized(quantized: QuantizedRows, device: str = "cuda") -> DeviceQuantized:
    """``quantized`` copied to ``device`` once per process: returned again for the same memory-mapped codes
    file (path, offset, size, mtime) or the same arrays object; another index releases it."""
    import cupy

    from clipengine.kernels.cuda import cupy_device

    codes = quantized.codes
    with cupy_device(device) as dev:
        name = f"cuda:{dev.id}"
        key = (*_identity(codes), float(quantized.max_norm), name)
        entry = _RESIDENT.get(key)
        if entry is not None and (entry[0] is None or entry[0]() is codes):
            return entry[1]
        _RESIDENT.clear()
        n, dim = codes.shape
        d_codes = cupy.empty((n, dim), dtype=cupy.int8)
        step = max(1, (256 << 20) // max(1, dim))  # 256 MiB of codes per copy
        for start in range(0, n, step):
            d_codes[start:start + step] = cupy.asarray(np.ascontiguousarray(codes[start:start + step]))
        resident = DeviceQuantized(d_codes, cupy.asarray(np.ascontiguousarray(quantized.scales, np.float32)),
                                   cupy.asarray(np.ascontiguousarray(quantized.residuals, np.float32)),
                                   float(quantized.max_norm), name)
        owner = None if isinstance(codes, np.memmap) else weakref.ref(codes)
        _RESIDENT[key] = (owner, resident)
        return resident


def release_resident_quantized() -> None:
    """Drop the resident index (its memory returns to CuPy's pool)."""
    _RESIDENT.clear()


def _identity(array) -> tuple:
    if isinstance(array, np.memmap) and getattr(array, "filename", None):
        stat = os.stat(array.filename)
        return ("file", os.path.realpath(array.filename), int(array.offset), stat.st_size, stat.st_mtime_ns,
                array.shape)
    return ("object", id(array), array.shape)


def _cuda_kernel():
    import cupy

    return cupy.RawKernel(CUDA_SOURCE, "screen_int8", options=("--fmad=false",))  # a_i and L_i as the CPU rounds them


def _topk_quantized_cuda(quantized, embeddings, queries, k, q_max, device, indices, scores, counts):
    """The GPU screening for every query (passes of :data:`CUDA_QUERIES`), then the exact re-rank on the host."""
    import cupy

    from clipengine.kernels.cuda import cupy_device

    with cupy_device(device):
        resident = resident_quantized(quantized, device)
        n, dim = resident.codes.shape
        per_launch = max(1, min(CUDA_QUERIES, _CUDA_SHARED_BYTES // (2 * dim)))
        kernel = _cuda_kernel()
        properties = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        blocks = int(min(max(1, (n * 32 + _CUDA_THREADS - 1) // _CUDA_THREADS), 32 * properties["multiProcessorCount"]))
        for first in range(0, len(queries), per_launch):
            block = np.asarray(queries[first:first + per_launch], dtype=np.float64)
            q_codes, q_scale, q_norm, slack = _quantize_queries(block, q_max, resident.max_norm)
            count = len(block)
            approx = cupy.empty((count, n), dtype=cupy.float32)
            lower = cupy.empty((count, n), dtype=cupy.float32)
            kernel((blocks,), (_CUDA_THREADS,),
                   (resident.codes, resident.scales, resident.residuals, np.int64(n), np.int32(dim),
                    cupy.asarray(q_codes), cupy.asarray(q_scale), cupy.asarray(q_norm), cupy.asarray(slack),
                    np.int32(count), approx, lower),
                   shared_mem=2 * count * dim)
            # the k-th largest lower bound of each query (≤ the CPU's: the device rounded them down)
            bounds = cupy.partition(lower, n - k, axis=1)[:, n - k].astype(cupy.float64)
            residuals64 = resident.residuals.astype(cupy.float64)
            for j in range(count):
                upper = approx[j].astype(cupy.float64) + residuals64 * q_norm[j] + slack[j]
                candidates = cupy.flatnonzero(upper >= bounds[j]).get().astype(np.int64)
                counts[first + j] = len(candidates)
                indices[first + j], scores[first + j] = _rerank(embeddings, candidates, block[j], k)
