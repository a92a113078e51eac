"""The encode stage: items (image files, optional boxes) → ``embeddings.npy`` + ``items.parquet``.

Output directory:

- ``embeddings.npy``: (N, D) float32 (or float16 if asked), rows L2-normalized; row i = items row i.
- ``items.parquet``: the encoded items, the caller's columns (``path`` [, ``file``, ``box``, ...]) in
  input order; its file metadata holds the sha256 of ``embeddings.npy``'s rows, so a half-written
  pair is never taken for a finished one.
- ``skipped.parquet``: ``path`` [, ``box``], ``reason`` for items that could not be decoded.
- ``model.json``: the model record (architecture, weights + sha256, ``model_id``, backend, precision).
- ``item_stats.npy``: (N, 2) int64, each row's file size and modification time (ns) when it was
  encoded: a file rewritten in place since then is encoded again rather than reused.
- ``shards/`` while running: every ``shard_size`` items or ``shard_seconds`` the finished embeddings
  are written as one atomic ``.npz`` (keys + rows + file stats). A run killed at any moment (SIGKILL
  included) resumes from the shards; a rerun over a superset of items reuses the finished outputs
  (same ``model_id`` and precision, same file size and mtime) and encodes only the new or changed
  items. Skipped items are retried on rerun.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipengine import envs
from clipengine.config import EncodeConfig
from clipengine.errors import ClipengineError

MODEL_FILE = "model.json"
EMBEDDINGS_FILE = "embeddings.npy"
ITEMS_FILE = "items.parquet"
SKIPPED_FILE = "skipped.parquet"
STATS_FILE = "item_stats.npy"
SHARDS_DIR = "shards"
OUTPUT_DTYPES = ("float32", "float16")


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


# ---- encoders -------------------------------------------------------------------------------
def resolve_device(device: str) -> str:
    """"auto" → "cuda" when a GPU is visible and usable, else "cpu"; checks "cuda" is usable."""
    if device not in ("auto", "cpu", "cuda"):
        raise ClipengineError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device == "cpu":
        return "cpu"
    visible = not envs.cuda_hidden() and (Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists())
    usable = False
    if visible:
        import torch

        usable = torch.cuda.is_available()
    if device == "cuda" and not usable:
        raise ClipengineError("--device cuda: no usable CUDA GPU is visible")
    return "cuda" if usable else "cpu"


def create_encoder(config: EncodeConfig, *, towers=None):
    """The ``Encoder`` for ``config`` (model resolved and loaded; backend, device, precision chosen).

    The returned object also carries ``model_record`` (a dict for ``model.json``).
    ``towers``: an already loaded ``ModelTowers`` to reuse (the caller guarantees it matches ``config.model``).
    """
    from clipengine import bindings
    from clipengine.models import MODEL_FAMILIES, load_model, resolve_model

    device = resolve_device(config.device)
    if config.model.model in MODEL_FAMILIES:
        return _create_family_encoder(config.model.model, device, config.precision)
    if config.backend != "auto" and config.backend not in bindings.BACKENDS:
        raise ClipengineError(f"--backend must be auto or one of {', '.join(bindings.BACKENDS)}, not {config.backend!r}")
    if config.precision is not None and config.precision not in bindings.PRECISIONS:
        raise ClipengineError(f"--precision must be one of {', '.join(bindings.PRECISIONS)}, not {config.precision!r}")
    backend = bindings.select_backend(device, config.precision) if config.backend == "auto" else config.backend
    precision = config.precision or bindings.default_precision(backend, device)
    problem = bindings.check_backend(backend, device, precision)
    if problem:
        raise ClipengineError(problem)
    spec = resolve_model(config.model)
    if towers is None:
        towers = load_model(spec)
    encoder = bindings.load_backend(backend)(
        towers, device=device, precision=precision, num_threads=envs.num_threads(), cache_dir=envs.cache_dir()
    )
    encoder.model_record = {
        **spec.to_record(),
        "backend": backend,
        "device": device,
        "precision": precision,
        "embed_dim": int(encoder.embed_dim),
        "image_size": int(encoder.image_size),
        "logit_scale": towers.logit_scale,
    }
    if getattr(encoder, "image_forward", None):  # which forward runs the image tower, and why
        encoder.model_record["image_forward"] = encoder.image_forward
    return encoder


def _create_family_encoder(family: str, device: str, precision: str | None):
    import importlib

    from clipengine.models import MODEL_FAMILIES

    module_name, attribute = MODEL_FAMILIES[family].split(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ClipengineError(f"--model {family}: its module {module_name} is not available ({error})") from None
    try:
        encoder = factory(device=device, precision=precision, num_threads=envs.num_threads(), cache_dir=envs.cache_dir())
    except ValueError as error:  # bindings cannot raise the engine's error type
        raise ClipengineError(f"--model {family}: {error}") from None
    record = dict(getattr(encoder, "model_record", None) or {})
    record.setdefault("model_id", family)
    record.setdefault("source", family)
    record.setdefault("name", family)
    record.setdefault("model", family)
    record.setdefault("backend", family)
    record.setdefault("device", device)
    record.setdefault("precision", precision or "fp32")
    record.setdefault("embed_dim", int(encoder.embed_dim))
    record.setdefault("image_size", int(encoder.image_size))
    try:
        encoder.model_record = record
    except AttributeError:  # an encoder with __slots__: keep the record beside it
        pass
    return encoder


def read_model_record(emb_dir: str | os.PathLike) -> dict:
    """The ``model.json`` of an embeddings directory (raises ``ClipengineError`` if absent)."""
    path = Path(emb_dir) / MODEL_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClipengineError(f"{path}: not found; is {emb_dir} the output of `clipengine encode`?") from None
    except ValueError as error:
        raise ClipengineError(f"{path}: not valid JSON ({error})") from None


def text_encoder_from_dir(emb_dir: str | os.PathLike, *, device: str = "auto"):
    """An ``Encoder`` of the same model as ``emb_dir``'s embeddings, for its text tower
    (``encode_texts(list[str]) -> (M, D) float32``, L2-normalized; torch, fp32)."""
    from clipengine import bindings
    from clipengine.models import MODEL_FAMILIES, load_model, spec_from_record

    record = read_model_record(emb_dir)
    device = resolve_device(device)
    source = record.get("source", "open_clip")
    if source in MODEL_FAMILIES:
        return _create_family_encoder(source, device, record.get("precision"))
    spec = spec_from_record(record)
    towers = load_model(spec)
    encoder = bindings.load_backend("torch")(towers, device=device, precision="fp32", num_threads=envs.num_threads())
    encoder.model_record = {**record, "backend": "torch", "device": device, "logit_scale": towers.logit_scale}
    return encoder


# ---- items ----------------------------------------------------------------------------------
def item_keys(items) -> list[str]:
    """One string per item: its path, plus its box when it has one (the identity used for resume)."""
    paths = items["path"].to_list()
    if "box" not in items.columns:
        return [str(p) for p in paths]
    keys = []
    for path, box in zip(paths, items["box"].to_list()):
        keys.append(str(path) if box is None else f"{path}\t{','.join(repr(float(v)) for v in box)}")
    return keys


def file_stats(files) -> np.ndarray:
    """(N, 2) int64: each file's size and modification time in ns; (-1, -1) when it cannot be read.
    A finished row is reused only while its file's stats are unchanged (contents are not hashed:
    that would read every image twice)."""
    seen: dict[str, tuple[int, int]] = {}
    out = np.empty((len(files), 2), np.int64)
    for i, name in enumerate(files):
        name = os.fspath(name)
        if name not in seen:
            try:
                stat = os.stat(name)
                seen[name] = (stat.st_size, stat.st_mtime_ns)
            except OSError:
                seen[name] = (-1, -1)
        out[i] = seen[name]
    return out


def check_items(items) -> None:
    if "path" not in items.columns:
        raise ClipengineError("items: a 'path' column is required")
    if items["path"].null_count():
        raise ClipengineError("items: the 'path' column has empty values")
    if "box" in items.columns:
        for box in items["box"].to_list():
            if box is not None and len(box) != 4:
                raise ClipengineError(f"items: a box must be [x0, y0, x1, y1], got {box}")


# ---- the stage ------------------------------------------------------------------------------
def encode_items(items, out_dir: str | os.PathLike, config: EncodeConfig, *, encoder=None) -> EncodeResult:
    """Encode ``items`` (a Polars frame: ``path`` str = the item id; optional ``file`` str = what to
    decode, default ``path``; optional ``box`` list[f64] [x0, y0, x1, y1] or null = whole image) into
    ``out_dir`` (see the module docstring for the files). Resumable; reruns encode only new items.
    """
    import polars as pl

    from clipengine.bindings.files import save_npy, write_json, write_parquet
    from clipengine.images import ImageSpec, iter_batches
    from clipengine.progress import progress_bar

    started = time.perf_counter()
    if config.output_dtype not in OUTPUT_DTYPES:
        raise ClipengineError(f"output dtype must be one of {', '.join(OUTPUT_DTYPES)}, not {config.output_dtype!r}")
    check_items(items)
    keys = item_keys(items)
    if len(set(keys)) != len(keys):
        seen, dupes = set(), []
        for key in keys:
            if key in seen:
                dupes.append(key)
            seen.add(key)
        raise ClipengineError(f"items: {len(dupes)} duplicate items (same path and box), e.g. {dupes[0]!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if encoder is None:
        encoder = create_encoder(config)
    record = dict(getattr(encoder, "model_record", None) or {"model_id": type(encoder).__name__})
    record.update(embed_dim=int(encoder.embed_dim), image_size=int(encoder.image_size), dtype=config.output_dtype)
    identity = {"model_id": record.get("model_id"), "precision": record.get("precision"), "embed_dim": record["embed_dim"]}

    files = (items["file"] if "file" in items.columns else items["path"]).to_list()
    stats = file_stats(files)  # taken before decoding: a file changed while the job runs is redone next time
    done = _load_finished(out_dir, identity)  # key -> ((D,) row, (2,) file stats or None)
    shards = _ShardStore(out_dir / SHARDS_DIR, identity)
    done.update(shards.load())
    _drop_changed(done, keys, stats)
    reused = sum(1 for key in keys if key in done)
    todo = [i for i, key in enumerate(keys) if key not in done]

    boxes = items["box"].to_list() if "box" in items.columns else None
    spec = ImageSpec.from_preprocess_cfg(
        record.get("preprocess") or {"size": encoder.image_size}, fast_jpeg=not config.exact_decode
    )
    skipped: dict[int, str] = {}
    newly = 0
    bar = progress_bar(len(todo), "encode", enabled=config.progress, unit="img")
    pending_keys: list[str] = []
    pending_rows: list[np.ndarray] = []
    pending_stats: list[np.ndarray] = []
    last_flush = time.monotonic()
    try:
        batches = iter_batches(
            [files[i] for i in todo],
            None if boxes is None else [boxes[i] for i in todo],
            spec,
            batch_size=config.batch_size,
            workers=config.workers,
            prefetch_batches=config.prefetch_batches,
            box_margin=config.box_margin,
            max_pixels=config.max_pixels,
        )
        for batch in batches:
            for index, reason in batch.skipped:
                skipped[todo[index]] = reason
            if len(batch.indices):
                rows = encoder.encode_images(batch.images)  # (B, D) float32, normalized
                pending_keys.extend(keys[todo[i]] for i in batch.indices)
                pending_rows.append(np.asarray(rows, np.float32))
                pending_stats.append(stats[[todo[i] for i in batch.indices]])
                newly += len(batch.indices)
            bar.update(len(batch.indices) + len(batch.skipped))
            if len(pending_keys) >= config.shard_size or (
                pending_keys and time.monotonic() - last_flush >= config.shard_seconds
            ):
                shards.write(pending_keys, np.concatenate(pending_rows), np.concatenate(pending_stats))
                pending_keys, pending_rows, pending_stats, last_flush = [], [], [], time.monotonic()
        if pending_keys:
            shards.write(pending_keys, np.concatenate(pending_rows), np.concatenate(pending_stats))
            pending_keys, pending_rows, pending_stats = [], [], []
    finally:
        bar.close()

    done.update(shards.load())
    _drop_changed(done, keys, stats)
    encoded_index = [i for i, key in enumerate(keys) if key in done]
    dim = record["embed_dim"]
    embeddings = np.zeros((len(encoded_index), dim), np.float32)
    for row, i in enumerate(encoded_index):
        embeddings[row] = done[keys[i]][0]
    embeddings = embeddings.astype(config.output_dtype, copy=False)
    digest = rows_digest(embeddings)

    encoded_frame = items[encoded_index] if encoded_index else items.clear()
    skipped_index = sorted(i for i in skipped if keys[i] not in done)
    skipped_frame = pl.DataFrame(
        {
            "path": [items["path"][i] for i in skipped_index],
            **({"box": [boxes[i] for i in skipped_index]} if boxes is not None else {}),
            "reason": [skipped[i] for i in skipped_index],
        },
        schema={"path": pl.String, **({"box": pl.List(pl.Float64)} if boxes is not None else {}), "reason": pl.String},
    )
    record.update(n_items=len(encoded_index), n_skipped=len(skipped_index))
    # items.parquet last: its digest of embeddings.npy marks the set as finished
    save_npy(out_dir / EMBEDDINGS_FILE, embeddings)
    save_npy(out_dir / STATS_FILE, stats[encoded_index] if encoded_index else np.empty((0, 2), np.int64))
    write_parquet(out_dir / SKIPPED_FILE, skipped_frame)
    write_json(out_dir / MODEL_FILE, record)
    write_parquet(
        out_dir / ITEMS_FILE,
        encoded_frame,
        metadata={"clipengine.embeddings_sha256": digest, "clipengine.identity": json.dumps(identity, sort_keys=True)},
    )
    shards.clear()
    return EncodeResult(
        out_dir=out_dir,
        encoded=len(encoded_index),
        skipped=len(skipped_index),
        newly_encoded=newly,
        reused=reused,
        seconds=time.perf_counter() - started,
        model_record=record,
    )


def remove_shard_folder(folder: Path) -> None:
    """Delete a folder of shard files once their rows are in the final outputs."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        path.unlink(missing_ok=True)
    folder.rmdir()


