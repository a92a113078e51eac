"""Zero-shot labelling: embeddings × prompt embeddings → per-attribute label, probability, margin.

One signature for the CPU (NumPy float32 GEMM + one Numba pass) and the GPU (CuPy
GEMM + one fused ``RawKernel`` pass). The work is streamed over rows in chunks of
``chunk_rows`` so memory stays bounded whatever N is (``embeddings`` may be a
``numpy.memmap``); only the (N, A) outputs are allocated whole.

On the CPU (GEMM path: several prompt rows per class, or many classes) as many threads as
``numba.get_num_threads()`` take chunks of rows in turn and label them in blocks small enough
to stay in a core's cache: a single-threaded BLAS GEMM of the block, then a serial Numba pass
over the (P, rows) similarities it just wrote, still in cache. No thread waits for another
between the GEMM and the pass (a pool of BLAS threads followed by a pool of Numba threads
hands the cores back and forth per chunk, each side spinning down while the other starts),
and the similarities never go to memory. Meanwhile BLAS is limited to one thread process-wide
(BLAS has a single, global thread count), and restored after.

Layout of the class side, all flat:

- ``prompt_matrix`` (P, D) float32: prompt (or pre-aggregated class) embeddings, L2-normalized;
- ``prompt_offsets`` (C + 1,) int64: class c owns prompt rows ``prompt_offsets[c]:prompt_offsets[c+1]``;
- ``class_offsets`` (A + 1,) int64: attribute a owns classes ``class_offsets[a]:class_offsets[a+1]``;
- ``reduce`` (C,) int8: how a class's prompt logits become one class logit
  (:data:`REDUCE_MAX`, :data:`REDUCE_MEAN`, :data:`REDUCE_LOGSUMEXP`, :data:`REDUCE_TOPM`);
  with one prompt per class every reduction is the identity, which is how the
  linear strategies (``naive``, ``mean``: aggregated once, before the kernel) run;
- ``top_m`` (C,) int32: m of :data:`REDUCE_TOPM` per class (≤ :data:`MAX_TOP_M`).

For row i and class c with prompt similarities s_j (cosine) and scale t (CLIP's
logit scale), the class logit is ``t·max s_j``, ``t·mean s_j``,
``log(mean_j exp(t·s_j))`` or ``t·mean(top-m s_j)``. Then, per attribute, a softmax
over its classes: ``labels`` = argmax (the first on ties, as ``numpy.argmax``),
``probs`` = the winner's probability, ``margins`` = winner's minus runner-up's
probability (1 for a single-class attribute, 0 on a tie).

On the CPU, when every class has one row (``naive``, ``mean``), rows are compared with each
attribute's classes minus its first class (softmax is shift-invariant): C − A dot products
instead of C, one per binary attribute; up to :data:`FUSED_MAX_ROWS` of them run inside the
Numba pass itself (no GEMM, no second pass over memory).

Inputs must be finite. This module never imports the engine.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import threading
from typing import Callable

import numba
import numpy as np
from numba import njit, prange

REDUCE_MAX = 0
REDUCE_MEAN = 1
REDUCE_LOGSUMEXP = 2
REDUCE_TOPM = 3
MAX_TOP_M = 32
CHUNK_BYTES = 128 * 2**20  # scratch per chunk (the (rows, P) block, plus a float32 copy of the rows if needed)
MAX_CHUNK_ROWS = 262_144  # GPU and fused CPU path: few large launches
MIN_CHUNK_ROWS = 1_024
BLOCK_BYTES = 2**20  # one thread's (P, rows) similarities: well inside a core's L2 while its pass reads them back
MIN_BLOCK_ROWS = 64
MAX_BLOCK_ROWS = 4_096  # few prompt rows: a taller block only makes the row copies longer
BLOCKS_PER_TASK = 32  # at most, in the rows a thread takes at a time (and one progress tick)
MIN_THREAD_ROWS = 256  # fewer rows than this per thread: one thread (starting another costs more)
TASKS_PER_THREAD = 4  # at least, when there are enough rows: tasks are shared out as threads become free
FUSED_MAX_ROWS = 32  # up to this many class rows the dot products run inside the Numba pass, no GEMM
_ROWS_PER_TASK = 64  # rows one task of the fused pass handles (amortizes its scratch)


def cuda_available() -> bool:
    """True when CuPy is installed and sees at least one CUDA device (imports CuPy only if installed)."""
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def label_segments(
    embeddings: np.ndarray,
    prompt_matrix: np.ndarray,
    prompt_offsets: np.ndarray,
    class_offsets: np.ndarray,
    logit_scale: float,
    *,
    reduce: np.ndarray | None = None,
    top_m: np.ndarray | int = 1,
    chunk_rows: int | None = None,
    device: str = "cpu",
    on_chunk: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label every row of ``embeddings`` (N, D) float32 for every attribute.

    Returns ``labels`` (N, A) int32 (class index within its attribute), ``probs``
    (N, A) float32 and ``margins`` (N, A) float32. ``device`` is ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"``; ``on_chunk(rows_done_in_chunk)`` is called after each chunk
    (progress bars), on the calling thread. ``chunk_rows`` None sizes chunks itself (see
    :func:`auto_chunk_rows`, :func:`auto_block_rows`): peak extra memory is about ``chunk_rows × P``
    floats (plus ``chunk_rows × D`` when rows need a float32 copy), and on the CPU's GEMM path
    ``min(chunk_rows, auto_block_rows(P)) × (P + D)`` per thread.
    """
    prompt_matrix, prompt_offsets, class_offsets, reduce, top_m = _check_inputs(
        embeddings, prompt_matrix, prompt_offsets, class_offsets, reduce, top_m
    )
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError("chunk_rows must be ≥ 1")
    n = embeddings.shape[0]
    n_attributes = class_offsets.shape[0] - 1
    labels = np.empty((n, n_attributes), dtype=np.int32)
    probs = np.empty((n, n_attributes), dtype=np.float32)
    margins = np.empty((n, n_attributes), dtype=np.float32)
    if n == 0:
        return labels, probs, margins
    args = (prompt_offsets, class_offsets, reduce, top_m, float(logit_scale))
    from clipengine.kernels.cuda import cupy_device, parse_device

    if parse_device(device)[0] == "cpu":
        _label_cpu(embeddings, prompt_matrix, *args, chunk_rows, labels, probs, margins, on_chunk)
    else:
        if chunk_rows is None:
            chunk_rows = auto_chunk_rows(embeddings, prompt_matrix.shape[0])
        with cupy_device(device):
            _label_cuda(embeddings, prompt_matrix, *args, chunk_rows, labels, probs, margins, on_chunk)
    return labels, probs, margins


