"""Text → image retrieval over stored embeddings: exact top-k by cosine similarity."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import polars as pl

from clipengine.errors import ClipengineError

DEFAULT_K = 20


def search(
    emb_dir: str | os.PathLike,
    query: str | Sequence[str],
    k: int = DEFAULT_K,
    *,
    text_encoder=None,
    device: str = "auto",
    chunk_rows: int | None = None,
) -> pl.DataFrame:
    """The ``k`` items of ``emb_dir`` most similar to each query text, best first.

    Columns: ``query`` (str), ``rank`` (1-based), ``path`` (and ``box`` when the items have
    boxes), ``score`` (cosine similarity, Float32), ``row`` (row of ``embeddings.npy``).
    ``text_encoder`` defaults to the text tower of the model in ``emb_dir/model.json``.
    """
    from clipengine.annotate import read_embeddings_dir, resolve_device

    queries = [query] if isinstance(query, str) else list(query)
    if not queries or any(not q.strip() for q in queries):
        raise ClipengineError("search: every query must be a non-empty text")
    if k < 1:
        raise ClipengineError(f"search: -k must be ≥ 1, got {k}")
    stored = read_embeddings_dir(emb_dir)
    if text_encoder is None:
        from clipengine.encode import text_encoder_from_dir

        text_encoder = text_encoder_from_dir(stored.path, device=device)
    query_embeddings = np.asarray(text_encoder.encode_texts(queries), dtype=np.float32)
    if query_embeddings.shape[1] != stored.embeddings.shape[1]:
        raise ClipengineError(
            f"the text tower gives {query_embeddings.shape[1]}-d embeddings but {stored.path} holds "
            f"{stored.embeddings.shape[1]}-d ones: search needs the model that encoded them"
        )
    return search_embeddings(stored.embeddings, stored.items, queries, query_embeddings, k,
                             device=resolve_device(device), chunk_rows=chunk_rows)


def search_embeddings(
    embeddings: np.ndarray,
    items: pl.DataFrame,
    queries: list[str],
    query_embeddings: np.ndarray,
    k: int,
    *,
    device: str = "cpu",
    chunk_rows: int | None = None,
) -> pl.DataFrame:
    """Rank ``items`` (N rows, ``path`` [, ``box``]) by (N, D) ``embeddings`` against (Q, D) ``query_embeddings``.

    All queries share one pass over the embeddings (a GEMM per chunk), so a batch of queries costs
    little more than one: one float32 pass over N × D is memory bound."""
    from clipengine.kernels.topk import DEFAULT_CHUNK_ROWS, topk_search

    index, score = topk_search(embeddings, query_embeddings, k, chunk_rows=chunk_rows or DEFAULT_CHUNK_ROWS,
                               device=device)
    n_hits = index.shape[1]
    flat = index.reshape(-1)
    keys = items.select([c for c in ("path", "box") if c in items.columns])[flat]
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
