"""Any image folder plus a table of the model's per-image errors.

``--errors FILE`` (default ``ROOT/errors.csv``, else ``ROOT/errors.parquet``) has a ``path``
column (relative to ROOT, ``/``-separated), an ``error`` column (0/1 or a non-negative
number) and optionally more columns: ``true_<attribute>`` columns are ground truth for the
schema attribute ``<attribute>`` (for eval); every other column is metadata to slice on.
Items are the rows of the table, in its order; images in ROOT that it does not list are
left out and counted. Paths are normalised before anything else (``./a.jpg``, ``a.jpg`` and
``./x//a.jpg``-like spellings of one file are one item, and listing one file twice is refused);
absolute paths and ``..`` are refused. An image that is a symbolic link leading outside ROOT is left
out and counted (``RUN/manifest.json`` → ``dataset.skipped_inputs``) unless ``follow_links``
(``--follow-links``).
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

from clipengine.datasets.base import Dataset, validate_errors
from clipengine.encode.inputs import find_image_files, inside
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
        return {"errors": str(self.errors_file), "limit": self.config.limit, "follow_links": self.config.follow_links}

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
        missing = table.get_column("path").str.strip_chars().fill_null("").str.len_chars() == 0
        if missing.any():
            raise ClipengineError(f"{source}: row {int(missing.arg_true()[0]) + 1} has no path")
        escaping = table.get_column("path").map_elements(lambda p: Path(p).is_absolute() or ".." in Path(p).parts, return_dtype=pl.Boolean)
        if escaping.any():
            raise ClipengineError(f"{source}: path {table['path'][int(escaping.arg_true()[0])]!r} must be relative to {self.root} without '..'")
        given = table.get_column("path").to_list()
        table = table.with_columns(pl.Series("path", [posixpath.normpath(p) for p in given], dtype=pl.String))
        duplicated = table.get_column("path").is_duplicated()
        if duplicated.any():
            first = int(duplicated.arg_true()[0])
            second = next(i for i in duplicated.arg_true().to_list()[1:] if table["path"][i] == table["path"][first])
            spellings = f" ({given[first]!r} and {given[second]!r} name one file)" if given[first] != given[second] else ""
            raise ClipengineError(f"{source}: path {table['path'][first]!r} is listed twice, rows {first + 1} and "
                                  f"{second + 1}{spellings}")
        if self.config.limit is not None:
            table = table.head(self.config.limit)
        if table.height == 0:
            raise ClipengineError(f"{source}: lists no image")
        listing = find_image_files(self.root, follow_links=self.config.follow_links)
        prefix = len(str(self.root)) + 1
        walked = {f[prefix:] for f in listing.files}  # relative paths of the images under ROOT
        listed = set(table.get_column("path").to_list())
        unlisted = len(walked - listed)
        if unlisted:
            self.skipped.append({"what": "images", "file": str(self.root), "count": unlisted,
                                 "reason": f"not listed in {self.errors_file.name}"})
        if not self.config.follow_links:
            table = self._drop_links_outside(table, walked, source)
        self._table = table
        return table

    def _drop_links_outside(self, table, walked: set[str], source: str):
        """``table`` without the rows whose image is a symbolic link leading outside ROOT (counted in
        ``skipped``). The walk already vouches for the files it found inside; only the others (in
        linked folders, hidden, absent) are resolved here."""
        import polars as pl

        real_root = os.path.realpath(self.root)
        outside = [i for i, path in enumerate(table.get_column("path").to_list())
                   if path not in walked and not inside(os.path.realpath(self.root / path), real_root)]
        if not outside:
            return table
        example = table["path"][outside[0]]
        self.skipped.append({"what": "images", "file": str(self.root), "count": len(outside),
                             "reason": f"links leading outside {self.root} (e.g. {example}); pass --follow-links "
                                       "to read them"})
        kept = table.with_row_index("__row").filter(~pl.col("__row").is_in(outside)).drop("__row")
        if kept.height == 0:
            raise ClipengineError(f"{source}: every image it lists is a link leading outside {self.root}; "
                                  "pass --follow-links to read them")
        return kept

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
