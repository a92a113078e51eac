"""Benchmark: zero-shot labelling and top-k text queries over stored embeddings vs plain NumPy.

Labels N random L2-normalized 512-d embeddings with the class side of the ``celeba`` schema
(random normalized prompt embeddings of the right shape: the text encoder is not timed), with
clipengine's kernel (chunked float32 GEMM + one Numba pass) and with the plain NumPy reference
(one GEMM, then per attribute softmax / argmax / top-2 in NumPy), in the same run, and checks
they agree. Then answers top-k text queries (one at a time, then a batch) with clipengine's two exact
paths (``kernels.quantized``: int8 screening + exact re-rank, its index built once and timed apart;
``kernels.topk``: the chunked float32 pass) and with NumPy (GEMV + argsort), checks the top k are the same
rows, and prints the times and ratios. ``--strategies ''`` skips the labelling part.

Run under the benchmark lock:
    flock /tmp/clipengine-bench.lock python bench/annotate.py --rows 1000000
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def make_embeddings(rows: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((rows, dim), np.float32)
    for start in range(0, rows, 65_536):
        block = rng.standard_normal((min(65_536, rows - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + len(block)] = block
    return out


def reference_labels(embeddings, side, scale):
    """Plain NumPy: the whole (N, P) logit matrix, per-class reduction, per-attribute softmax."""
    logits = scale * (embeddings @ side.matrix.T)  # (N, P)
    po, co = side.prompt_offsets, side.class_offsets
    if len(po) - 1 != side.matrix.shape[0]:  # several prompts per class: reduce (max) per class
        logits = np.stack([logits[:, po[c] : po[c + 1]].max(axis=1) for c in range(len(po) - 1)], axis=1)
    n, n_attributes = embeddings.shape[0], len(co) - 1
    labels = np.empty((n, n_attributes), np.int32)
    probs = np.empty((n, n_attributes), np.float32)
    margins = np.empty((n, n_attributes), np.float32)
    for a in range(n_attributes):
        block = logits[:, co[a] : co[a + 1]]
        p = np.exp(block - block.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        labels[:, a] = p.argmax(axis=1)
        top2 = -np.partition(-p, 1, axis=1)[:, :2] if p.shape[1] > 1 else np.concatenate([p, 0 * p], axis=1)
        probs[:, a] = top2[:, 0]
        margins[:, a] = top2[:, 0] - top2[:, 1]
    return labels, probs, margins


def reference_topk(embeddings, query, k):
    scores = embeddings @ query
    order = np.argsort(-scores)[:k]
    return order, scores[order]


def best_of(repeats, fn):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--schema", default="celeba")
    parser.add_argument("--strategies", default="mean,max", help="comma-separated; each timed against NumPy")
    parser.add_argument("--queries", type=int, default=20, help="text queries answered (one by one, then batched)")
    parser.add_argument("-k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-rows", type=int, default=None)
    args = parser.parse_args()

    import numba

    from clipengine import envs
    from clipengine.annotate.class_embeddings import build_class_side
    from clipengine.annotate.schemas import load_schema
    from clipengine.kernels.quantized import quantize_rows, topk_quantized
    from clipengine.kernels.similarity import label_segments
    from clipengine.kernels.topk import topk_search

    threads = min(envs.num_threads(), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    chunk_rows = args.chunk_rows  # None: sized by clipengine.kernels.similarity.CHUNK_BYTES
    print(f"# bench/annotate: {args.rows:,} × {args.dim} float32 embeddings, schema {args.schema}; "
          f"{threads} threads (numba), BLAS {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}; "
          f"{platform.processor() or platform.machine()}; chunk_rows {chunk_rows or 'auto'}")
    start = time.perf_counter()
    embeddings = make_embeddings(args.rows, args.dim, seed=0)
    print(f"made embeddings in {time.perf_counter() - start:.1f} s ({embeddings.nbytes / 2**30:.2f} GiB)")
    schema = load_schema(args.schema)
    prompts = make_embeddings(len(schema.prompts()), args.dim, seed=1)
    scale = 100.0

    print("\n| labelling | classes × prompt rows | clipengine | NumPy reference | speed-up | agree |")
    print("| --- | --- | --- | --- | --- | --- |")
    for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        resolved = schema.with_strategy(strategy)
        side = build_class_side(resolved, prompts)
        if strategy not in ("naive", "mean", "max"):
            print(f"| {strategy} | skipped: the NumPy reference here covers naive, mean, max |")
            continue
        run = lambda: label_segments(embeddings, side.matrix, side.prompt_offsets, side.class_offsets, scale,  # noqa: E731
                                     reduce=side.reduce, top_m=side.top_m, chunk_rows=chunk_rows)
        run_small = label_segments(embeddings[:1000], side.matrix, side.prompt_offsets, side.class_offsets, scale,
                                   reduce=side.reduce, top_m=side.top_m)  # compile / warm outside the timing
        del run_small
        ours_s, ours = best_of(args.repeats, run)
        ref_s, ref = best_of(max(1, args.repeats - 1), lambda: reference_labels(embeddings, side, scale))
        decided = ref[2] > 1e-4
        agree = np.array_equal(ours[0][decided], ref[0][decided]) and np.allclose(ours[1], ref[1], atol=1e-4)
        n_classes = len(side.prompt_offsets) - 1
        print(f"| {strategy} | {n_classes} × {side.matrix.shape[0]} | {ours_s:.3f} s | {ref_s:.3f} s | "
              f"{ref_s / ours_s:.2f}× | {'yes' if agree else 'NO'} |")
        del ours, ref

    queries = make_embeddings(args.queries, args.dim, seed=3)
    start = time.perf_counter()
    quantized = quantize_rows(embeddings)
    build_s = time.perf_counter() - start
    small = embeddings[:1000]
    topk_quantized(quantize_rows(small), small, queries[:2], args.k)  # compile / warm outside the timing
    topk_search(small, queries[:1], args.k)
    # Each method answers its queries back to back, after a pause: OpenBLAS worker threads spin ~0.1 s after
    # each call, and on 2 cores that would take one from whatever runs next.
    runs = {
        "int8": lambda q: topk_quantized(quantized, embeddings, queries[q : q + 1], args.k),
        "float32": lambda q: topk_search(embeddings, queries[q : q + 1], args.k),
        "ref": lambda q: reference_topk(embeddings, queries[q], args.k),
    }
    times, answers = {}, {}
    for name, run_query in runs.items():
        times[name], answers[name] = [], []
        time.sleep(0.3)
        for q in range(args.queries):
            t0 = time.perf_counter()
            answers[name].append(run_query(q))
            times[name].append(time.perf_counter() - t0)
    same, worst = True, 0.0
    for q in range(args.queries):
        ref_index, ref_score = answers["ref"][q]
        for name in ("int8", "float32"):
            index, score = answers[name][q]
            same &= np.array_equal(index[0], ref_index)
            worst = max(worst, float(np.abs(score[0] - ref_score).max()))
    time.sleep(0.3)
    batch_int8_s, _ = best_of(args.repeats, lambda: topk_quantized(quantized, embeddings, queries, args.k))
    batch_fp32_s, _ = best_of(args.repeats, lambda: topk_search(embeddings, queries, args.k))
    int8_q, fp32_q, ref_q = (float(np.median(times[name])) for name in ("int8", "float32", "ref"))
    n_q = args.queries
    agree = f"{'yes' if same else 'NO'} (max Δscore {worst:.1e})"
    print(f"\n| top-{args.k} text query over {args.rows:,} × {args.dim} | clipengine | NumPy GEMV + argsort | "
          f"speed-up | same top-k as NumPy |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| one query, int8 screening + exact re-rank (median of {n_q}) | {int8_q * 1e3:.1f} ms | "
          f"{ref_q * 1e3:.1f} ms | {ref_q / int8_q:.2f}× | {agree} |")
    print(f"| one query, float32 chunked pass (median of {n_q}) | {fp32_q * 1e3:.1f} ms | {ref_q * 1e3:.1f} ms | "
          f"{ref_q / fp32_q:.2f}× | |")
    print(f"| batch of {n_q}, float32 one pass, per query | {batch_fp32_s / n_q * 1e3:.1f} ms | {ref_q * 1e3:.1f} ms | "
          f"{ref_q / (batch_fp32_s / n_q):.2f}× | |")
    print(f"| batch of {n_q}, int8 screening, per query | {batch_int8_s / n_q * 1e3:.1f} ms | {ref_q * 1e3:.1f} ms | "
          f"{ref_q / (batch_int8_s / n_q):.2f}× | |")
    index_bytes = quantized.codes.nbytes + quantized.scales.nbytes + quantized.residuals.nbytes
    print(f"\nint8 index built once in {build_s:.1f} s ({index_bytes / 2**30:.2f} GiB; cached in EMB_DIR/search_index/ "
          f"by `clipengine search`); a float32 pass reads {embeddings.nbytes / 2**30:.2f} GiB, the int8 scan "
          f"{quantized.codes.nbytes / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
