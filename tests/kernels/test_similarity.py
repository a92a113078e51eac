"""label_segments (Numba CPU, CuPy GPU) against a plain NumPy reference."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy.special import logsumexp

from clipengine.kernels import similarity as sim
from clipengine.kernels.similarity import (
    REDUCE_LOGSUMEXP,
    REDUCE_MAX,
    REDUCE_MEAN,
    REDUCE_TOPM,
    label_segments,
)


def reference(embeddings, prompts, prompt_offsets, class_offsets, scale, reduce, top_m):
    """Float64 NumPy: per-class reduction, per-attribute softmax, argmax, top-2 margin."""
    sims = embeddings.astype(np.float64) @ prompts.astype(np.float64).T
    n, n_classes = sims.shape[0], len(prompt_offsets) - 1
    top_m = np.broadcast_to(np.asarray(top_m), (n_classes,))
    logits = np.empty((n, n_classes))
    for c in range(n_classes):
        seg = sims[:, prompt_offsets[c] : prompt_offsets[c + 1]]
        if reduce[c] == REDUCE_MAX:
            logits[:, c] = scale * seg.max(axis=1)
        elif reduce[c] == REDUCE_MEAN:
            logits[:, c] = scale * seg.mean(axis=1)
        elif reduce[c] == REDUCE_LOGSUMEXP:
            logits[:, c] = logsumexp(scale * seg, axis=1) - np.log(seg.shape[1])
        else:
            m = min(int(top_m[c]), seg.shape[1])
            logits[:, c] = scale * np.sort(seg, axis=1)[:, ::-1][:, :m].mean(axis=1)
    n_attributes = len(class_offsets) - 1
    labels = np.empty((n, n_attributes), np.int32)
    probs = np.empty((n, n_attributes))
    margins = np.empty((n, n_attributes))
    for a in range(n_attributes):
        block = logits[:, class_offsets[a] : class_offsets[a + 1]]
        p = np.exp(block - block.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        labels[:, a] = p.argmax(axis=1)
        ordered = np.sort(p, axis=1)[:, ::-1]
        probs[:, a] = ordered[:, 0]
        margins[:, a] = ordered[:, 0] - (ordered[:, 1] if block.shape[1] > 1 else 0.0)
    return labels, probs, margins


def normalized(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_problem(seed, n=500, d=24, prompts_per_class=(1, 5), classes_per_attribute=(1, 2, 3, 5)):
    rng = np.random.default_rng(seed)
    class_sizes = rng.integers(prompts_per_class[0], prompts_per_class[1] + 1, size=sum(classes_per_attribute))
    prompt_offsets = np.concatenate([[0], np.cumsum(class_sizes)])
    class_offsets = np.concatenate([[0], np.cumsum(classes_per_attribute)])
    reduce = rng.integers(REDUCE_MAX, REDUCE_TOPM + 1, size=len(class_sizes)).astype(np.int8)
    top_m = rng.integers(1, 4, size=len(class_sizes)).astype(np.int32)
    return (
        normalized(rng, (n, d)),
        normalized(rng, (int(prompt_offsets[-1]), d)),
        prompt_offsets,
        class_offsets,
        reduce,
        top_m,
    )


def assert_matches(got, want, *, atol=2e-5):
    labels, probs, margins = got
    ref_labels, ref_probs, ref_margins = want
    decided = ref_margins > 1e-4  # near-ties may legitimately flip in float32
    assert np.array_equal(labels[decided], ref_labels[decided])
    np.testing.assert_allclose(probs, ref_probs, atol=atol)
    np.testing.assert_allclose(margins, ref_margins, atol=atol)


@pytest.mark.parametrize("chunk_rows", [1, 37, 100_000])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_for_mixed_reductions(seed, chunk_rows):
    emb, prompts, po, co, reduce, top_m = random_problem(seed)
    scale = 100.0
    got = label_segments(emb, prompts, po, co, scale, reduce=reduce, top_m=top_m, chunk_rows=chunk_rows)
    assert got[0].dtype == np.int32 and got[1].dtype == np.float32 and got[2].dtype == np.float32
    assert got[0].shape == (emb.shape[0], len(co) - 1)
    assert_matches(got, reference(emb, prompts, po, co, scale, reduce, top_m))


@pytest.mark.parametrize(
    "classes_per_attribute",
    [(1, 2, 3, 5), (2,) * 22 + (11,), (2,) * 40 + (1, 7)],
    ids=["fused-few-rows", "fused-at-limit", "gemm-many-rows"],
)
@pytest.mark.parametrize("chunk_rows", [50, None])
def test_one_row_per_class_paths(classes_per_attribute, chunk_rows):
    """naive / mean: relative to each attribute's first class, fused (≤ FUSED_MAX_ROWS) or via GEMM."""
    emb, prompts, po, co, _, _ = random_problem(21, n=700, prompts_per_class=(1, 1),
                                                classes_per_attribute=classes_per_attribute)
    emb[:3] = 0.0
    reduce = np.zeros(len(po) - 1, np.int8)
    got = label_segments(emb, prompts, po, co, 100.0, chunk_rows=chunk_rows)
    assert_matches(got, reference(emb, prompts, po, co, 100.0, reduce, 1))
    assert (got[0][:3] == 0).all()


