"""The run directory's contract: every artifact's name and metadata key, and every read and write of them.

A run directory (``clipengine run``'s ``RUN``, or the output folder of a single stage) holds:

| file | written by | rows / content |
| --- | --- | --- |
| ``items.parquet`` | encode | the encoded items (``path`` [, ``file``, ``box``, …]) in input order; its file metadata holds the sha256 of ``embeddings.npy``'s rows and the model identity, so a half-written pair is never taken for a finished one |
| ``embeddings.npy`` | encode | (N, D) float32 or float16, rows L2-normalized; row i = items row i |
| ``item_stats.npy`` | encode | (N, 2) int64: each row's file size and mtime (ns) when it was encoded |
| ``skipped.parquet`` | encode | ``path`` [, ``box``], ``reason`` of the items that could not be decoded |
| ``model.json`` | encode | the model record (architecture, weights + sha256, ``model_id``, backend, precision, ``image_forward``, the most streams a CPU batch is split into (``cpu_streams``), where images were decoded (``decode``), why ``auto`` chose the backend and precision (``auto_choice``)) |
| ``errors.parquet`` | errors | ``path`` [, ``box``], ``error`` and the dataset's own feature and ``true_*`` columns |
| ``metadata.parquet`` | annotate | ``path`` [, ``box``], then per attribute ``<attr>``, ``<attr>_prob``, ``<attr>_margin``; file metadata: model id, schema name/hash/content, strategies, logit scale |
| ``metadata_naive.parquet`` | annotate | the same with the first prompt per class (label-quality comparison) |
| ``label_quality.csv`` / ``.md`` | eval | per attribute and class: support, accuracy, precision, recall, F1 per strategy; with a labels file, each with its 95 % interval from the sample, which labeller served, and whether the attribute is reliable |
| ``slices.parquet`` / ``slices.json`` | slices | one row per slice with its statistics and the numeric bounds of binned predicates |
| ``compare.json`` / ``compare_items.parquet`` | compare | the comparison with a baseline run: slices (status, both error rates, difference, interval, q-value), drift per attribute, mismatches; the matched items whose error changed |
| ``summary.md``, ``report.html`` + ``thumbs/`` | summary, report | for people |
| ``manifest.json`` | run | inputs, model, schema, settings, versions, per-stage fingerprints and timings |

With a labels file (``--labels``), ``metadata.parquet`` adds ``<attr>_source`` (``human`` for the
labelled items, which keep their person's label, else ``model``) and records per attribute the
adaptation chosen (``clipengine.adaptation``), the labels file (``clipengine.labels``) and, for every
labelled item, its true, zero-shot and out-of-fold served label (``clipengine.label_checks``).

A labelling sheet (``clipengine sample RUN --out DIR``) is a folder of its own:

| file | rows / content |
| --- | --- |
| ``labels.csv`` | the labels file to fill (:mod:`clipengine.annotate.labels` has its columns) |
| ``labels.html`` | the same items as a self-contained page: thumbnails, predicted labels pre-selected, corrected by click or key, downloaded as the filled ``labels.csv`` |
| ``sample.json`` | the draw: seed, design, population size, strata and inclusion probabilities, items |
| ``label_studio_tasks.json`` / ``label_studio_config.xml`` | Label Studio's import: tasks with the predictions as pre-annotations, and the labelling config |

Every write is atomic (:mod:`clipengine.bindings.files`). ``shards/`` (local executor) and
``shards-ray/`` (Ray) hold finished encode work while a run is going (:mod:`clipengine.shards`);
``.lock`` is the run directory's lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from clipengine.errors import ClipengineError

# ---- names ----------------------------------------------------------------------------------
ITEMS = "items.parquet"
EMBEDDINGS = "embeddings.npy"
ITEM_STATS = "item_stats.npy"
SKIPPED = "skipped.parquet"
MODEL = "model.json"
ERRORS = "errors.parquet"
METADATA = "metadata.parquet"
NAIVE_METADATA = "metadata_naive.parquet"
LABEL_QUALITY_CSV = "label_quality.csv"
LABEL_QUALITY_MD = "label_quality.md"
THRESHOLDS = "thresholds.json"
SLICES_PARQUET = "slices.parquet"
SLICES_JSON = "slices.json"
COVERAGE_JSON = "coverage.json"
COVERAGE_PARQUET = "coverage.parquet"
COMPARE_JSON = "compare.json"
COMPARE_ITEMS = "compare_items.parquet"
SUMMARY = "summary.md"
REPORT = "report.html"
THUMBS_DIR = "thumbs"
MANIFEST = "manifest.json"
LABELS_CSV = "labels.csv"  # a labelling sheet's files (clipengine sample)
LABELS_HTML = "labels.html"
SAMPLE_RECORD = "sample.json"
LABEL_STUDIO_TASKS = "label_studio_tasks.json"
LABEL_STUDIO_CONFIG = "label_studio_config.xml"
SHEET_FILES = (LABELS_CSV, LABELS_HTML, SAMPLE_RECORD, LABEL_STUDIO_TASKS, LABEL_STUDIO_CONFIG)
SHARDS_DIR = "shards"
RAY_SHARDS_DIR = "shards-ray"
SEARCH_INDEX_DIR = "search_index"
LOCK = ".lock"
ENCODE_OUTPUTS = (EMBEDDINGS, ITEMS, ITEM_STATS, SKIPPED, MODEL)
_ALL_NAMES = (ITEMS, EMBEDDINGS, ITEM_STATS, SKIPPED, MODEL, ERRORS, METADATA, NAIVE_METADATA, LABEL_QUALITY_CSV,
              LABEL_QUALITY_MD, THRESHOLDS, SLICES_PARQUET, SLICES_JSON, COVERAGE_JSON, COVERAGE_PARQUET, COMPARE_JSON,
              COMPARE_ITEMS, SUMMARY, REPORT, MANIFEST)

# ---- columns --------------------------------------------------------------------------------
KEY_COLUMNS = ("path", "box")  # what identifies an item in every table
ERROR_COLUMN = "error"
PROB_SUFFIX = "_prob"
MARGIN_SUFFIX = "_margin"
SOURCE_SUFFIX = "_source"  # with a labels file: "human" (the person's label) or "model"
SOURCE_HUMAN = "human"
SOURCE_MODEL = "model"
TRUTH_PREFIX = "true_"  # a dataset column holding the ground truth of attribute <attr>
GIVEN_PREFIX = "given_"  # a dataset column named like a schema attribute is sliced on as given_<name>

# ---- model.json keys the engine adds to a runtime's record ------------------------------------------------
RECORD_DECODE = "decode"  # where the encode stage decoded the images, and why (a line)
RECORD_AUTO_CHOICE = "auto_choice"  # how --backend/--precision auto chose on this CPU: the measurements, the rule

# ---- Parquet key/value metadata ---------------------------------------------------------------
META_EMBEDDINGS_SHA256 = "clipengine.embeddings_sha256"  # items.parquet
META_IDENTITY = "clipengine.identity"  # items.parquet
META_MODEL_ID = "clipengine.model_id"  # metadata.parquet …
META_SCHEMA = "clipengine.schema"
META_SCHEMA_HASH = "clipengine.schema_hash"
META_STRATEGY = "clipengine.strategy"
META_LOGIT_SCALE = "clipengine.logit_scale"
META_SCHEMA_CONTENT = "clipengine.schema_content"
META_THRESHOLDS = "clipengine.thresholds"
META_SLICES = "clipengine.slices"  # slices.parquet: the run-level facts of slices.json
META_COVERAGE = "clipengine.coverage"  # coverage.parquet: the summary of coverage.json
META_ADAPTATION = "clipengine.adaptation"  # metadata.parquet with labels: {attribute: choice, CV accuracy, labels}
META_LABELS = "clipengine.labels"  # ... the labels file: path, sha256, rows, population
META_LABEL_CHECKS = "clipengine.label_checks"  # ... per labelled item: true, zero-shot and out-of-fold labels
# slices.json "format": 2 added the numeric bounds of binned predicates; 3 the multiple-testing family,
# error rates estimated where the slice was not selected (held-out rows), and the true group's columns
SLICES_FORMAT = 3
# one record of slices.json (one row of slices.parquet, which adds rank, slice, level, features, values,
# lows, highs); the true_* columns and "confirmed" are null without a labels file
SLICE_RECORD_KEYS = ("predicates", "bounds", "score", "size", "error_sum", "error_mean", "max_error", "ci_low",
                     "ci_high", "p_value", "q_value", "significant", "test_size", "test_error_sum",
                     "search_error_mean", "true_error_mean", "true_ci_low", "true_ci_high", "true_size",
                     "confirmed", "true_note")


# ---- items and their identity -----------------------------------------------------------------
def item_keys(items) -> list[str]:
    """One string per item: its path, plus its box when it has one (the identity used for resume)."""
    paths = items["path"].to_list()
    if "box" not in items.columns:
        return [str(p) for p in paths]
    keys = []
    for path, box in zip(paths, items["box"].to_list()):
        keys.append(str(path) if box is None else f"{path}\t{','.join(repr(float(v)) for v in box)}")
    return keys


def check_items(items) -> list[str]:
    """Check an items frame (``path`` str, optional ``file`` str, optional ``box`` list[f64] of 4 or
    null) and return its :func:`item_keys`; a one-line error for a missing path, a bad box or duplicates."""
    if "path" not in items.columns:
        raise ClipengineError("items: a 'path' column is required")
    if items["path"].null_count():
        raise ClipengineError("items: the 'path' column has empty values")
    if "box" in items.columns:
        for box in items["box"].to_list():
            if box is not None and len(box) != 4:
                raise ClipengineError(f"items: a box must be [x0, y0, x1, y1], got {box}")
    keys = item_keys(items)
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dupes = [key for key in keys if key in seen or seen.add(key)]
        raise ClipengineError(f"items: {len(dupes)} duplicate items (same path and box), e.g. {dupes[0]!r}")
    return keys


def item_files(items) -> list[str]:
    """What to decode for each item: its ``file`` column, else its ``path``."""
    return (items["file"] if "file" in items.columns else items["path"]).to_list()


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


def same_file(recorded, current) -> bool:
    """Whether a row encoded when its file had the (2,) stats ``recorded`` still stands for the file
    with stats ``current`` (see :func:`file_stats`)."""
    return tuple(int(v) for v in recorded) == tuple(int(v) for v in current)


def identity_of(record: dict) -> dict:
    """What must agree between two encodes for a row of one to be reused by the other."""
    return {"model_id": record.get("model_id"), "precision": record.get("precision"), "embed_dim": record["embed_dim"]}


def rows_digest(embeddings: np.ndarray) -> str:
    """sha256 of an (N, D) array's shape, dtype and bytes (streamed through a memory map in blocks)."""
    digest = hashlib.sha256(f"{embeddings.shape}{embeddings.dtype}".encode())
    block = max(1, (64 << 20) // max(1, embeddings.itemsize * (embeddings.shape[1] if embeddings.ndim == 2 else 1)))
    for start in range(0, embeddings.shape[0], block):
        digest.update(np.ascontiguousarray(embeddings[start:start + block]).data)
    return digest.hexdigest()


# ---- the encode outputs ---------------------------------------------------------------------------
@dataclass
class FinishedSet:
    """A previous finished encode in a folder, of the same model: ``rows`` key → row number in
    ``embeddings`` ((N, D), memory-mapped), only for items whose file is unchanged since. Empty when
    there is none or it is not trusted."""

    rows: dict[str, int]
    embeddings: np.ndarray | None = None


def read_finished(out_dir: str | os.PathLike, identity: dict, keys: list[str], stats: np.ndarray) -> FinishedSet:
    """The finished set in ``out_dir`` if ``items.parquet`` records ``identity`` and the digest of
    ``embeddings.npy`` as it is, less the rows whose file (``stats`` (N, 2) of the current ``keys``)
    changed since; rows stay on disk (memory-mapped)."""
    import polars as pl

    out_dir = Path(out_dir)
    items_path, emb_path = out_dir / ITEMS, out_dir / EMBEDDINGS
    if not (items_path.is_file() and emb_path.is_file()):
        return FinishedSet({})
    try:
        meta = read_parquet_metadata(items_path)
        if json.loads(meta.get(META_IDENTITY, "{}")) != identity:
            return FinishedSet({})
        embeddings = np.load(emb_path, mmap_mode="r", allow_pickle=False)
        if rows_digest(embeddings) != meta.get(META_EMBEDDINGS_SHA256):
            return FinishedSet({})  # a pair from an interrupted finalization: not trusted
        previous = pl.read_parquet(items_path)
        recorded = np.load(out_dir / ITEM_STATS, allow_pickle=False)
    except Exception:  # unreadable or foreign leftovers are re-encoded, never trusted
        return FinishedSet({})
    previous_keys = item_keys(previous)
    if len(previous_keys) != len(embeddings) or recorded.shape != (len(previous_keys), 2):
        return FinishedSet({})
    rows = {key: i for i, key in enumerate(previous_keys)}
    for key, current in zip(keys, stats):
        row = rows.get(key)
        if row is not None and not same_file(recorded[row], current):
            del rows[key]
    return FinishedSet(rows, embeddings)


def write_encoded(out_dir: str | os.PathLike, items, *, encoded: list[int], blocks: Iterable[np.ndarray],
                  skipped: list[tuple[int, str]], stats: np.ndarray, record: dict, dtype: str,
                  left_out: Iterable[tuple[str, str]] = ()) -> str:
    """Write the encode outputs of ``items`` (N rows) into ``out_dir``; the only writer of them.

    ``encoded``: the positions (ascending) of the items that have a row; ``blocks``: their (B, D)
    float32 rows in that order, streamed into a memory-mapped ``embeddings.npy`` of ``dtype`` (the
    writer never holds all rows); ``skipped``: (position, reason) of the others that were tried;
    ``left_out``: (path, reason) of inputs that never became items (listed after them, without a box);
    ``stats``: (N, 2) int64 file stats (:func:`file_stats`) taken before decoding; ``record``: the
    model record for ``model.json`` (``embed_dim`` required; ``n_items``/``n_skipped`` are set here).
    ``items.parquet`` is written last, with the digest of the rows: it marks the set as finished.
    Returns that digest.
    """
    import polars as pl
    from numpy.lib.format import open_memmap

    from clipengine.bindings.files import atomic_path, save_npy, write_json, write_parquet

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dim = int(record["embed_dim"])
    with atomic_path(out_dir / EMBEDDINGS) as tmp:
        embeddings = open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(len(encoded), dim))  # (N, D)
        row = 0
        for block in blocks:
            embeddings[row:row + len(block)] = block
            row += len(block)
        if row != len(encoded):
            raise RuntimeError(f"write_encoded: got {row} rows for {len(encoded)} encoded items")
        embeddings.flush()
        digest = rows_digest(embeddings)
        del embeddings
    keys = "box" in items.columns
    boxes = items["box"].to_list() if keys else None
    skipped = sorted(skipped)
    left_out = list(left_out)
    skipped_frame = pl.DataFrame(
        {
            "path": [items["path"][i] for i, _ in skipped] + [path for path, _ in left_out],
            **({"box": [boxes[i] for i, _ in skipped] + [None] * len(left_out)} if keys else {}),
            "reason": [reason for _, reason in skipped] + [reason for _, reason in left_out],
        },
        schema={"path": pl.String, **({"box": pl.List(pl.Float64)} if keys else {}), "reason": pl.String},
    )
    record = {**record, "n_items": len(encoded), "n_skipped": len(skipped) + len(left_out)}
    save_npy(out_dir / ITEM_STATS, stats[encoded] if encoded else np.empty((0, 2), np.int64))
    write_parquet(out_dir / SKIPPED, skipped_frame)
    write_json(out_dir / MODEL, record)
    write_parquet(out_dir / ITEMS, items[encoded] if encoded else items.clear(),
                  metadata={META_EMBEDDINGS_SHA256: digest, META_IDENTITY: json.dumps(identity_of(record), sort_keys=True)})
    return digest