def rows_digest(embeddings: np.ndarray) -> str:
    digest = hashlib.sha256(f"{embeddings.shape}{embeddings.dtype}".encode())
    digest.update(np.ascontiguousarray(embeddings).data)
    return digest.hexdigest()


def same_file(recorded, current) -> bool:
    """Whether a row encoded when its file had the (2,) stats ``recorded`` still stands for the file
    with stats ``current`` (see ``file_stats``); None (recorded by an older clipengine) is trusted."""
    return recorded is None or tuple(recorded) == tuple(current)


def _drop_changed(done: dict, keys: list[str], stats: np.ndarray) -> None:
    """Forget finished rows whose file was rewritten since it was encoded."""
    for i, key in enumerate(keys):
        entry = done.get(key)
        if entry is not None and not same_file(entry[1], stats[i]):
            del done[key]


def read_item_stats(path: Path, rows: int) -> np.ndarray | None:
    """The (rows, 2) int64 file stats of a finished set (``STATS_FILE``), or None when absent or not matching."""
    try:
        stats = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return stats if stats.shape == (rows, 2) and stats.dtype == np.int64 else None


def _load_finished(out_dir: Path, identity: dict) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """key → (row, file stats or None) of a previous finished run in ``out_dir`` with the same
    identity; {} otherwise."""
    import polars as pl

    from clipengine.bindings.files import read_parquet_metadata

    items_path, emb_path = out_dir / ITEMS_FILE, out_dir / EMBEDDINGS_FILE
    if not (items_path.is_file() and emb_path.is_file()):
        return {}
    try:
        meta = read_parquet_metadata(items_path)
        if json.loads(meta.get("clipengine.identity", "{}")) != identity:
            return {}
        embeddings = np.load(emb_path, allow_pickle=False)
        if rows_digest(embeddings) != meta.get("clipengine.embeddings_sha256"):
            return {}  # a pair from an interrupted finalization: not trusted
        previous = pl.read_parquet(items_path)
    except Exception:  # unreadable leftovers are re-encoded, never trusted
        return {}
    keys = item_keys(previous)
    if len(keys) != len(embeddings):
        return {}
    stats = read_item_stats(out_dir / STATS_FILE, len(keys))
    return {key: (embeddings[i].astype(np.float32), None if stats is None else stats[i]) for i, key in enumerate(keys)}


