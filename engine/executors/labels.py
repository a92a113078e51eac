"""Annotation inside the encode pass: the encoder workers label each shard's rows right after
encoding them, and the driver gathers the labels into the same metadata files the annotate stage
writes (:func:`clipengine.annotate.stage.write_metadata`).

The class side of every metadata file (prompt embeddings from the model's text tower, cached as the
annotate stage caches them, aggregated into a :class:`clipengine.annotate.class_embeddings.ClassSide`) is
made once on the driver and shipped to the workers once; a worker then runs only
:func:`clipengine.annotate.stage.label_with_class_side` per shard. Rows are labelled as
``embeddings.npy`` stores them (cast to the output dtype), so the labels are those the annotate
stage would compute from the gathered file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ShardLabeller:
    """Per metadata file (``files``) its ``schemas`` and ``sides``; the ``logit_scale``; ``config``
    (an ``AnnotateConfig``: device, chunk_rows); ``dtype`` of the stored rows; ``model_id``. ``key``
    identifies the labelling (a shard labelled with another key is relabelled on the driver)."""

    files: tuple[str, ...]
    schemas: tuple[Any, ...]
    sides: tuple[Any, ...]
    logit_scale: float
    config: Any
    dtype: str
    model_id: str
    key: str

    def label(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """(K, D) rows → ``labels_<i>`` (K, A_i) int32, ``probs_<i>`` / ``margins_<i>`` (K, A_i) float32
        for every metadata file ``i``."""
        from clipengine.annotate.stage import label_with_class_side

        stored = np.asarray(rows).astype(self.dtype, copy=False)  # the rows as embeddings.npy holds them
        out = {}
        for i, (schema, side) in enumerate(zip(self.schemas, self.sides)):
            labels, probs, margins = label_with_class_side(stored, side, self.logit_scale, self.config, name=schema.name)
            out.update({f"labels_{i}": labels, f"probs_{i}": probs, f"margins_{i}": margins})
        return out


class _TextTower:
    """The driver's text encoder, created only if a prompt embedding is not cached."""

    def __init__(self, make, record: dict):
        self.make, self.record, self.encoder = make, record, None

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        if self.encoder is None:
            self.encoder = self.make(self.record)
        return self.encoder.encode_texts(texts)


def prepare_labeller(annotation, record: dict, dtype: str) -> ShardLabeller:
    """The :class:`ShardLabeller` of an ``InPassAnnotation`` for the model ``record`` (``model_id``,
    ``embed_dim``, ``logit_scale``), rows stored as ``dtype``."""
    from clipengine.annotate.class_embeddings import build_class_side, prompt_embeddings
    from clipengine.annotate.stage import check_prompt_embeddings, logit_scale_of

    tower = _TextTower(annotation.text_encoder, record)
    model_id = str(record.get("model_id") or "")
    schemas, sides = [], []
    digest = hashlib.sha256()
    for _name, schema in annotation.targets:
        prompts = prompt_embeddings(schema, tower, model_id or None)
        check_prompt_embeddings(schema, prompts, int(record["embed_dim"]))
        side = build_class_side(schema, prompts)
        schemas.append(schema)
        sides.append(side)
        for part in (side.matrix, side.prompt_offsets, side.class_offsets, side.reduce, side.top_m):
            digest.update(np.ascontiguousarray(part).tobytes())
    scale = logit_scale_of(tower.encoder, record)
    digest.update(json.dumps([[name for name, _ in annotation.targets], repr(scale), dtype]).encode())
    return ShardLabeller(files=tuple(name for name, _ in annotation.targets), schemas=tuple(schemas),
                         sides=tuple(sides), logit_scale=scale, config=replace(annotation.config, progress=False),
                         dtype=dtype, model_id=model_id, key=digest.hexdigest()[:32])


class LabelGather:
    """The driver's (N, A) label arrays of every metadata file, filled row by row from the shards; rows
    no shard labelled (rows reused from a finished output set) are labelled
    here at the end."""

    def __init__(self, labeller: ShardLabeller, n_rows: int):
        self.labeller = labeller
        self.arrays = []
        for schema in labeller.schemas:
            width = len(schema.attributes)
            self.arrays.append((np.zeros((n_rows, width), np.int32), np.zeros((n_rows, width), np.float32),
                                np.zeros((n_rows, width), np.float32)))
        self.missing = np.ones(n_rows, dtype=bool)

    def take(self, row: int, shard: dict[str, np.ndarray] | None, position: int) -> None:
        """Row ``row`` of the output gets the labels of row ``position`` of ``shard`` (its arrays), if
        that shard was labelled with this labelling."""
        if shard is None or str(shard.get("labels_key", "")) != self.labeller.key:
            return
        for i, (labels, probs, margins) in enumerate(self.arrays):
            labels[row] = shard[f"labels_{i}"][position]
            probs[row] = shard[f"probs_{i}"][position]
            margins[row] = shard[f"margins_{i}"][position]
        self.missing[row] = False

    def finish(self, embeddings: np.ndarray, chunk: int = 65536) -> int:
        """Label the rows still missing from ``embeddings`` (N, D) (the written file, memory-mapped);
        how many there were."""
        missing = np.flatnonzero(self.missing)
        for start in range(0, missing.size, chunk):
            rows = missing[start:start + chunk]
            labelled = self.labeller.label(np.asarray(embeddings[rows]))
            for i, (labels, probs, margins) in enumerate(self.arrays):
                labels[rows], probs[rows], margins[rows] = (labelled[f"labels_{i}"], labelled[f"probs_{i}"],
                                                            labelled[f"margins_{i}"])
        self.missing[:] = False
        return int(missing.size)

    def write(self, out_dir, items) -> list[str]:
        """The metadata files (``items``: the N rows of items.parquet), as the annotate stage writes them."""
        from clipengine.annotate.stage import check_finite_labels, write_metadata

        for name, schema, (labels, probs, margins) in zip(self.labeller.files, self.labeller.schemas, self.arrays):
            check_finite_labels(probs)
            write_metadata(out_dir / name, items, schema, labels, probs, margins, model_id=self.labeller.model_id,
                           logit_scale=self.labeller.logit_scale)
        return list(self.labeller.files)


__all__ = ["LabelGather", "ShardLabeller", "prepare_labeller"]