def read_model_record(folder: str | os.PathLike) -> dict:
    """The ``model.json`` of an encode output folder (a one-line error if absent or not JSON)."""
    path = Path(folder) / MODEL
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClipengineError(f"{path}: not found; is {folder} the output of `clipengine encode`?") from None
    except ValueError as error:
        raise ClipengineError(f"{path}: not valid JSON ({error})") from None


@dataclass(frozen=True)
class EncodedDir:
    """An encode output folder: ``embeddings`` (N, D) (memory-mapped), ``items`` (N rows, ``path``
    [, ``box``] …) and the model ``record``."""

    path: Path
    embeddings: np.ndarray
    items: Any  # pl.DataFrame
    record: dict

    @property
    def model_id(self) -> str:
        return str(self.record.get("model_id") or "")


def read_encoded(folder: str | os.PathLike) -> EncodedDir:
    """Open ``folder`` (``embeddings.npy``, ``items.parquet``, ``model.json``) and check they agree."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ClipengineError(f"{folder}: not a directory (expected the output folder of `clipengine encode`)")
    record = read_model_record(folder)
    embeddings_path, items_path = folder / EMBEDDINGS, folder / ITEMS
    for path in (embeddings_path, items_path):
        if not path.is_file():
            raise ClipengineError(f"{path}: not found; is {folder} the output of `clipengine encode`?")
    try:
        embeddings = np.load(embeddings_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ClipengineError(f"{embeddings_path}: not a readable .npy array ({error})") from None
    if embeddings.ndim != 2 or embeddings.dtype.kind != "f":
        raise ClipengineError(f"{embeddings_path}: expected an (N, D) float array, got {embeddings.shape} {embeddings.dtype}")
    items = read_parquet_file(items_path)
    if "path" not in items.columns:
        raise ClipengineError(f"{items_path}: no 'path' column")
    if items.height != embeddings.shape[0]:
        raise ClipengineError(f"{folder}: {ITEMS} has {items.height} rows but {EMBEDDINGS} {embeddings.shape[0]}; "
                              "re-run `clipengine encode`")
    dim = record.get("embed_dim")
    if dim is not None and int(dim) != embeddings.shape[1]:
        raise ClipengineError(f"{embeddings_path}: width {embeddings.shape[1]} ≠ {MODEL} embed_dim {dim}")
    return EncodedDir(folder, embeddings, items, record)


def read_skipped(folder: str | os.PathLike):
    """``skipped.parquet`` of an encode output folder as a frame, or None when absent or unreadable."""
    path = Path(folder) / SKIPPED
    if not path.is_file():
        return None
    try:
        return read_parquet_file(path)
    except ClipengineError:
        return None


# ---- metadata (labels) ---------------------------------------------------------------------------
def key_columns(items):
    """The columns of ``items`` that identify an item: ``path`` [, ``box``]."""
    return items.select([c for c in KEY_COLUMNS if c in items.columns])


def write_metadata(path: str | os.PathLike, table, record: dict[str, str]) -> None:
    """Write a metadata table (:data:`KEY_COLUMNS` then the label columns) with its key/value ``record``
    (the ``META_*`` keys) atomically; every labelling ends here."""
    from clipengine.bindings.files import write_parquet

    write_parquet(path, table, metadata=record)


def attribute_columns(columns: Iterable[str]) -> list[str]:
    """The attribute names among a metadata table's columns (not keys, not ``_prob``/``_margin``/``_source``)."""
    return [c for c in columns if c not in KEY_COLUMNS and c != "file"
            and not c.endswith((PROB_SUFFIX, MARGIN_SUFFIX, SOURCE_SUFFIX))]


