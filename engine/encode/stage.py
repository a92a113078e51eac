"""The encode stage: items (image files, optional boxes) → the encode outputs of a folder.

What it writes is :func:`clipengine.artifacts.write_encoded`'s (``embeddings.npy``, ``items.parquet``,
``item_stats.npy``, ``skipped.parquet``, ``model.json``). While it runs, every ``shard_size`` items or
``shard_seconds`` the finished rows are committed as one shard file (:mod:`clipengine.shards`, in
``OUT/shards``), and once more when it is interrupted (Ctrl-C, or SIGTERM through the CLI): a run
stopped at any moment resumes from them, losing nothing after an interrupt and at most the last
``shard_seconds`` after SIGKILL or a power loss. A rerun over a
superset of items reuses the finished outputs (same model identity, same file size and mtime) and
encodes only the new or changed items. Skipped items are retried on rerun.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from clipengine import artifacts
from clipengine.config import EncodeConfig
from clipengine.errors import ClipengineError

OUTPUT_DTYPES = ("float32", "float16")
ROWS_PER_WRITE = 16384  # rows gathered per block when the outputs are written


@dataclass(frozen=True)
class EncodeResult:
    """What one ``encode_items`` call did. ``encoded`` counts rows of ``embeddings.npy`` (reused ones
    included); ``newly_encoded`` those that ran through the model in this call."""

    out_dir: Path
    encoded: int
    skipped: int
    newly_encoded: int
    reused: int
    seconds: float
    model_record: dict


def check_output_dtype(dtype: str) -> None:
    if dtype not in OUTPUT_DTYPES:
        raise ClipengineError(f"output dtype must be one of {', '.join(OUTPUT_DTYPES)}, not {dtype!r}")


def encode_items(items, out_dir: str | os.PathLike, config: EncodeConfig, *, encoder=None,
                 left_out=()) -> EncodeResult:
    """Encode ``items`` (a Polars frame: ``path`` str = the item id; optional ``file`` str = what to
    decode, default ``path``; optional ``box`` list[f64] [x0, y0, x1, y1] or null = whole image) into
    ``out_dir``. Resumable; reruns encode only new or changed items. ``left_out``: (path, reason) of
    inputs that never became items (:class:`clipengine.encode.inputs.LeftOut`), recorded in
    ``skipped.parquet`` and counted as skipped.
    """
    from clipengine.encode.encoders import create_encoder, encoder_record
    from clipengine.encode.geometry import ImageSpec
    from clipengine.encode.gpu_decode import plan_decode
    from clipengine.progress import progress_bar
    from clipengine.shards import ShardStore

    started = time.perf_counter()
    check_output_dtype(config.output_dtype)
    keys = artifacts.check_items(items)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if encoder is None:
        encoder = create_encoder(config)
    record = encoder_record(encoder, config.output_dtype)
    identity = artifacts.identity_of(record)
    decoder = plan_decode(config.decode, config.exact_decode, record.get("device", "cpu"), encoder)
    record[artifacts.RECORD_DECODE] = decoder.describe()

    files = artifacts.item_files(items)
    stats = artifacts.file_stats(files)  # taken before decoding: a file changed while the job runs is redone next time
    finished = artifacts.read_finished(out_dir, identity, keys, stats)
    store = ShardStore(str(out_dir / artifacts.SHARDS_DIR), identity).open()
    sharded = _read_shards(store, keys, stats)  # key -> (D,) float32 row
    reused = sum(1 for key in keys if key in finished.rows or key in sharded)
    todo = [i for i, key in enumerate(keys) if key not in finished.rows and key not in sharded]

    boxes = items["box"].to_list() if "box" in items.columns else None
    spec = ImageSpec.from_preprocess_cfg(record.get("preprocess") or {"size": encoder.image_size},
                                         fast_jpeg=not config.exact_decode)
    skipped: dict[int, str] = {}
    newly = 0
    pending = _PendingShard(store, keys, stats)
    bar = progress_bar(len(todo), "encode", enabled=config.progress, unit="img")
    try:
        # device decoding and the model both run in this thread (CUDA graphs are replayed from one thread)
        batches = decoder.batches([files[i] for i in todo], None if boxes is None else [boxes[i] for i in todo], spec,
                                  batch_size=config.batch_size, workers=config.workers,
                                  prefetch_batches=config.prefetch_batches, box_margin=config.box_margin,
                                  max_pixels=config.max_pixels)
        for batch in batches:
            for index, reason in batch.skipped:
                skipped[todo[index]] = reason
            if len(batch.indices):
                # (B, S, S, 3) uint8, a NumPy array or a tensor on the encoder's device → (B, D), L2-normalized
                rows = np.asarray(encoder.encode_images(batch.images), np.float32)
                pending.add([todo[i] for i in batch.indices], rows)
                newly += len(batch.indices)
            bar.update(len(batch.indices) + len(batch.skipped))
            if pending.due(config.shard_size, config.shard_seconds):
                sharded.update(pending.commit())
        sharded.update(pending.commit())
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through the CLI: the rows already encoded are kept
        pending.commit()
        raise
    finally:
        bar.close()

    encoded = [i for i, key in enumerate(keys) if key in finished.rows or key in sharded]
    artifacts.write_encoded(
        out_dir, items, encoded=encoded, blocks=_row_blocks(keys, encoded, finished, sharded),
        skipped=list(skipped.items()), left_out=[(str(p), str(r)) for p, r in left_out],
        stats=stats, record=record, dtype=config.output_dtype,
    )
    store.clear()
    n_skipped = len(skipped) + len(left_out)
    return EncodeResult(out_dir=out_dir, encoded=len(encoded), skipped=n_skipped, newly_encoded=newly,
                        reused=reused, seconds=time.perf_counter() - started,
                        model_record={**record, "n_items": len(encoded), "n_skipped": n_skipped})


def _read_shards(store, keys: list[str], stats: np.ndarray) -> dict[str, np.ndarray]:
    """key → row of every committed shard row whose file is unchanged since it was encoded."""
    now = dict(zip(keys, stats))
    rows: dict[str, np.ndarray] = {}
    for name in sorted(store.names()):
        shard = store.read(name)
        if shard is None:
            continue
        for key, row, recorded in zip(shard["keys"].tolist(), shard["rows"], shard["stats"]):
            if key in now and artifacts.same_file(recorded, now[key]):
                rows[key] = row
    return rows


class _PendingShard:
    """Rows encoded since the last commit; :meth:`commit` writes them as one shard file."""

    def __init__(self, store, keys: list[str], stats: np.ndarray):
        self.store, self.keys, self.stats = store, keys, stats
        self.batches: list[tuple[list[int], np.ndarray]] = []  # (item positions, (B, D) rows)
        self.since = time.monotonic()
        self.run = uuid.uuid4().hex[:8]
        self.number = 0

    def add(self, positions: list[int], rows: np.ndarray) -> None:
        # one append: an interrupt lands before or after it, never between a batch's positions and rows
        self.batches.append((positions, rows))

    def due(self, size: int, seconds: float) -> bool:
        pending = sum(len(positions) for positions, _ in self.batches)
        return pending >= size or (pending > 0 and time.monotonic() - self.since >= seconds)

    def commit(self) -> dict[str, np.ndarray]:
        """Write the pending rows as one shard (if any); key → row of what was written."""
        positions = [position for batch_positions, _ in self.batches for position in batch_positions]
        if not positions:
            return {}
        keys = [self.keys[i] for i in positions]
        rows = np.concatenate([rows for _, rows in self.batches])
        self.store.prepare()
        self.store.write(f"shard-{self.run}-{self.number:06d}.npz", {
            "keys": np.asarray(keys, dtype=str), "rows": rows, "stats": self.stats[positions],
            "skipped_keys": np.zeros(0, dtype=str), "skipped_reasons": np.zeros(0, dtype=str),
        })
        self.number += 1
        written = dict(zip(keys, rows))
        self.batches, self.since = [], time.monotonic()
        return written


def _row_blocks(keys: list[str], encoded: list[int], finished, sharded: dict[str, np.ndarray]) -> Iterator[np.ndarray]:
    """The rows of the ``encoded`` positions in order, ``ROWS_PER_WRITE`` at a time, from the
    previous finished set (memory-mapped) or this run's shards."""
    for start in range(0, len(encoded), ROWS_PER_WRITE):
        part = [keys[i] for i in encoded[start:start + ROWS_PER_WRITE]]
        yield np.stack([finished.embeddings[finished.rows[key]] if key in finished.rows else sharded[key]
                        for key in part]).astype(np.float32, copy=False)
