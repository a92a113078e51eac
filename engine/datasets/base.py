"""The interface every dataset adapter implements, and the helpers they share.

An adapter turns a dataset on disk plus the model-under-test's outputs into three frames:

- ``list_items()``: what to encode, one row per item: ``path`` (str, the item id, stable),
  ``file`` (str, the image to decode) and, for object datasets, ``box`` (list[f64]
  ``[x0, y0, x1, y1]`` pixels).
- ``load_errors()``: the model's per-item error keyed like the items (``path`` [+ ``box``]):
  ``error`` (0/1 or a non-negative float) plus metadata columns; those named by
  ``error_features()`` become slice features beside the CLIP attributes.
- ``load_truth()``: optional ground truth for label-quality evaluation, keyed like the items,
  one column per attribute (named as the dataset names it; the schema's ``truth`` keys or
  ``truth_mapping()`` say which column feeds which attribute).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from clipengine.bindings.files import sha256_file
from clipengine.config import DatasetConfig
from clipengine.errors import ClipengineError

if TYPE_CHECKING:  # pragma: no cover
    import polars as pl

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class Dataset(ABC):
    """One dataset adapter. Subclasses set the class attributes and the three loaders."""

    name: ClassVar[str]
    default_schema: ClassVar[str]
    summary: ClassVar[str]
    keys: ClassVar[tuple[str, ...]] = ("path",)
    needs_root: ClassVar[bool] = True

    def __init__(self, root: Path | None, config: DatasetConfig | None = None, *, progress: bool = True):
        self.config = config or DatasetConfig()
        self.progress = progress
        if root is None and self.needs_root:
            raise ClipengineError(f"dataset '{self.name}' needs --root DIR")
        self.root = Path(root).expanduser().resolve() if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise ClipengineError(f"dataset root {self.root} is not a folder")
        #: things left out while reading the inputs: {"what", "file", "line", "reason"}
        self.skipped: list[dict] = []

    @abstractmethod
    def list_items(self) -> "pl.DataFrame":
        """Items to encode: ``path``, ``file`` [, ``box``]; deterministic order."""

    @abstractmethod
    def load_errors(self) -> "pl.DataFrame":
        """``path`` [, ``box``], ``error`` and metadata columns, one row per item."""

    def load_truth(self) -> "pl.DataFrame | None":
        """Ground truth keyed like the items, or None when the dataset has none."""
        return None

    def error_features(self) -> list[str]:
        """Metadata columns of :meth:`load_errors` to slice on (besides the CLIP attributes)."""
        return []

    def truth_mapping(self) -> dict[str, str]:
        """Schema attribute → how its truth is read from :meth:`load_truth` (a ``clipengine.evaluate``
        SPEC, e.g. a column name), for attributes whose schema ``truth`` key does not say it."""
        return {}

    @abstractmethod
    def input_files(self) -> list[Path]:
        """The label/prediction files the errors and truth are read from (hashed in full)."""

    def settings(self) -> dict:
        """The adapter options that change its outputs (recorded and fingerprinted)."""
        return {}

    def fingerprint(self, items: "pl.DataFrame") -> str:
        """A hash of everything the adapter's outputs depend on: listed image files (name, size,
        modification time), input files (content) and settings."""
        digest = hashlib.sha256()
        digest.update(json.dumps({"dataset": self.name, "settings": self.settings()}, sort_keys=True, default=str).encode())
        for record in describe_files(self.input_files()):
            digest.update(json.dumps(record, sort_keys=True).encode())
        digest.update(hash_listing(items).encode())
        return digest.hexdigest()


def describe_files(paths: list[Path]) -> list[dict]:
    """``[{"file", "size", "sha256"}]`` for the manifest, in the given order."""
    out = []
    for path in paths:
        path = Path(path)
        out.append({"file": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)})
    return out


def hash_listing(items: "pl.DataFrame") -> str:
    """Hash of the item listing plus each distinct file's size and modification time
    (cheap: image contents are not read)."""
    digest = hashlib.sha256()
    columns = [c for c in ("path", "file", "box") if c in items.columns]
    for row in items.select(columns).iter_rows():
        digest.update(repr(row).encode())
    if "file" in items.columns:
        for name in items.get_column("file").unique(maintain_order=True).to_list():
            try:
                stat = Path(name).stat()
                digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
            except OSError:
                digest.update(f"{name}\0missing".encode())
    return digest.hexdigest()


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by relative POSIX path."""
    found = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def read_table(path: Path, *, what: str) -> "pl.DataFrame":
    """A CSV (comma, tab or whitespace-free) or Parquet table; a one-line error if unreadable."""
    import polars as pl

    path = Path(path)
    if not path.is_file():
        raise ClipengineError(f"{what} file {path} does not exist")
    try:
        if path.suffix.lower() == ".parquet":
            return pl.read_parquet(path)
        separator = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
        return pl.read_csv(path, separator=separator, infer_schema_length=10_000)
    except Exception as error:  # polars raises many kinds; the user needs one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ClipengineError(f"cannot read {what} file {path}: {first}") from None


def validate_errors(frame: "pl.DataFrame", *, source: str, column: str = "error") -> "pl.DataFrame":
    """Check that ``column`` is numeric, non-null and non-negative; return it as Float64."""
    import polars as pl

    if column not in frame.columns:
        raise ClipengineError(f"{source}: no '{column}' column (columns: {', '.join(frame.columns)})")
    values = frame.get_column(column)
    if not values.dtype.is_numeric() and values.dtype != pl.Boolean:
        raise ClipengineError(f"{source}: column '{column}' must be numeric (0/1 or a non-negative number), got {values.dtype}")
    values = values.cast(pl.Float64)
    bad = (values.is_null() | values.is_nan() | (values < 0)).arg_true()
    if len(bad):
        row = int(bad[0])
        raise ClipengineError(
            f"{source}: row {row + 1} has error {frame.get_column(column)[row]!r}; errors must be non-negative numbers"
        )
    return frame.with_columns(values.alias(column))