def read_adaptation(path: str | os.PathLike) -> tuple[dict, dict | None, dict | None]:
    """``(adaptation, labels, checks)`` recorded in a metadata file written with a labels file:
    ``{attribute: record}``, the labels file's record and the label checks (``{}, None, None`` without)."""
    meta = read_parquet_metadata(path)
    try:
        adaptation = json.loads(meta.get(META_ADAPTATION, "{}"))
        labels = json.loads(meta[META_LABELS]) if META_LABELS in meta else None
        checks = json.loads(meta[META_LABEL_CHECKS]) if META_LABEL_CHECKS in meta else None
    except ValueError as error:
        raise ClipengineError(f"{path}: its adaptation record is not readable JSON ({_first_line(error)})") from None
    return adaptation, labels, checks


# ---- errors -----------------------------------------------------------------------------------
def write_errors(run_dir: str | os.PathLike, frame) -> Path:
    """``errors.parquet``: ``path`` [, ``box``], ``error`` and the dataset's other columns."""
    from clipengine.bindings.files import write_parquet

    path = Path(run_dir) / ERRORS
    write_parquet(path, frame)
    return path


def read_joined(run_dir: str | os.PathLike, *, metadata: str = METADATA, errors_required: bool = True):
    """The table slicing sees: ``metadata`` ⋈ ``errors.parquet`` on :data:`KEY_COLUMNS` (inner join,
    metadata's row order). An errors column named like a metadata column is renamed ``given_<name>``.
    Returns ``(frame, attributes, extra)``: the attribute names and the errors table's other feature
    columns (not ``error``, not ``true_*``). Without ``errors.parquet`` and ``errors_required=False``:
    the metadata alone."""
    run_dir = Path(run_dir)
    labels = read_parquet_file(run_dir / metadata)
    attributes = attribute_columns(labels.columns)
    if not errors_required and not (run_dir / ERRORS).is_file():
        return labels, attributes, []
    errors = read_parquet_file(run_dir / ERRORS)
    keys = [k for k in KEY_COLUMNS if k in labels.columns and k in errors.columns]
    if "path" not in keys:
        raise ClipengineError(f"{run_dir}: {metadata} and {ERRORS} need a 'path' column each")
    attributes = attribute_columns(labels.columns)
    names = joined_names(attributes, errors.columns, source=str(run_dir / ERRORS))
    errors = errors.rename({c: n for c, n in names.items() if c != n})
    extra = [c for c in errors.columns
             if c not in KEY_COLUMNS and c != ERROR_COLUMN and not c.startswith(TRUTH_PREFIX) and not c.startswith("__")]
    frame = labels.join(errors, on=keys, how="inner", nulls_equal=True, maintain_order="left")
    return frame, attributes, extra