@pytest.mark.parametrize("code", [REDUCE_MAX, REDUCE_MEAN, REDUCE_LOGSUMEXP, REDUCE_TOPM])
def test_each_reduction_alone(code):
    emb, prompts, po, co, _, top_m = random_problem(7, n=300, prompts_per_class=(2, 7))
    reduce = np.full(len(po) - 1, code, np.int8)
    got = label_segments(emb, prompts, po, co, 30.0, reduce=reduce, top_m=top_m, chunk_rows=64)
    assert_matches(got, reference(emb, prompts, po, co, 30.0, reduce, top_m))


def test_hand_computed_strategies():
    # one image e = (1, 0); class 0 has prompts at cos 1 and 0, class 1 one prompt at cos 0.8; scale 10:
    # max → 10 vs 8; mean → 5 vs 8; logsumexp → log((e^10 + 1)/2) ≈ 9.307 vs 8; top-1 → as max.
    emb = np.array([[1.0, 0.0]], np.float32)
    prompts = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]], np.float32)
    po, co = np.array([0, 2, 3]), np.array([0, 2])
    expected = {
        REDUCE_MAX: (0, 10.0 - 8.0),
        REDUCE_MEAN: (1, 8.0 - 5.0),
        REDUCE_LOGSUMEXP: (0, np.log((np.exp(10.0) + 1.0) / 2.0) - 8.0),
        REDUCE_TOPM: (0, 10.0 - 8.0),
    }
    for code, (label, gap) in expected.items():
        labels, probs, margins = label_segments(emb, prompts, po, co, 10.0, reduce=np.full(2, code), top_m=1)
        p = 1.0 / (1.0 + np.exp(-gap))
        assert labels[0, 0] == label, code
        assert probs[0, 0] == pytest.approx(p, abs=1e-6)
        assert margins[0, 0] == pytest.approx(2 * p - 1, abs=1e-6)


def test_zero_vectors_give_uniform_probabilities_and_first_label():
    _, prompts, po, co, reduce, top_m = random_problem(3)
    emb = np.zeros((4, prompts.shape[1]), np.float32)
    labels, probs, margins = label_segments(emb, prompts, po, co, 100.0, reduce=reduce, top_m=top_m)
    sizes = np.diff(co)
    assert (labels == 0).all()
    np.testing.assert_allclose(probs, np.broadcast_to(1.0 / sizes, probs.shape), rtol=1e-6)
    np.testing.assert_allclose(margins, np.broadcast_to((sizes == 1).astype(float), margins.shape), atol=1e-7)


def test_single_class_attribute_is_certain():
    rng = np.random.default_rng(4)
    emb, prompts = normalized(rng, (50, 8)), normalized(rng, (3, 8))
    labels, probs, margins = label_segments(emb, prompts, np.array([0, 3]), np.array([0, 1]), 100.0)
    assert (labels == 0).all() and (probs == 1.0).all() and (margins == 1.0).all()


def test_ties_pick_the_first_class_with_zero_margin():
    rng = np.random.default_rng(5)
    emb = normalized(rng, (40, 8))
    base = normalized(rng, (2, 8))
    # attribute 1 = classes (base[1], base[1], base[0]): its first two classes are identical
    prompts = np.stack([base[0], base[1], base[1], base[0]])
    labels, probs, margins = label_segments(emb, prompts, np.arange(5), np.array([0, 1, 4]), 50.0)
    s0, s1 = emb @ base[0], emb @ base[1]
    tied = s1 > s0  # there the two identical classes tie for first place
    assert tied.any() and (~tied).any()
    assert (labels[tied, 1] == 0).all()
    assert np.allclose(margins[tied, 1], 0.0, atol=1e-7)
    assert (labels[~tied, 1] == 2).all()
    np.testing.assert_allclose(probs[tied, 1], 1.0 / (2.0 + np.exp(50.0 * (s0[tied] - s1[tied]))), rtol=1e-5)


