"""A labels file: a sample of a run's items whose true attribute values a person gave.

The contract (``clipengine sample`` writes it, a person fills it, ``annotate``/``eval``/``slices``/
``run --labels`` read it):

| column | meaning |
| --- | --- |
| ``path`` | the item, as ``items.parquet`` names it |
| ``box`` | for object datasets: the box as JSON text ``[x0, y0, x1, y1]`` (absent otherwise) |
| ``inclusion_prob`` | the probability the item had of being drawn into the sample (``n / N`` for a uniform draw); estimates weight each labelled item by its inverse |
| ``<attr>`` | the model's label when the sample was drawn (for reference; not read back) |
| ``true_<attr>`` | the person's label: a class of the schema's attribute, or empty for "not labelled" |

Only ``path`` (and ``box`` where the run has boxes) and at least one ``true_<attr>`` column are required;
a file without ``inclusion_prob`` is taken as a uniform sample of the run (``n / N``). Rows are matched
to the run's items by :func:`clipengine.artifacts.item_keys`. Every problem is one line naming the file,
the row and the column.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from clipengine.artifacts import LABELS_CSV, TRUTH_PREFIX, item_keys
from clipengine.errors import ClipengineError

INCLUSION_COLUMN = "inclusion_prob"
__all__ = ["INCLUSION_COLUMN", "LABELS_CSV", "LabelSet", "read_labels"]


@dataclass(frozen=True)
class LabelSet:
    """The labelled sample of a run: ``rows`` (n,) int64 positions into the run's items (ascending
    by nothing in particular: the file's order), ``truth`` ``{attribute: (n,) object array of class
    names or None}``, ``inclusion`` (n,) float64 in (0, 1], ``population`` N (the run's item count) and
    the ``source`` file."""

    rows: np.ndarray
    truth: dict[str, np.ndarray]
    inclusion: np.ndarray
    population: int
    source: Path

    @property
    def attributes(self) -> list[str]:
        return list(self.truth)

    def labelled(self, attribute: str) -> np.ndarray:
        """(n,) bool: the rows where ``attribute`` has a true value."""
        return np.asarray([value is not None for value in self.truth[attribute]], dtype=bool)

    def weights(self) -> np.ndarray:
        """(n,) float64 inverse inclusion probabilities (Horvitz–Thompson weights)."""
        return 1.0 / self.inclusion


def read_labels(path: str | os.PathLike, items: pl.DataFrame, classes: dict[str, tuple[str, ...]]) -> LabelSet:
    """Read a labels file for a run whose items are ``items`` (``items.parquet``'s rows) and whose
    schema's attributes have ``classes`` (``{attribute: class names}``)."""
    from clipengine.tables import read_table

    path = Path(path)
    table = read_table(path, what="labels")
    where = str(path)
    if table.height == 0:
        raise ClipengineError(f"{where}: lists no labelled item")
    if "path" not in table.columns:
        raise ClipengineError(f"{where}: no 'path' column (columns: {', '.join(table.columns)})")
    truth_columns = [c for c in table.columns if c.startswith(TRUTH_PREFIX)]
    if not truth_columns:
        raise ClipengineError(f"{where}: no true_<attribute> column (columns: {', '.join(table.columns)})")
    for column in truth_columns:
        attribute = column[len(TRUTH_PREFIX):]
        if attribute not in classes:
            raise ClipengineError(f"{where}: column {column!r} names no attribute of the schema "
                                  f"(attributes: {', '.join(classes)})")
    rows = _match_rows(table, items, where)
    truth = {}
    for column in truth_columns:
        attribute = column[len(TRUTH_PREFIX):]
        truth[attribute] = _truth_values(table.get_column(column), classes[attribute], where)
    if not any(any(v is not None for v in values) for values in truth.values()):
        raise ClipengineError(f"{where}: no row has a true_<attribute> value yet; label some items first")
    population = items.height
    inclusion = _inclusion(table, where, population)
    return LabelSet(rows=rows, truth=truth, inclusion=inclusion, population=population, source=path)


def _match_rows(table: pl.DataFrame, items: pl.DataFrame, where: str) -> np.ndarray:
    has_box = "box" in items.columns
    if has_box and "box" not in table.columns:
        raise ClipengineError(f"{where}: the run's items are object boxes; the labels file needs a 'box' column")
    frame = table.select("path", *(["box"] if has_box else []))
    if has_box:
        boxes = []
        for number, text in enumerate(frame.get_column("box").cast(pl.String).to_list(), start=1):
            try:
                box = json.loads(text) if text else None
                box = None if box is None else [float(v) for v in box]
            except (ValueError, TypeError):
                raise ClipengineError(f"{where}: row {number}, column 'box': {text!r} is not [x0, y0, x1, y1]") from None
            if box is not None and len(box) != 4:
                raise ClipengineError(f"{where}: row {number}, column 'box': {text!r} is not [x0, y0, x1, y1]")
            boxes.append(box)
        frame = frame.with_columns(pl.Series("box", boxes, dtype=pl.List(pl.Float64)))
    frame = frame.with_columns(pl.col("path").cast(pl.String))
    for number, value in enumerate(frame.get_column("path").to_list(), start=1):
        if value is None or not value.strip():
            raise ClipengineError(f"{where}: row {number}, column 'path' is empty")
    position = {key: i for i, key in enumerate(item_keys(items))}
    rows = []
    seen: dict[int, int] = {}
    for number, key in enumerate(item_keys(frame), start=1):
        row = position.get(key)
        if row is None:
            raise ClipengineError(f"{where}: row {number}, column 'path': {key.split(chr(9))[0]!r} is not an item "
                                  "of this run")
        if row in seen:
            raise ClipengineError(f"{where}: row {number} repeats the item of row {seen[row]}")
        seen[row] = number
        rows.append(row)
    return np.asarray(rows, dtype=np.int64)


def _truth_values(series: pl.Series, classes: tuple[str, ...], where: str) -> np.ndarray:
    known = set(classes)
    values = []
    for number, value in enumerate(series.cast(pl.String).to_list(), start=1):
        if value is None or not value.strip():
            values.append(None)
            continue
        value = value.strip()
        if value not in known:
            raise ClipengineError(f"{where}: row {number}, column {series.name!r}: {value!r} is not a class of the "
                                  f"attribute (classes: {', '.join(classes)})")
        values.append(value)
    return np.asarray(values, dtype=object)


def _inclusion(table: pl.DataFrame, where: str, population: int) -> np.ndarray:
    if INCLUSION_COLUMN not in table.columns:
        return np.full(table.height, table.height / population, dtype=np.float64)
    column = table.get_column(INCLUSION_COLUMN)
    try:
        values = column.cast(pl.Float64).to_numpy()
    except Exception:  # a non-numeric column
        raise ClipengineError(f"{where}: column {INCLUSION_COLUMN!r} must hold probabilities in (0, 1]") from None
    for number, value in enumerate(values, start=1):
        if not (math.isfinite(value) and 0 < value <= 1):
            raise ClipengineError(f"{where}: row {number}, column {INCLUSION_COLUMN!r}: {column[number - 1]!r} is not "
                                  "a probability in (0, 1]")
    return values.astype(np.float64)