def joined_features(attributes: Iterable[str], dataset_features: Iterable[str], *, source: str = "the errors table"
                    ) -> list[str]:
    """The feature columns of :func:`read_joined`'s frame: the attributes, then the dataset's own
    features (renamed ``given_<name>`` where they clash with a metadata column). A one-line error
    when a renamed feature would clash again (:func:`joined_names`): run checks it before any work."""
    attributes = list(attributes)
    dataset_features = list(dataset_features)
    names = joined_names(attributes, dataset_features, source=source)
    return attributes + [names[f] for f in dataset_features]


def joined_names(attributes: Iterable[str], columns: Iterable[str], *, source: str = "the errors table"
                 ) -> dict[str, str]:
    """Each errors-table column → its name in the joined table: ``given_<name>`` where it is named
    like a metadata column (an attribute ``a``, ``a_prob`` or ``a_margin``), else its own. A one-line
    error naming both columns when two would end up with one name (an errors table with ``weather``
    and ``given_weather`` while the schema has an attribute ``weather``)."""
    metadata = {name + suffix: name for name in attributes for suffix in ("", PROB_SUFFIX, MARGIN_SUFFIX)}
    columns = list(columns)
    names = {c: GIVEN_PREFIX + c if c in metadata and c not in KEY_COLUMNS else c for c in columns}
    owner: dict[str, str] = {}
    for column, name in names.items():
        if column != name and (name in metadata or name in columns):
            other = f"the table has a column {name!r}" if name in columns else f"the schema makes a column {name!r}"
            clash = ("is also an attribute of the schema" if metadata[column] == column
                     else f"is also a column of the schema's attribute {metadata[column]!r}")
            raise ClipengineError(f"{source}: column {column!r} {clash}, so it would be sliced on as {name!r}, but "
                                  f"{other} too; rename one of them")
        if name in owner:
            raise ClipengineError(f"{source}: columns {owner[name]!r} and {column!r} would both be {name!r}; "
                                  "rename one of them")
        owner[name] = column
    return names