def auto_chunk_rows(embeddings: np.ndarray, n_prompt_rows: int) -> int:
    """Rows per chunk so that one chunk's scratch stays near :data:`CHUNK_BYTES`."""
    copies = embeddings.dtype != np.float32 or not embeddings.flags.c_contiguous
    per_row = 4 * (n_prompt_rows + (embeddings.shape[1] if copies else 0))
    return int(min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, CHUNK_BYTES // max(1, per_row))))


def auto_block_rows(n_columns: int) -> int:
    """Rows per CPU GEMM block so that one thread's (``n_columns``, rows) float32 similarities fit
    :data:`BLOCK_BYTES`."""
    return int(min(MAX_BLOCK_ROWS, max(MIN_BLOCK_ROWS, BLOCK_BYTES // (4 * max(1, n_columns)))))


def _check_inputs(embeddings, prompt_matrix, prompt_offsets, class_offsets, reduce, top_m):
    if embeddings.ndim != 2 or prompt_matrix.ndim != 2:
        raise ValueError("embeddings and prompt_matrix must be 2-D")
    if embeddings.shape[1] != prompt_matrix.shape[1]:
        raise ValueError(f"embedding width {embeddings.shape[1]} ≠ prompt width {prompt_matrix.shape[1]}")
    prompt_matrix = np.ascontiguousarray(prompt_matrix, dtype=np.float32)
    prompt_offsets = np.ascontiguousarray(prompt_offsets, dtype=np.int64)
    class_offsets = np.ascontiguousarray(class_offsets, dtype=np.int64)
    n_classes = prompt_offsets.shape[0] - 1
    if n_classes < 1 or prompt_offsets[0] != 0 or prompt_offsets[-1] != prompt_matrix.shape[0]:
        raise ValueError("prompt_offsets must run from 0 to the number of prompt rows")
    if np.any(np.diff(prompt_offsets) < 1):
        raise ValueError("every class needs at least one prompt row")
    if class_offsets.shape[0] < 2 or class_offsets[0] != 0 or class_offsets[-1] != n_classes:
        raise ValueError("class_offsets must run from 0 to the number of classes")
    if np.any(np.diff(class_offsets) < 1):
        raise ValueError("every attribute needs at least one class")
    if reduce is None:
        reduce = np.full(n_classes, REDUCE_MAX, dtype=np.int8)
    reduce = np.ascontiguousarray(reduce, dtype=np.int8)
    if reduce.shape != (n_classes,) or reduce.min() < REDUCE_MAX or reduce.max() > REDUCE_TOPM:
        raise ValueError("reduce must be (C,) codes REDUCE_MAX..REDUCE_TOPM")
    top_m = np.ascontiguousarray(np.broadcast_to(np.asarray(top_m, dtype=np.int32), (n_classes,)))
    if top_m.min() < 1 or top_m.max() > MAX_TOP_M:
        raise ValueError(f"top_m must be within 1..{MAX_TOP_M}")
    return prompt_matrix, prompt_offsets, class_offsets, reduce, top_m


# ---- CPU ---------------------------------------------------------------------------------------


def _label_cpu(embeddings, prompt_matrix, prompt_offsets, class_offsets, reduce, top_m, scale,
               chunk_rows, labels, probs, margins, on_chunk):
    n = embeddings.shape[0]
    linear = prompt_matrix.shape[0] == prompt_offsets.shape[0] - 1  # one row per class
    if linear:
        # softmax is shift-invariant: against each attribute's first class, an attribute of C classes
        # needs C - 1 dot products (a binary one, one) instead of C: a GEMM with fewer columns
        matrix = _relative_to_first_class(prompt_matrix, class_offsets)
    else:
        matrix = prompt_matrix
    if linear and matrix.shape[0] <= FUSED_MAX_ROWS:
        # few columns: one fused pass (dot products + softmax per row) beats a skinny GEMM plus a
        # second pass
        rows = min(chunk_rows or auto_chunk_rows(embeddings, matrix.shape[0]), n)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            block = np.ascontiguousarray(embeddings[start:stop], dtype=np.float32)
            _label_fused_rows(block, matrix, class_offsets, np.float64(scale),
                              labels[start:stop], probs[start:stop], margins[start:stop])
            if on_chunk is not None:
                on_chunk(stop - start)
        return
    n_columns, n_classes = matrix.shape[0], prompt_offsets.shape[0] - 1
    threads = numba.get_num_threads()
    # few rows: a block per thread (none below MIN_THREAD_ROWS: starting the thread would cost more)
    block_rows = min(auto_block_rows(n_columns), max(MIN_THREAD_ROWS, -(-n // threads)), chunk_rows or n)
    if chunk_rows is None:  # a few tasks per thread at least, so that a thread slowed down holds no one back
        blocks_per_task = -(-n // (block_rows * TASKS_PER_THREAD * threads))
        task_rows = block_rows * min(BLOCKS_PER_TASK, blocks_per_task)
    else:
        task_rows = chunk_rows
    scale = np.float64(scale)

    def label_rows(start: int, stop: int) -> None:
        """Rows ``start:stop`` block by block on the calling thread (its own scratch)."""
        sims = np.empty(n_columns * block_rows, dtype=np.float32)  # each block viewed C-contiguous (R, rows)
        logits = np.empty((n_classes, block_rows), dtype=np.float64)
        work = np.empty((1 + int(top_m.max()), block_rows), dtype=np.float32)  # (1 + m, rows)
        for low in range(start, stop, block_rows):
            high = min(low + block_rows, stop)
            block = np.ascontiguousarray(embeddings[low:high], dtype=np.float32)  # (r, D); reads a memmap chunk
            out = sims[: n_columns * (high - low)].reshape(n_columns, high - low)
            np.matmul(matrix, block.T, out=out)  # (R, r) cosines (or their differences), one column per row
            if linear:
                _label_relative_columns(out, class_offsets, scale, labels[low:high], probs[low:high],
                                        margins[low:high])
            else:
                _label_columns(out, prompt_offsets, class_offsets, reduce, top_m, scale, logits, work,
                               labels[low:high], probs[low:high], margins[low:high])

    _run_row_tasks(label_rows, n, task_rows, on_chunk)


def _run_row_tasks(label_rows: Callable[[int, int], None], n: int, task_rows: int,
                   on_chunk: Callable[[int], None] | None) -> None:
    """``label_rows(start, stop)`` over ``0:n`` in tasks of ``task_rows``, on ``numba.get_num_threads()``
    threads that each take the next task when done (a busy core falls behind without holding the rest
    back); ``on_chunk`` is called in order, on the calling thread. BLAS is single-threaded meanwhile:
    every thread runs its own GEMMs."""
    spans = [(start, min(start + task_rows, n)) for start in range(0, n, task_rows)]
    workers = min(numba.get_num_threads(), len(spans))
    with _single_threaded_blas():
        if workers <= 1:
            for start, stop in spans:
                label_rows(start, stop)
                if on_chunk is not None:
                    on_chunk(stop - start)
            return
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(workers, thread_name_prefix="clipengine-label")
        try:
            done = pool.map(lambda span: label_rows(*span), spans)
            for (start, stop), _ in zip(spans, done):
                if on_chunk is not None:
                    on_chunk(stop - start)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limit = None


@contextlib.contextmanager
def _single_threaded_blas():
    """BLAS on one thread while any caller is inside; the first one in saves the thread counts, the last
    one out restores them (two callers in parallel must not restore each other's limit)."""
    global _blas_users, _blas_limit
    with _blas_lock:
        if _blas_users == 0:
            _release_openblas_control()
            _blas_limit = _blas_controller().limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _release_openblas_control()
                _blas_limit.restore_original_limits()
                _release_openblas_control()
                _blas_limit = None


def _release_openblas_control():
    """threadpoolctl lets one thread at a time set OpenBLAS's process-wide thread count (the first to
    try, until it lets go); the last caller out, which restores the count, may not be the first one in."""
    import threadpoolctl

    release = getattr(getattr(threadpoolctl, "OpenBLASController", None), "clear_controlling_thread", None)
    if release is not None:
        release(force=True)


@functools.cache
def _blas_controller():
    """The process's BLAS libraries, looked up once (NumPy's is loaded with NumPy)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _relative_to_first_class(class_matrix: np.ndarray, class_offsets: np.ndarray) -> np.ndarray:
    """(C, D) → (C - A, D): for each attribute, its classes after the first minus the first."""
    rows = []
    for a in range(class_offsets.shape[0] - 1):
        first, stop = class_offsets[a], class_offsets[a + 1]
        rows.append(class_matrix[first + 1 : stop].astype(np.float64) - class_matrix[first].astype(np.float64))
    return np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)


@njit(inline="always")
def _softmax_top2(logits, n_classes):
    """(label, winner probability, winner minus runner-up) of ``logits[:n_classes]``."""
    best = logits[0]
    label = 0
    for k in range(1, n_classes):
        if logits[k] > best:  # strict: the first of tied classes wins, as numpy.argmax
            best = logits[k]
            label = k
    total = 1.0  # the winner contributes exp(0)
    second = -np.inf
    second_weight = 0.0
    for k in range(n_classes):
        if k != label:
            weight = np.exp(logits[k] - best)
            total += weight
            if logits[k] > second:
                second = logits[k]
                second_weight = weight
    return label, 1.0 / total, (1.0 - second_weight) / total


@njit(inline="always")
def _binary_softmax(gap, i, a, labels, probs, margins):
    """:func:`_softmax_top2` of two logits given their difference ``gap`` = second − first (the same
    operations: first minus second is exactly minus ``gap``), written to row ``i``, attribute ``a``."""
    if gap > 0.0:
        labels[i, a] = 1
        weight = np.exp(-gap)
    else:
        labels[i, a] = 0
        weight = np.exp(gap)
    total = 1.0 + weight
    probs[i, a] = 1.0 / total
    margins[i, a] = (1.0 - weight) / total


@njit(nogil=True, cache=True)
def _label_relative_columns(sims, class_offsets, scale, labels, probs, margins):
    """``sims`` (C − A, r): per attribute, cosines of its classes 2.. minus its class 1's; one column per row."""
    n = sims.shape[1]
    n_attributes = class_offsets.shape[0] - 1
    max_classes = 1
    for a in range(n_attributes):
        max_classes = max(max_classes, class_offsets[a + 1] - class_offsets[a])
    logits = np.empty(max_classes, dtype=np.float64)
    logits[0] = 0.0
    for a in range(n_attributes):
        n_classes = class_offsets[a + 1] - class_offsets[a]
        base = class_offsets[a] - a  # this attribute's first row of sims
        if n_classes == 2:
            row = sims[base]
            for i in range(n):
                _binary_softmax(scale * row[i], i, a, labels, probs, margins)
            continue
        for i in range(n):
            for k in range(1, n_classes):
                logits[k] = scale * sims[base + k - 1, i]
            label, prob, margin = _softmax_top2(logits, n_classes)
            labels[i, a] = label
            probs[i, a] = prob
            margins[i, a] = margin


@njit(nogil=True, cache=True)
def _label_columns(sims, prompt_offsets, class_offsets, reduce, top_m, scale, logits, work,
                   labels, probs, margins):
    """``sims`` (P, r): cosines to every prompt row, one column per image row; classes reduce their
    segments of rows first. Scratch: ``logits`` (C, ≥ r) float64, ``work`` (1 + max m, ≥ r) float32.

    Each class's reduction runs along whole rows of ``sims`` (the r images side by side, which vectorizes),
    with the same operations in the same order per image as a per-image loop over the segment."""
    n = sims.shape[1]
    n_attributes = class_offsets.shape[0] - 1
    best = work[0]
    for c in range(prompt_offsets.shape[0] - 1):
        p0, p1 = prompt_offsets[c], prompt_offsets[c + 1]
        count = p1 - p0
        code = reduce[c]
        out = logits[c]
        if code == REDUCE_MAX or code == REDUCE_LOGSUMEXP:
            first = sims[p0]
            for i in range(n):
                best[i] = first[i]
            for j in range(p0 + 1, p1):
                row = sims[j]
                for i in range(n):
                    if row[i] > best[i]:
                        best[i] = row[i]
            if code == REDUCE_MAX:
                for i in range(n):
                    out[i] = scale * best[i]
                continue
            for i in range(n):  # log-mean-exp of scaled logits, shifted by the largest
                out[i] = 0.0
            for j in range(p0, p1):
                row = sims[j]
                for i in range(n):
                    out[i] += np.exp(scale * (row[i] - best[i]))
            for i in range(n):
                out[i] = scale * best[i] + np.log(out[i] / count)
        elif code == REDUCE_MEAN:
            for i in range(n):
                out[i] = 0.0
            for j in range(p0, p1):
                row = sims[j]
                for i in range(n):
                    out[i] += row[i]
            for i in range(n):
                out[i] = scale * out[i] / count
        else:  # top-m mean: each image's m largest, kept in descending order (kept[k, i], k < m)
            keep = min(top_m[c], count)
            carry = work[0]
            kept = work[1 : keep + 1]
            for k in range(keep):
                for i in range(n):
                    kept[k, i] = -np.inf
            for j in range(p0, p1):
                row = sims[j]
                for i in range(n):
                    carry[i] = row[i]
                for k in range(keep):  # the value sinks to its place, the smallest kept one drops out
                    slot = kept[k]
                    for i in range(n):
                        if carry[i] > slot[i]:
                            value = slot[i]
                            slot[i] = carry[i]
                            carry[i] = value
            for i in range(n):
                out[i] = 0.0
            for k in range(keep):  # largest first, as a per-image insertion sort would add them
                slot = kept[k]
                for i in range(n):
                    out[i] += slot[i]
            for i in range(n):
                out[i] = scale * out[i] / keep
    max_classes = 1
    for a in range(n_attributes):
        max_classes = max(max_classes, class_offsets[a + 1] - class_offsets[a])
    attribute_logits = np.empty(max_classes, dtype=np.float64)
    for a in range(n_attributes):
        c0 = class_offsets[a]
        n_classes = class_offsets[a + 1] - c0
        if n_classes == 2:
            first, second = logits[c0], logits[c0 + 1]
            for i in range(n):
                _binary_softmax(second[i] - first[i], i, a, labels, probs, margins)
            continue
        for i in range(n):
            for k in range(n_classes):
                attribute_logits[k] = logits[c0 + k, i]
            label, prob, margin = _softmax_top2(attribute_logits, n_classes)
            labels[i, a] = label
            probs[i, a] = prob
            margins[i, a] = margin


@njit(parallel=True, cache=True, fastmath=True)
def _label_fused_rows(block, relative, class_offsets, scale, labels, probs, margins):
    """``block`` (r, D) rows, ``relative`` (R, D) with R = C − A (see ``_relative_to_first_class``):
    dot products four class rows at a time (each row element loaded once per four), then softmax."""
    n, d = block.shape
    n_rows = relative.shape[0]
    n_attributes = class_offsets.shape[0] - 1
    max_classes = max(1, np.max(np.diff(class_offsets))) if n_attributes else 1
    n_tasks = (n + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(n_tasks):
        sims = np.empty(max(n_rows, 1), dtype=np.float32)
        logits = np.empty(max_classes, dtype=np.float64)
        logits[0] = 0.0
        for i in range(task * _ROWS_PER_TASK, min(n, (task + 1) * _ROWS_PER_TASK)):
            row = block[i]
            r = 0
            while r + 4 <= n_rows:
                m0, m1, m2, m3 = relative[r], relative[r + 1], relative[r + 2], relative[r + 3]
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for j in range(d):
                    x = row[j]
                    a0 += x * m0[j]
                    a1 += x * m1[j]
                    a2 += x * m2[j]
                    a3 += x * m3[j]
                sims[r] = a0
                sims[r + 1] = a1
                sims[r + 2] = a2
                sims[r + 3] = a3
                r += 4
            while r < n_rows:
                m0 = relative[r]
                a0 = np.float32(0.0)
                for j in range(d):
                    a0 += row[j] * m0[j]
                sims[r] = a0
                r += 1
            for a in range(n_attributes):
                n_classes = class_offsets[a + 1] - class_offsets[a]
                base = class_offsets[a] - a
                for k in range(1, n_classes):
                    logits[k] = scale * sims[base + k - 1]
                label, prob, margin = _softmax_top2(logits, n_classes)
                labels[i, a] = label
                probs[i, a] = prob
                margins[i, a] = margin


# ---- GPU ---------------------------------------------------------------------------------------

CUDA_SOURCE = r"""
#define MAX_TOP_M 32
extern "C" __global__ void label_segments(
    const float* __restrict__ sims, const long long n, const long long n_prompts,
    const long long* __restrict__ prompt_offsets, const long long* __restrict__ class_offsets,
    const signed char* __restrict__ reduce, const int* __restrict__ top_m,
    const long long n_attributes, const float scale,
    int* __restrict__ labels, float* __restrict__ probs, float* __restrict__ margins)
{
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * n_attributes) return;
    long long i = idx / n_attributes;
    long long a = idx - i * n_attributes;
    const float* row = sims + i * n_prompts;
    float scratch[MAX_TOP_M];
    const double neg_inf = __longlong_as_double(0xfff0000000000000ULL);  /* no math.h under NVRTC */
    double best = neg_inf, second = neg_inf, total = 0.0;
    int label = 0;
    long long c0 = class_offsets[a];
    for (long long c = c0; c < class_offsets[a + 1]; ++c) {
        long long p0 = prompt_offsets[c], p1 = prompt_offsets[c + 1];
        int count = (int)(p1 - p0);
        double v;
        if (reduce[c] == 0) {
            float m = row[p0];
            for (long long j = p0 + 1; j < p1; ++j) m = fmaxf(m, row[j]);
            v = (double)scale * m;
        } else if (reduce[c] == 1) {
            double s = 0.0;
            for (long long j = p0; j < p1; ++j) s += row[j];
            v = (double)scale * s / count;
        } else if (reduce[c] == 2) {
            float m = row[p0];
            for (long long j = p0 + 1; j < p1; ++j) m = fmaxf(m, row[j]);
            double s = 0.0;
            for (long long j = p0; j < p1; ++j) s += exp((double)scale * ((double)row[j] - m));
            v = (double)scale * m + log(s / count);
        } else {
            int keep = min(top_m[c], count), filled = 0;
            for (long long j = p0; j < p1; ++j) {
                float value = row[j];
                int k;
                if (filled < keep) { k = filled; ++filled; }
                else if (value > scratch[keep - 1]) { k = keep - 1; }
                else continue;
                while (k > 0 && scratch[k - 1] < value) { scratch[k] = scratch[k - 1]; --k; }
                scratch[k] = value;
            }
            double s = 0.0;
            for (int k = 0; k < keep; ++k) s += scratch[k];
            v = (double)scale * s / keep;
        }
        if (v > best) {
            total = total * exp(best - v) + 1.0;  /* exp(-inf) = 0 on the first class */
            second = best; best = v; label = (int)(c - c0);
        } else {
            total += exp(v - best);
            if (v > second) second = v;
        }
    }
    labels[idx] = label;
    probs[idx] = (float)(1.0 / total);
    margins[idx] = (float)((1.0 - exp(second - best)) / total);
}
"""


@functools.cache
def _cuda_kernel():
    import cupy

    return cupy.RawKernel(CUDA_SOURCE, "label_segments")


def _label_cuda(embeddings, prompt_matrix, prompt_offsets, class_offsets, reduce, top_m, scale,
                chunk_rows, labels, probs, margins, on_chunk):
    import cupy

    kernel = _cuda_kernel()
    n = embeddings.shape[0]
    n_attributes = class_offsets.shape[0] - 1
    rows = min(chunk_rows, n)
    d_prompts_t = cupy.asarray(np.ascontiguousarray(prompt_matrix.T))  # (D, P)
    d_prompt_offsets = cupy.asarray(prompt_offsets)
    d_class_offsets = cupy.asarray(class_offsets)
    d_reduce = cupy.asarray(reduce)
    d_top_m = cupy.asarray(top_m)
    d_sims = cupy.empty((rows, prompt_matrix.shape[0]), dtype=cupy.float32)
    d_labels = cupy.empty((rows, n_attributes), dtype=cupy.int32)
    d_probs = cupy.empty((rows, n_attributes), dtype=cupy.float32)
    d_margins = cupy.empty((rows, n_attributes), dtype=cupy.float32)
    threads = 256
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        r = stop - start
        block = cupy.asarray(np.ascontiguousarray(embeddings[start:stop], dtype=np.float32))
        sims = d_sims[:r]
        cupy.matmul(block, d_prompts_t, out=sims)
        total = r * n_attributes
        kernel(((total + threads - 1) // threads,), (threads,),
               (sims, np.int64(r), np.int64(prompt_matrix.shape[0]), d_prompt_offsets, d_class_offsets,
                d_reduce, d_top_m, np.int64(n_attributes), np.float32(scale),
                d_labels, d_probs, d_margins))
        labels[start:stop] = d_labels[:r].get()
        probs[start:stop] = d_probs[:r].get()
        margins[start:stop] = d_margins[:r].get()
        if on_chunk is not None:
            on_chunk(r)