def test_large_n_streams_in_chunks_with_bounded_memory(tmp_path):
    n, d = 120_000, 32
    emb, prompts, po, co, reduce, top_m = random_problem(6, n=1, d=d, prompts_per_class=(3, 6))
    store = np.lib.format.open_memmap(tmp_path / "e.npy", mode="w+", dtype=np.float32, shape=(n, d))
    rng = np.random.default_rng(8)
    for start in range(0, n, 20_000):
        store[start : start + 20_000] = normalized(rng, (20_000, d))
    store.flush()
    mapped = np.load(tmp_path / "e.npy", mmap_mode="r")
    label_segments(mapped[:10], prompts, po, co, 100.0, reduce=reduce, top_m=top_m)  # compile outside the trace
    tracemalloc.start()
    labels, probs, margins = label_segments(mapped, prompts, po, co, 100.0, reduce=reduce, top_m=top_m, chunk_rows=4096)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    outputs = labels.nbytes + probs.nbytes + margins.nbytes
    whole_logits = n * prompts.shape[0] * 4
    chunk = 4096 * (d + prompts.shape[0]) * 4
    assert peak < outputs + 2 * chunk + 1_000_000 < outputs + whole_logits
    pick = np.random.default_rng(9).choice(n, 2000, replace=False)
    got = (labels[pick], probs[pick], margins[pick])
    assert_matches(got, reference(np.asarray(mapped[pick]), prompts, po, co, 100.0, reduce, top_m))


@pytest.fixture
def two_numba_threads():
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    yield
    numba.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("chunk_rows", [None, 1, 100, 333])