# ---- slices -----------------------------------------------------------------------------------
def write_slices(out_dir: str | os.PathLike, table, summary: dict, records: list[dict]) -> tuple[Path, Path]:
    """``slices.parquet`` (``table``: one row per slice) and ``slices.json`` (``summary`` + ``records``),
    atomically; deterministic (no timings)."""
    from clipengine.bindings.files import write_json, write_parquet

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"format": SLICES_FORMAT, **summary}
    write_parquet(out_dir / SLICES_PARQUET, table, metadata={META_SLICES: json.dumps(summary, sort_keys=True)})
    write_json(out_dir / SLICES_JSON, {**summary, "slices": records})
    return out_dir / SLICES_PARQUET, out_dir / SLICES_JSON


def read_slices(run_dir: str | os.PathLike) -> tuple[dict, list[dict]]:
    """``(summary, records)`` of ``slices.json``; a one-line error when it is absent, unreadable or of
    an older format (whose binned predicates carry no numeric bounds: run the slices stage again)."""
    path = Path(run_dir) / SLICES_JSON
    data = read_json_file(path)
    if not isinstance(data, dict) or not isinstance(data.get("slices"), list):
        raise ClipengineError(f"{path}: holds no slices (not written by `clipengine slices`)")
    if data.get("format") != SLICES_FORMAT:
        raise ClipengineError(f"{path}: written by an earlier clipengine (format {data.get('format')}, not "
                              f"{SLICES_FORMAT}); run `clipengine run` (or `clipengine slices`) again to rewrite it")
    records = [r for r in data["slices"] if isinstance(r, dict)]
    return {k: v for k, v in data.items() if k != "slices"}, records