class _ShardStore:
    """Finished rows of the running job: ``shards/state.json`` (identity) + ``shard-NNNNNN.npz``
    files, each written atomically with ``keys`` (K,) str, ``rows`` (K, D) float32 and ``stats``
    (K, 2) int64 (the files' size and mtime, see ``file_stats``)."""

    def __init__(self, folder: Path, identity: dict):
        self.folder = folder
        self.identity = identity
        state = folder / "state.json"
        if folder.is_dir():
            try:
                same = json.loads(state.read_text(encoding="utf-8")) == identity
            except (OSError, ValueError):
                same = False
            if not same:  # shards of another model: useless here
                self.clear()

    def _ensure(self) -> None:
        from clipengine.bindings.files import write_json

        if not (self.folder / "state.json").is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json(self.folder / "state.json", self.identity)

    def _files(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.npz")) if self.folder.is_dir() else []

    def load(self) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """key → (row, file stats or None for a shard written without them)."""
        out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for path in self._files():
            try:
                with np.load(path, allow_pickle=False) as data:
                    keys, rows = data["keys"], data["rows"]
                    stats = data["stats"] if "stats" in data.files else [None] * len(keys)
            except Exception:
                path.unlink(missing_ok=True)  # cannot happen with atomic writes; never trust it anyway
                continue
            for key, row, stat in zip(keys.tolist(), rows, stats):
                out[key] = (row, stat)
        return out

    def write(self, keys: list[str], rows: np.ndarray, stats: np.ndarray) -> None:
        from clipengine.bindings.files import atomic_path

        self._ensure()
        files = self._files()
        number = int(files[-1].stem.split("-")[1]) + 1 if files else 0
        with atomic_path(self.folder / f"shard-{number:06d}.npz") as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, keys=np.asarray(keys, dtype=str), rows=np.asarray(rows, np.float32),
                         stats=np.asarray(stats, np.int64))

    def clear(self) -> None:
        remove_shard_folder(self.folder)


