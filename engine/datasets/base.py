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
from clipengine.tables import check_error_column

if TYPE_CHECKING:  # pragma: no cover
    import polars as pl


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
        """Schema attribute → how its truth is read from :meth:`load_truth` (a ``clipengine.annotate.evaluate``
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
    """Image files under ``folder`` (recursive, hidden entries left out), sorted by relative POSIX path."""
    from clipengine.encode.inputs import list_image_files

    return [Path(p) for p in list_image_files(folder)]


def validate_errors(frame: "pl.DataFrame", *, source: str, column: str = "error") -> "pl.DataFrame":
    """``frame`` with ``column`` checked by the slices stage's rules
    (:func:`clipengine.tables.check_error_column`) and cast to Float64."""
    import polars as pl

    return frame.with_columns(pl.Series(column, check_error_column(frame, column, source=source), dtype=pl.Float64))