# ---- coverage --------------------------------------------------------------------------------------
def write_coverage(out_dir: str | os.PathLike, table, summary: dict, record: dict) -> tuple[Path, Path]:
    """``coverage.parquet`` (``table``: one row per combination, ``summary`` in its metadata) and
    ``coverage.json`` (``record``), atomically; deterministic."""
    from clipengine.bindings.files import write_json, write_parquet

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_parquet(out_dir / COVERAGE_PARQUET, table, metadata={META_COVERAGE: json.dumps(summary, sort_keys=True)})
    write_json(out_dir / COVERAGE_JSON, record)
    return out_dir / COVERAGE_PARQUET, out_dir / COVERAGE_JSON


def read_coverage(run_dir: str | os.PathLike) -> dict | None:
    """``coverage.json`` of a run directory, or None when it has none."""
    path = Path(run_dir) / COVERAGE_JSON
    return read_json_file(path) if path.is_file() else None


# ---- labelling record ---------------------------------------------------------------------------
def read_labelling(run_dir: str | os.PathLike, *, metadata: str = METADATA) -> dict:
    """How a run's labels were made, from ``metadata.parquet``'s key/value record: ``model_id``,
    ``schema``, ``schema_hash``, ``attributes`` (name → its schema entry: kind, classes, prompts,
    strategy), ``thresholds`` (binary attribute → probability threshold). Empty where not recorded."""
    path = Path(run_dir) / metadata
    try:
        meta = read_parquet_metadata(path)
    except Exception:
        return {}
    record: dict[str, Any] = {"model_id": meta.get(META_MODEL_ID), "schema": meta.get(META_SCHEMA),
                              "schema_hash": meta.get(META_SCHEMA_HASH)}
    try:
        content = json.loads(meta[META_SCHEMA_CONTENT]) if META_SCHEMA_CONTENT in meta else {}
        thresholds = json.loads(meta[META_THRESHOLDS]) if META_THRESHOLDS in meta else {}
    except ValueError:
        raise ClipengineError(f"{path}: its schema record is not valid JSON") from None
    entries = content.get("attributes") if isinstance(content, dict) else None
    # the truth columns name where eval finds ground truth: not part of what a label means
    record["attributes"] = {str(e["name"]): {k: v for k, v in e.items() if k not in ("name", "truth")}
                            for e in entries or [] if isinstance(e, dict) and "name" in e}
    record["thresholds"] = thresholds if isinstance(thresholds, dict) else {}
    return record