def test_gemm_path_block_and_task_boundaries(monkeypatch, two_numba_threads, dtype, chunk_rows):
    """Threads each take tasks of chunk_rows rows and label them in blocks of 37 (odd sizes, partial last
    blocks and tasks, rows copied to float32 per block): what one block of every row at once gives (up to
    the GEMM's summation order, which BLAS picks by shape), and the reference's labels."""
    emb, prompts, po, co, reduce, top_m = random_problem(12, n=1001, prompts_per_class=(1, 6))
    emb = emb.astype(dtype)
    monkeypatch.setattr(sim, "MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(sim, "BLOCK_BYTES", 4 * prompts.shape[0] * 37)
    assert sim.auto_block_rows(prompts.shape[0]) == 37
    got = label_segments(emb, prompts, po, co, 100.0, reduce=reduce, top_m=top_m, chunk_rows=chunk_rows)
    monkeypatch.setattr(sim, "BLOCK_BYTES", 4 * prompts.shape[0] * len(emb))
    whole = label_segments(emb, prompts, po, co, 100.0, reduce=reduce, top_m=top_m, chunk_rows=len(emb))
    assert_matches(got, whole, atol=1e-5)
    assert_matches(got, reference(emb.astype(np.float32), prompts, po, co, 100.0, reduce, top_m))


def test_progress_comes_in_order_on_the_calling_thread(monkeypatch, two_numba_threads):
    import threading

    emb, prompts, po, co, reduce, top_m = random_problem(13, n=1000, prompts_per_class=(2, 4))
    monkeypatch.setattr(sim, "MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(sim, "BLOCK_BYTES", 4 * prompts.shape[0] * 16)
    calls = []
    label_segments(emb, prompts, po, co, 100.0, reduce=reduce, top_m=top_m, chunk_rows=90,
                   on_chunk=lambda rows: calls.append((rows, threading.get_ident())))
    assert [rows for rows, _ in calls] == [90] * 11 + [10]
    assert {thread for _, thread in calls} == {threading.get_ident()}


def test_blas_runs_single_threaded_inside_and_is_restored_when_calls_overlap(two_numba_threads):
    """Call A enters, call B (another thread) enters, A leaves, B leaves: BLAS stays single-threaded while
    either works, and afterwards the caller's BLAS limits are as they were (B must not restore the limit
    A set)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info

    emb, prompts, po, co, reduce, top_m = random_problem(14, n=400, prompts_per_class=(2, 4))
    want = reference(emb, prompts, po, co, 100.0, reduce, top_m)
    b_inside, a_done = threading.Event(), threading.Event()
    inside_threads = []

    def blas_threads():
        return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]

    def label(on_chunk):
        return label_segments(emb, prompts, po, co, 100.0, reduce=reduce, top_m=top_m, chunk_rows=100,
                              on_chunk=on_chunk)

    def b_progress(rows):
        b_inside.set()
        a_done.wait(30)

    before = blas_threads()
    if max(before, default=1) < 2:
        pytest.skip("BLAS runs on one thread here: nothing to restore")
    with ThreadPoolExecutor(1) as pool:  # no threadpool_limits around: B could not change the count then
        b = []

        def a_progress(rows):
            inside_threads.extend(blas_threads())
            if not b:
                b.append(pool.submit(label, b_progress))
                assert b_inside.wait(30)

        a = label(a_progress)
        a_done.set()
        assert_matches(b[0].result(), want)
        assert blas_threads() == before
    assert_matches(a, want)
    assert set(inside_threads) == {1}


def test_rejects_inconsistent_segments():
    rng = np.random.default_rng(0)
    emb, prompts = normalized(rng, (3, 4)), normalized(rng, (3, 4))
    with pytest.raises(ValueError, match="prompt_offsets"):
        label_segments(emb, prompts, np.array([0, 2]), np.array([0, 1]), 1.0)
    with pytest.raises(ValueError, match="at least one prompt"):
        label_segments(emb, prompts, np.array([0, 0, 3]), np.array([0, 2]), 1.0)
    with pytest.raises(ValueError, match="class_offsets"):
        label_segments(emb, prompts, np.array([0, 1, 3]), np.array([0, 3]), 1.0)
    with pytest.raises(ValueError, match="width"):
        label_segments(emb[:, :3], prompts, np.array([0, 3]), np.array([0, 1]), 1.0)
    with pytest.raises(ValueError, match="top_m"):
        label_segments(emb, prompts, np.array([0, 3]), np.array([0, 1]), 1.0, reduce=[REDUCE_TOPM], top_m=99)


def test_empty_input():
    rng = np.random.default_rng(0)
    labels, probs, margins = label_segments(
        np.zeros((0, 4), np.float32), normalized(rng, (2, 4)), np.array([0, 1, 2]), np.array([0, 2]), 1.0
    )
    assert labels.shape == probs.shape == margins.shape == (0, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not sim.cuda_available(), reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize("chunk_rows, device", [(33, "cuda"), (100_000, "cuda:0")])
def test_cuda_matches_cpu(chunk_rows, device):
    emb, prompts, po, co, reduce, top_m = random_problem(11, n=5000, d=64, prompts_per_class=(1, 8))
    got = label_segments(emb, prompts, po, co, 100.0, reduce=reduce, top_m=top_m, chunk_rows=chunk_rows, device=device)
    assert_matches(got, reference(emb, prompts, po, co, 100.0, reduce, top_m), atol=1e-4)


_C_STUB = """#include <math.h>
#define __global__
struct dim { unsigned x; }; struct dim blockIdx, blockDim, threadIdx;
static double __longlong_as_double(unsigned long long v) { double d; __builtin_memcpy(&d, &v, 8); return d; }
static int min(int a, int b) { return a < b ? a : b; }
"""
_C_LAUNCH = """
void launch(long long total, const float* sims, long long n, long long p, const long long* po, const long long* co,
            const signed char* red, const int* tm, long long a, float scale, int* l, float* pr, float* m) {
    blockDim.x = 1; threadIdx.x = 0;
    for (long long i = 0; i < total; ++i) { blockIdx.x = (unsigned)i; label_segments(sims, n, p, po, co, red, tm, a, scale, l, pr, m); }
}
"""


@pytest.mark.skipif(__import__("shutil").which("gcc") is None, reason="needs gcc")
def test_cuda_kernel_source_logic_on_the_cpu(tmp_path):
    """The RawKernel's CUDA C, compiled as plain C (one 'thread' per call), against the reference:
    checks the fused GPU pass's logic on machines without a GPU."""
    import ctypes
    import subprocess

    source = tmp_path / "kernel.c"
    source.write_text(_C_STUB + sim.CUDA_SOURCE.replace('extern "C"', "") + _C_LAUNCH)
    library = tmp_path / "kernel.so"
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", str(library), str(source), "-lm"], check=True)
    lib = ctypes.CDLL(str(library))

    def ptr(array):
        return array.ctypes.data_as(ctypes.c_void_p)

    for seed in range(3):
        emb, prompts, po, co, reduce, top_m = random_problem(seed, n=200, prompts_per_class=(1, 6))
        sims = np.ascontiguousarray(emb @ prompts.T, dtype=np.float32)
        po, co = po.astype(np.int64), co.astype(np.int64)
        n, n_attributes = emb.shape[0], len(co) - 1
        labels = np.empty((n, n_attributes), np.int32)
        probs = np.empty((n, n_attributes), np.float32)
        margins = np.empty((n, n_attributes), np.float32)
        lib.launch(ctypes.c_longlong(n * n_attributes), ptr(sims), ctypes.c_longlong(n), ctypes.c_longlong(sims.shape[1]),
                   ptr(po), ptr(co), ptr(reduce), ptr(top_m), ctypes.c_longlong(n_attributes), ctypes.c_float(100.0),
                   ptr(labels), ptr(probs), ptr(margins))
        assert_matches((labels, probs, margins), reference(emb, prompts, po, co, 100.0, reduce, top_m), atol=1e-4)
