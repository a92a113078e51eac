"""Benchmark: zero-shot labelling and top-k text queries over stored embeddings vs plain NumPy.

Labels N random L2-normalized 512-d embeddings with the class side of the ``celeba`` schema
(random normalized prompt embeddings of the right shape: the text encoder is not timed), with
clipengine's kernel (chunked float32 GEMM + one Numba pass) and with the plain NumPy reference
(one GEMM, then per attribute softmax / argmax / top-2 in NumPy), in the same run, and checks
they agree. Then answers top-k text queries (one at a time, then a batch) with clipengine's two exact
paths (``kernels.quantized``: int8 screening + exact re-rank, its index built once and timed apart;
``kernels.topk``: the chunked float32 pass) and with NumPy (GEMV + argsort), checks the top k are the same
rows, and prints the times and ratios. ``--strategies ''`` skips the labelling part.

Adaptation (``--adapt-attributes 40``; 0 skips it, ``--only-adapt`` runs nothing else): an encode
folder of N stored 384-d embeddings of the offline ConSE model's size (each row the normalized sum of
±1 along 40 hidden orthonormal directions, one per binary attribute, plus noise; the prompts know
nothing of the directions, so zero-shot is at chance and only the labels can teach), and a labelled sample of ``--labelled`` items (each labelled on all 40 attributes, ≈ half of them per
class). Timed: the whole command a user types, ``clipengine annotate EMB --schema S --labels L``
(``--adapt auto``: cross-validated choice per attribute, nested out-of-fold labels, one labelling pass),
cold (fresh prompt cache: the text tower loads) and warm; beside it the kernel-only parts in process
(the fits and choices; the labelling pass), the plain NumPy reference of the same pass (whole logit
matrix in float64; labels compared), and scikit-learn's shrunk LDA (``solver="lsqr",
shrinkage="auto"``) fitted and applied per attribute with ``predict_proba``.

Run under the benchmark lock:
    flock /tmp/clipengine-bench.lock python bench/annotate.py --rows 1000000
    flock /tmp/clipengine-bench.lock python bench/annotate.py --rows 1000000 --only-adapt
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    parser.add_argument("--adapt-attributes", type=int, default=40, help="binary attributes to adapt (0: skip)")
    parser.add_argument("--labelled", type=int, default=32, help="items labelled on every attribute")
    parser.add_argument("--only-adapt", action="store_true", help="only the adaptation part")
    parser.add_argument("--work", type=Path, default=None, help="folder for the encode folder [a temporary one]")
    args = parser.parse_args()
    if args.only_adapt:
        bench_adaptation(args)
        return

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
    if args.adapt_attributes:
        del embeddings, quantized
        bench_adaptation(args)


# ---- adaptation from a labelled sample ----------------------------------------------------------
def adaptation_schema(n_attributes: int) -> str:
    lines = ["name: bench40", "attributes:"]
    for a in range(n_attributes):
        lines += [f"  property_{a:02d}:", "    type: binary", "    positive: \"yes\"", "    classes:",
                  f"      \"yes\": {{prompts: [\"a photo of something with property {a}\"]}}",
                  f"      \"no\": {{prompts: [\"a photo of something without property {a}\"]}}"]
    return "\n".join(lines) + "\n"


def make_adaptation_folder(work: Path, rows: int, n_attributes: int, labelled: int, noise: float = 0.5):
    """The encode folder (ConSE's record), the schema, the labels file, and the (N, A) truth (+1 = yes)."""
    import polars as pl

    from clipengine import artifacts
    from clipengine.config import EncodeConfig, ModelConfig
    from clipengine.encode.encoders import create_encoder

    record = dict(create_encoder(EncodeConfig(model=ModelConfig(model="conse"), device="cpu")).model_record)
    dim = int(record["embed_dim"])
    rng = np.random.default_rng(2)
    directions = np.linalg.qr(rng.standard_normal((dim, n_attributes)))[0].T.astype(np.float32)  # (A, D)
    truth = rng.choice(np.array([-1, 1], np.int8), (rows, n_attributes))

    def blocks():
        for start in range(0, rows, 65_536):
            signs = truth[start:start + 65_536].astype(np.float32)
            block = signs @ directions + noise * np.sqrt(n_attributes / dim) * rng.standard_normal(
                (len(signs), dim), dtype=np.float32)
            yield block / np.linalg.norm(block, axis=1, keepdims=True)

    folder = work / "emb"
    items = pl.DataFrame({"path": [f"item{i:07d}" for i in range(rows)]})
    artifacts.write_encoded(folder, items, encoded=list(range(rows)), blocks=blocks(), skipped=[],
                            stats=np.zeros((rows, 2), np.int64), record=record, dtype="float32")
    sample = np.sort(np.random.default_rng(3).choice(rows, labelled, replace=False))
    table = {"path": [f"item{i:07d}" for i in sample], "inclusion_prob": [labelled / rows] * labelled}
    for a in range(n_attributes):
        table[f"true_property_{a:02d}"] = np.where(truth[sample, a] > 0, "yes", "no").tolist()
    labels = work / "labels.csv"
    pl.DataFrame(table).write_csv(labels)
    schema = work / "bench40.yaml"
    schema.write_text(adaptation_schema(n_attributes))
    return folder, schema, labels, truth


def time_command(folder: Path, schema: Path, labels: Path, out: Path, cache: Path) -> float:
    env = {**os.environ, "CLIPENGINE_CACHE_DIR": str(cache)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "clipengine", "annotate", str(folder), "--schema", str(schema),
                    "--labels", str(labels), "--out", str(out), "-q"], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def bench_adaptation(args) -> None:
    import numba

    from clipengine import artifacts, envs
    from clipengine.annotate.adapt import adapt_attributes, build_adapted_side
    from clipengine.annotate.class_embeddings import build_class_side, prompt_embeddings
    from clipengine.annotate.labels import read_labels
    from clipengine.annotate.schemas import load_schema
    from clipengine.annotate.stage import TextTowerOnDemand, logit_scale_of
    from clipengine.bench.fewshot import machine_line
    from clipengine.kernels.fewshot import adapted_logits_reference, label_adapted, softmax_top2_reference

    threads = min(envs.num_threads(), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    n_attributes = args.adapt_attributes
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        work = Path(scratch)
        start = time.perf_counter()
        folder, schema_path, labels_path, truth = make_adaptation_folder(work, args.rows, n_attributes,
                                                                         args.labelled)
        print(f"\n# adaptation: {args.rows:,} stored embeddings (ConSE, 384-d), {n_attributes} binary attributes, "
              f"{args.labelled} items labelled on each; {threads} threads; {machine_line()}; "
              f"folder made in {time.perf_counter() - start:.0f} s")
        cache = work / "cache"
        cold = time_command(folder, schema_path, labels_path, work / "cold.parquet", cache)
        warm = min(time_command(folder, schema_path, labels_path, work / "warm.parquet", cache)
                   for _ in range(max(1, args.repeats - 1)))
        adaptation, _, _ = artifacts.read_adaptation(work / "warm.parquet")
        chosen = {}
        for record in adaptation.values():
            chosen[record["method"]] = chosen.get(record["method"], 0) + 1

        os.environ["CLIPENGINE_CACHE_DIR"] = str(cache)  # the prompts the command cached
        stored = artifacts.read_encoded(folder)
        schema = load_schema(str(schema_path))
        label_set = read_labels(labels_path, stored.items, {a.name: a.class_names for a in schema.attributes})
        tower = TextTowerOnDemand(stored, "cpu")
        scale = logit_scale_of(tower, stored.record)
        side = build_class_side(schema, prompt_embeddings(schema, tower, stored.model_id))
        fit_s, adaptations = best_of(args.repeats, lambda: adapt_attributes(stored.embeddings, schema, side, scale,
                                                                            label_set, "auto"))
        adapted = build_adapted_side(schema, side, scale, adaptations)
        label_adapted(stored.embeddings[:2048], adapted)  # compile / warm outside the timing
        pass_s, ours = best_of(args.repeats, lambda: label_adapted(stored.embeddings, adapted))

        def numpy_reference():
            return softmax_top2_reference(adapted_logits_reference(stored.embeddings, adapted), adapted.class_offsets)

        ref_s, ref = best_of(1, numpy_reference)
        decided = ref[2] > 1e-4
        agree = np.array_equal(ours[0][decided], ref[0][decided]) and np.allclose(ours[1], ref[1], atol=1e-4)
        del ref

        sk_s, sk_labels = best_of(1, lambda: sklearn_lda(stored.embeddings, label_set, schema))
        positive = truth > 0  # (N, A) "yes"
        ours_acc = float(np.mean((ours[0] == 0) == positive))  # class 0 is "yes"
        sk_acc = float(np.mean(sk_labels == positive))
        zero_shot = label_adapted(stored.embeddings, build_adapted_side(schema, side, scale, {}))
        zs_acc = float(np.mean((zero_shot[0] == 0) == positive))
    print(f"auto chose: {', '.join(f'{m} × {k}' for m, k in sorted(chosen.items()))}; accuracy over all items and "
          f"attributes: zero-shot {zs_acc:.3f}, adapted {ours_acc:.3f}, scikit-learn LDA {sk_acc:.3f}")
    print(f"\n| adapt {n_attributes} binary attributes, label {args.rows:,} stored embeddings | time | "
          "scikit-learn's time ÷ this | note |")
    print("| --- | --- | --- | --- |")
    print(f"| clipengine annotate --labels (whole command, cold: text tower loads) | {cold:.2f} s | "
          f"{sk_s / cold:.2f}× | |")
    print(f"| clipengine annotate --labels (whole command, warm) | {warm:.2f} s | {sk_s / warm:.2f}× | |")
    print(f"| kernel only: fits and cross-validated choices ({n_attributes} attributes) | {fit_s:.2f} s | | |")
    print(f"| kernel only: labelling pass | {pass_s:.2f} s | | |")
    print(f"| plain NumPy reference of the same pass (float64, whole matrix) | {ref_s:.2f} s | | "
          f"labels agree: {'yes' if agree else 'NO'} |")
    print(f"| scikit-learn LDA (lsqr, shrinkage auto) fit + predict_proba per attribute | {sk_s:.2f} s | 1.00× | |")


def sklearn_lda(embeddings, label_set, schema) -> np.ndarray:
    """(N, A) bool "yes" by scikit-learn's shrunk LDA, fitted per attribute on its labels."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    out = np.empty((embeddings.shape[0], len(schema.attributes)), dtype=bool)
    x = np.asarray(embeddings)
    for a, attribute in enumerate(schema.attributes):
        labelled = label_set.labelled(attribute.name)
        rows = label_set.rows[labelled]
        y = label_set.truth[attribute.name][labelled] == "yes"
        if len(set(y.tolist())) < 2:
            out[:, a] = bool(y[0])
            continue
        model = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x[rows], y)
        out[:, a] = model.predict_proba(x)[:, list(model.classes_).index(True)] >= 0.5
    return out


if __name__ == "__main__":
    main()