# ---- comparison with a baseline ----------------------------------------------------------------------
COMPARED_INPUTS = (METADATA, ERRORS, SLICES_JSON)  # what a comparison reads of each run


def comparison_digest(run_dir: str | os.PathLike) -> str | None:
    """sha256 over the files a comparison reads of a run (:data:`COMPARED_INPUTS`); None when one is
    missing. ``compare.json`` records it for both runs, so a page can tell whether it is still current."""
    from clipengine.bindings.files import sha256_file

    run_dir = Path(run_dir)
    paths = [run_dir / name for name in COMPARED_INPUTS]
    if not all(path.is_file() for path in paths):
        return None
    return hashlib.sha256("".join(sha256_file(path) for path in paths).encode()).hexdigest()


def write_comparison(out_dir: str | os.PathLike, document: dict, items) -> tuple[Path, Path]:
    """``compare.json`` (``document``) and ``compare_items.parquet`` (``items``: ``path`` [, ``box``],
    ``old_error``, ``new_error``, ``change``), atomically; deterministic (no timings)."""
    from clipengine.bindings.files import write_json, write_parquet

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_parquet(out_dir / COMPARE_ITEMS, items)
    write_json(out_dir / COMPARE_JSON, document)
    return out_dir / COMPARE_JSON, out_dir / COMPARE_ITEMS


def comparison_is_current(run_dir: str | os.PathLike, document: dict) -> bool:
    """Whether ``document`` (a ``compare.json``) was made from ``run_dir``'s compared files as they are now."""
    new = document.get("new") if isinstance(document.get("new"), dict) else {}
    recorded = new.get("digest")
    return recorded is not None and recorded == comparison_digest(run_dir)


def read_comparison(run_dir: str | os.PathLike) -> tuple[dict, Any] | None:
    """``(compare.json, compare_items.parquet as a frame or None)``; None when there is no
    ``compare.json``; a one-line error when it is unreadable."""
    run_dir = Path(run_dir)
    path = run_dir / COMPARE_JSON
    if not path.is_file():
        return None
    document = read_json_file(path)
    if not isinstance(document, dict) or not isinstance(document.get("slices"), list):
        raise ClipengineError(f"{path}: holds no comparison (not written by `clipengine compare`)")
    items_path = run_dir / COMPARE_ITEMS
    items = read_parquet_file(items_path) if items_path.is_file() else None
    return document, items
def read_coverage_table(run_dir: str | os.PathLike, *, t: int | None = None):
    """The rows of ``coverage.parquet`` (of feature sets of ``t`` features only, when given; the file is
    filtered as it is read), feature and value columns as text; None when the run has no such file, a
    one-line error when it is unreadable."""
    import polars as pl

    path = Path(run_dir) / COVERAGE_PARQUET
    if not path.is_file():
        return None
    try:
        frame = pl.scan_parquet(path)
        if t is not None:
            frame = frame.filter(pl.col("t") == t)
        frame = frame.collect()
    except Exception as error:
        raise ClipengineError(f"{path}: not a readable coverage table ({_first_line(error)})") from None
    text = [c for c in frame.columns if c.startswith(("feature_", "value_"))]
    return frame.with_columns(pl.col(text).cast(pl.String))


# ---- label quality, summary, report ----------------------------------------------------------------
def write_label_quality(out_dir: str | os.PathLike, table, markdown: str) -> tuple[Path, Path]:
    """``label_quality.csv`` (``table``, a frame) and ``label_quality.md``, atomically."""
    from clipengine.bindings.files import atomic_path, write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / LABEL_QUALITY_CSV) as tmp:
        table.write_csv(tmp)
    write_text(out_dir / LABEL_QUALITY_MD, markdown)
    return out_dir / LABEL_QUALITY_CSV, out_dir / LABEL_QUALITY_MD