def items_from_input(source: str | os.PathLike, *, boxes: str | os.PathLike | None = None):
    """A Polars items frame from the CLI input: a folder (recursive) or a text file of paths, and
    optionally a boxes table (CSV or Parquet with ``path, x0, y0, x1, y1``; each box is one item;
    ``path`` as listed by the input or relative to the input folder)."""
    import polars as pl

    from clipengine.images import list_image_files

    files = list_image_files(source)
    if boxes is None:
        return pl.DataFrame({"path": files}, schema={"path": pl.String})
    table = _read_boxes(Path(boxes))
    base = Path(source) if Path(source).is_dir() else Path(source).parent
    known = set(files)
    resolved = []
    for path in table["path"].to_list():
        candidate = path if path in known or os.path.isabs(path) else str(base / path)
        resolved.append(candidate)
    box_values = table.select(["x0", "y0", "x1", "y1"]).to_numpy().astype(float).tolist()
    return pl.DataFrame({"path": resolved, "box": box_values}, schema={"path": pl.String, "box": pl.List(pl.Float64)})


def _read_boxes(path: Path):
    import polars as pl

    if not path.is_file():
        raise ClipengineError(f"--boxes {path}: no such file")
    try:
        table = pl.read_parquet(path) if path.suffix.lower() == ".parquet" else pl.read_csv(path)
    except Exception as error:
        raise ClipengineError(f"--boxes {path}: not a readable CSV/Parquet table ({type(error).__name__})") from None
    missing = [c for c in ("path", "x0", "y0", "x1", "y1") if c not in table.columns]
    if missing:
        raise ClipengineError(f"--boxes {path}: missing column(s) {', '.join(missing)} (need path, x0, y0, x1, y1)")
    for column in ("x0", "y0", "x1", "y1"):
        if not table[column].dtype.is_numeric() or table[column].null_count():
            raise ClipengineError(f"--boxes {path}: column {column!r} must be numbers without gaps")
    return table.with_columns(pl.col("path").cast(pl.String))


__all__ = [
    "EncodeResult",
    "create_encoder",
    "encode_items",
    "items_from_input",
    "read_model_record",
    "resolve_device",
    "text_encoder_from_dir",
]

