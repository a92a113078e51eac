"""Text → image retrieval over stored embeddings: exact top-k by cosine similarity.

Two exact paths, picked by :func:`choose_path`: on the CPU over at least :data:`INDEX_MIN_ROWS` rows, an int8
screening pass with a proven bound, then an exact re-rank of the few rows it cannot rule out
(:mod:`clipengine.kernels.quantized`; its index is built once and kept in ``EMB_DIR/search_index/``); otherwise,
and on the GPU, the chunked float32 GEMM (:mod:`clipengine.kernels.topk`). On the GPU the rows (or, with
``index="int8"``, the int8 index) are copied to the device once per process and stay there. Both return the
brute force's top k
(equal scores: the lower row first). The number of queries does not change the pick: up to 16 queries share one
int8 scan, which ``bench/annotate.py`` measures against the float32 pass at several batch sizes.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import polars as pl

from clipengine.artifacts import key_columns
from clipengine.errors import ClipengineError

DEFAULT_K = 20
INDEX_MIN_ROWS = 100_000  # below this the float32 pass takes a few ms: no index file is worth it


def search(
    emb_dir: str | os.PathLike,
    query: str | Sequence[str],
    k: int = DEFAULT_K,
    *,
    text_encoder=None,
    device: str = "auto",
    chunk_rows: int | None = None,
    index: str = "auto",
    progress: bool = True,
) -> pl.DataFrame:
    """The ``k`` items of ``emb_dir`` most similar to each query text, best first.

    Columns: ``query`` (str), ``rank`` (1-based), ``path`` (and ``box`` when the items have
    boxes), ``score`` (cosine similarity, Float32), ``row`` (row of ``embeddings.npy``).
    ``text_encoder`` defaults to the text tower of the model in ``emb_dir/model.json``.
    ``index``: ``"auto"`` (see :func:`choose_path`), ``"int8"`` (the int8 screening whatever N and device)
    or ``"none"`` (the float32 pass); ``progress``: the bar while the index is built (once).
    """
    from clipengine.artifacts import read_encoded
    from clipengine.devices import resolve_device

    queries = [query] if isinstance(query, str) else list(query)
    if not queries or any(not q.strip() for q in queries):
        raise ClipengineError("search: every query must be a non-empty text")
    if k < 1:
        raise ClipengineError(f"search: -k must be ≥ 1, got {k}")
    if index not in ("auto", "int8", "none"):
        raise ClipengineError(f"search: index must be 'auto', 'int8' or 'none', got {index!r}")
    stored = read_encoded(emb_dir)
    if text_encoder is None:
        from clipengine.encode.encoders import text_encoder_from_dir

        text_encoder = text_encoder_from_dir(stored.path, device=device)
    query_embeddings = np.asarray(text_encoder.encode_texts(queries), dtype=np.float32)
    if query_embeddings.shape[1] != stored.embeddings.shape[1]:
        raise ClipengineError(
            f"the text tower gives {query_embeddings.shape[1]}-d embeddings but {stored.path} holds "
            f"{stored.embeddings.shape[1]}-d ones: search needs the model that encoded them"
        )
    device = resolve_device(device, runtime="cupy")
    quantized = None
    if choose_path(stored.embeddings.shape[0], device, index) == "int8":
        from clipengine.annotate.search_index import open_search_index

        quantized = open_search_index(stored.path, stored.embeddings, progress=progress)
    return search_embeddings(stored.embeddings, stored.items, queries, query_embeddings, k,
                             device=device, chunk_rows=chunk_rows, quantized=quantized)


def choose_path(n_rows: int, device: str, index: str = "auto") -> str:
    """``"int8"`` (screening + exact re-rank) or ``"float32"`` (chunked GEMM) for a search over ``n_rows``.

    ``auto``: int8 on the CPU over at least :data:`INDEX_MIN_ROWS` rows (a query reads N × D bytes instead of
    4 N × D); float32 otherwise, and on the GPU (the rows stay resident there). ``int8`` forces it on either
    device (on the GPU it holds a quarter of the float32 rows' memory); ``none`` never uses it.
    """
    if index == "none" or n_rows == 0:
        return "float32"
    if index == "int8":
        return "int8"
    return "int8" if device == "cpu" and n_rows >= INDEX_MIN_ROWS else "float32"


def search_embeddings(
    embeddings: np.ndarray,
    items: pl.DataFrame,
    queries: list[str],
    query_embeddings: np.ndarray,
    k: int,
    *,
    device: str = "cpu",
    chunk_rows: int | None = None,
    quantized=None,
) -> pl.DataFrame:
    """Rank ``items`` (N rows, ``path`` [, ``box``]) by (N, D) ``embeddings`` against (Q, D) ``query_embeddings``.

    With ``quantized`` (the :class:`~clipengine.kernels.quantized.QuantizedRows` of ``embeddings``): the int8
    screening, then an exact re-rank. Otherwise all queries share one float32 pass (a GEMM per chunk), so a
    batch of queries costs little more than one: that pass over N × D is memory bound."""
    if quantized is not None:
        from clipengine.devices import numba_threads
        from clipengine.kernels.quantized import topk_quantized

        with numba_threads():
            index, score = topk_quantized(quantized, embeddings, query_embeddings, k, device=device)
    else:
        from clipengine.kernels.topk import topk_search

        index, score = topk_search(embeddings, query_embeddings, k, chunk_rows=chunk_rows, device=device)
    n_hits = index.shape[1]
    flat = index.reshape(-1)
    keys = key_columns(items)[flat]
    return pl.concat(
        [
            pl.DataFrame(
                {
                    "query": np.repeat(np.asarray(queries, dtype=object), n_hits).tolist(),
                    "rank": np.tile(np.arange(1, n_hits + 1, dtype=np.int32), len(queries)),
                }
            ),
            keys,
            pl.DataFrame({"score": score.reshape(-1).astype(np.float32), "row": flat.astype(np.int64)}),
        ],
        how="horizontal",
    )