def read_label_quality(run_dir: str | os.PathLike):
    """``label_quality.csv`` as a frame, or None when absent."""
    import polars as pl

    path = Path(run_dir) / LABEL_QUALITY_CSV
    if not path.is_file():
        return None
    try:
        return pl.read_csv(path, infer_schema_length=0)
    except Exception as error:
        raise ClipengineError(f"{path}: not a readable CSV ({_first_line(error)})") from None


def write_summary(run_dir: str | os.PathLike, text: str) -> Path:
    from clipengine.bindings.files import write_text

    path = Path(run_dir) / SUMMARY
    write_text(path, text)
    return path


def read_summary(run_dir: str | os.PathLike) -> str | None:
    path = Path(run_dir) / SUMMARY
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None


def write_report(run_dir: str | os.PathLike, html: str) -> Path:
    from clipengine.bindings.files import write_text

    path = Path(run_dir) / REPORT
    write_text(path, html)
    return path


# ---- manifest -----------------------------------------------------------------------------------
def read_manifest(run_dir: str | os.PathLike) -> dict | None:
    """``manifest.json`` as a dict; None when absent or unreadable (written atomically, so only if
    edited by hand)."""
    try:
        data = json.loads((Path(run_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_manifest(run_dir: str | os.PathLike, data: dict) -> None:
    from clipengine.bindings.files import write_json

    write_json(Path(run_dir) / MANIFEST, data)


# ---- the lock and the inputs ---------------------------------------------------------------------
_HELD: dict[str, int] = {}  # run directories this process holds the lock of → depth


@contextlib.contextmanager
def locked(run_dir: str | os.PathLike) -> Iterator[None]:
    """One writer per run directory at a time: an advisory lock on ``RUN/.lock`` (released by the OS
    if the process is killed). A second writer gets one line naming the holder's pid. Re-entrant
    within a process (the run job holds it while a stage it calls takes it again)."""
    import fcntl

    run_dir = Path(run_dir)
    key = os.path.realpath(run_dir)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    path = run_dir / LOCK
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError as error:
        raise ClipengineError(f"{run_dir}: cannot write there ({error.strerror or error}); "
                              "give an output folder you can write") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ClipengineError(f"{run_dir} is in use by {holder}; wait for it to finish") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"clipengine pid {os.getpid()}")
        handle.flush()
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            handle.seek(0)
            handle.truncate()


def write_sheet_file(folder: str | os.PathLike, name: str, content: str | bytes) -> Path:
    """One file of a labelling sheet (:data:`SHEET_FILES`), written atomically."""
    from clipengine.bindings.files import write_bytes, write_text

    if name not in SHEET_FILES:
        raise ValueError(f"{name!r} is not a labelling sheet file")
    path = Path(folder) / name
    (write_bytes if isinstance(content, bytes) else write_text)(path, content)
    return path


def writable(folder: str | os.PathLike) -> bool:
    """Whether this process may create files in ``folder`` (for an absent folder: in the nearest
    existing folder above it). False on read-only storage, whoever runs."""
    probe = Path(os.path.abspath(folder))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return os.access(probe, os.W_OK | os.X_OK)


def check_inputs_kept(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike],
                      names: Iterable[str] = ()) -> None:
    """Refuse (one line) to write artifacts into ``out_dir`` where one of them would replace a file the
    user gave as input: ``names`` are the artifacts about to be written (default: every artifact name)."""
    out_dir = Path(out_dir)
    targets = {os.path.realpath(out_dir / name) for name in (names or _ALL_NAMES)}
    for given in inputs:
        if os.path.realpath(given) in targets:
            raise ClipengineError(f"{out_dir} holds your input {given}, which this run would overwrite with its own "
                                  f"{Path(given).name}; give another output folder (--out)")


# ---- plain readers ----------------------------------------------------------------------------------
def read_parquet_file(path: str | os.PathLike):
    """A Parquet file of a run directory as a frame; a one-line error naming it when it is absent or
    unreadable."""
    import polars as pl

    path = Path(path)
    if not path.is_file():
        raise ClipengineError(f"{path}: not found")
    try:
        return pl.read_parquet(path)
    except Exception as error:
        raise ClipengineError(f"{path}: not a readable Parquet file ({_first_line(error)})") from None


def parquet_rows(path: str | os.PathLike) -> int:
    """The number of rows of a Parquet file (from its footer)."""
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def read_json_file(path: str | os.PathLike):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClipengineError(f"{path}: not found") from None
    except (OSError, ValueError) as error:
        raise ClipengineError(f"{path}: not readable JSON ({_first_line(error)})") from None


def read_parquet_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The key/value metadata of a Parquet file (Arrow's own keys left out)."""
    from clipengine.bindings.files import read_parquet_metadata as read

    return read(path)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
