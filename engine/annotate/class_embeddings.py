"""A schema's text side: prompt embeddings (cached per model) and the class matrix the kernels take.

Prompt embeddings depend only on the model and the prompt texts, so they are cached under
``<cache>/class-embeddings/<model_id>/<hash of the prompt texts>.npy`` (atomic writes; safe to delete).
The aggregation into class rows (``naive``, ``mean``) or per-prompt segments (``max``,
``logsumexp``, ``topm``) is cheap and done on every call.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from clipengine import envs
from clipengine.annotate.schemas import Schema
from clipengine.bindings.files import save_npy

CACHE_FOLDER = "class-embeddings"


@dataclass(frozen=True)
class ClassSide:
    """Everything ``clipengine.kernels.similarity.label_segments`` needs besides the image embeddings.

    ``matrix`` (R, D) float32; ``prompt_offsets`` (C + 1,) int64; ``class_offsets`` (A + 1,) int64;
    ``reduce`` (C,) int8; ``top_m`` (C,) int32.
    """

    matrix: np.ndarray
    prompt_offsets: np.ndarray
    class_offsets: np.ndarray
    reduce: np.ndarray
    top_m: np.ndarray


def prompts_hash(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()[:16]


def cache_path(model_id: str, schema: Schema):
    """``<cache>/class-embeddings/<model folder>/<prompts hash>.npy``: the file name comes from the
    prompts' hash alone (a schema's name is free text), the folder from the model id with every
    character but letters, digits, ``.``, ``_`` and ``-`` replaced and no leading dot (never ``..``)."""
    safe_model = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)[:120].lstrip(".") or "model"
    return envs.cache_dir() / CACHE_FOLDER / safe_model / f"{prompts_hash(schema.prompts())}.npy"


def prompt_embeddings(schema: Schema, text_encoder, model_id: str | None, *, use_cache: bool = True) -> np.ndarray:
    """(P, D) float32, L2-normalized: every prompt of ``schema`` in ``schema.prompts()`` order.

    Read from the cache when ``model_id`` is known and the file is there; otherwise encoded
    (each distinct text once) and, with a ``model_id``, cached.
    """
    prompts = schema.prompts()
    path = cache_path(model_id, schema) if (use_cache and model_id) else None
    if path is not None and path.is_file():
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.shape[0] == len(prompts) and cached.dtype == np.float32:
                return cached
        except (OSError, ValueError):
            pass  # a damaged cache file is re-made below
    unique = list(dict.fromkeys(prompts))
    encoded = np.asarray(text_encoder.encode_texts(unique), dtype=np.float32)
    position = {text: i for i, text in enumerate(unique)}
    embeddings = np.ascontiguousarray(encoded[[position[p] for p in prompts]])
    if path is not None:
        try:
            save_npy(path, embeddings)
        except OSError:  # a read-only or full cache costs a re-encode next time, not this run
            pass
    return embeddings


def build_class_side(schema: Schema, prompt_embeddings: np.ndarray) -> ClassSide:
    """Aggregate per each attribute's strategy: ``naive`` → the first prompt's row; ``mean`` → the
    re-normalized mean of the class's prompt rows; ``max``/``logsumexp``/``topm`` → all its rows with
    the kernel's per-class reduction."""
    from clipengine.kernels.similarity import REDUCE_LOGSUMEXP, REDUCE_MAX, REDUCE_TOPM

    rows: list[np.ndarray] = []
    prompt_offsets = [0]
    class_offsets = [0]
    reduce: list[int] = []
    top_m: list[int] = []
    start = 0
    for attribute in schema.attributes:
        for schema_class in attribute.classes:
            block = prompt_embeddings[start : start + len(schema_class.prompts)]
            start += len(schema_class.prompts)
            if attribute.strategy == "naive":
                block = block[:1]
            elif attribute.strategy == "mean":
                mean = block.astype(np.float64).mean(axis=0)
                norm = np.linalg.norm(mean)
                block = (mean / norm if norm > 0 else mean)[None, :]
            rows.append(block.astype(np.float32))
            prompt_offsets.append(prompt_offsets[-1] + len(block))
            reduce.append({"logsumexp": REDUCE_LOGSUMEXP, "topm": REDUCE_TOPM}.get(attribute.strategy, REDUCE_MAX))
            top_m.append(attribute.top_m)
        class_offsets.append(class_offsets[-1] + len(attribute.classes))
    return ClassSide(
        matrix=np.ascontiguousarray(np.concatenate(rows), dtype=np.float32),
        prompt_offsets=np.asarray(prompt_offsets, dtype=np.int64),
        class_offsets=np.asarray(class_offsets, dtype=np.int64),
        reduce=np.asarray(reduce, dtype=np.int8),
        top_m=np.asarray(top_m, dtype=np.int32),
    )
