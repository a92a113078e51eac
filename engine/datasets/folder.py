"""Any image folder plus a table of the model's per-image errors.

``--errors FILE`` (default ``ROOT/errors.csv``, else ``ROOT/errors.parquet``) has a ``path``
column (relative to ROOT, ``/``-separated), an ``error`` column (0/1 or a non-negative
number) and optionally more columns: ``true_<attribute>`` columns are ground truth for the
schema attribute ``<attribute>`` (for eval); every other column is metadata to slice on.
Items are the rows of the table, in its order; images in ROOT that it does not list are
left out and counted.
"""

from __future__ import annotations

from pathlib import Path

from clipengine.datasets.base import Dataset, list_images, validate_errors
from clipengine.errors import ClipengineError
from clipengine.tables import read_table

TRUTH_PREFIX = "true_"


class FolderDataset(Dataset):
    name = "folder"
    default_schema = "scene"
    summary = "an image folder + errors.csv (path, error, metadata, true_<attribute>)"

    def __init__(self, root, config=None, *, progress=True):
        super().__init__(root, config, progress=progress)
        if self.config.errors is not None:
            self.errors_file = Path(self.config.errors).expanduser().resolve()
        else:
            candidates = [self.root / "errors.csv", self.root / "errors.parquet"]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise ClipengineError(f"no {candidates[0]} or {candidates[1]}; pass --errors FILE (path, error)")
            self.errors_file = found[0]
        self._table = None

    def settings(self) -> dict:
        return {"errors": str(self.errors_file), "limit": self.config.limit}

    def input_files(self) -> list[Path]:
        return [self.errors_file]

    def _read(self):
        if self._table is not None:
            return self._table
        import polars as pl

        source = str(self.errors_file)
        table = read_table(self.errors_file, what="errors")
        if "path" not in table.columns:
            raise ClipengineError(f"{source}: no 'path' column (columns: {', '.join(table.columns)})")
        table = validate_errors(table.with_columns(pl.col("path").cast(pl.String)), source=source)
        missing = table.get_column("path").is_null()
        if missing.any():
            raise ClipengineError(f"{source}: row {int(missing.arg_true()[0]) + 1} has no path")
        duplicated = table.get_column("path").is_duplicated()
        if duplicated.any():
            raise ClipengineError(f"{source}: path {table['path'][int(duplicated.arg_true()[0])]!r} is listed twice")
        escaping = table.get_column("path").map_elements(lambda p: Path(p).is_absolute() or ".." in Path(p).parts, return_dtype=pl.Boolean)
        if escaping.any():
            raise ClipengineError(f"{source}: path {table['path'][int(escaping.arg_true()[0])]!r} must be relative to {self.root} without '..'")
        if self.config.limit is not None:
            table = table.head(self.config.limit)
        if table.height == 0:
            raise ClipengineError(f"{source}: lists no image")
        listed = set(table.get_column("path").to_list())
        unlisted = [p for p in list_images(self.root) if p.relative_to(self.root).as_posix() not in listed]
        if unlisted:
            self.skipped.append({"what": "images", "file": str(self.root), "count": len(unlisted),
                                 "reason": f"not listed in {self.errors_file.name}"})
        self._table = table
        return table

    def list_items(self):
        import polars as pl

        table = self._read()
        return table.select("path", (pl.lit(str(self.root) + "/") + pl.col("path")).alias("file"))

    def load_errors(self):
        table = self._read()
        return table.select([c for c in table.columns if not c.startswith(TRUTH_PREFIX)])

    def error_features(self) -> list[str]:
        return [c for c in self._read().columns if c not in ("path", "error") and not c.startswith(TRUTH_PREFIX)]

    def load_truth(self):
        table = self._read()
        truth = [c for c in table.columns if c.startswith(TRUTH_PREFIX)]
        if not truth:
            return None
        return table.select(["path"] + truth)

    def truth_mapping(self) -> dict[str, str]:
        return {c[len(TRUTH_PREFIX):]: c for c in self._read().columns if c.startswith(TRUTH_PREFIX)}
