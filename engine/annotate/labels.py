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
the row and the column. CSV columns are read as text, as written.

A ``.json`` file is Label Studio's export of the tasks ``clipengine sample`` wrote
(``label_studio_tasks.json``): its JSON export (a list of tasks, each with ``data`` — ``path``
[, ``box``], ``inclusion_prob`` — and ``annotations``, whose last one not cancelled counts; each
``choices`` result's ``from_name`` is an attribute, its single choice the class) or its JSON-MIN
export (one flat object per task: ``path`` …, and the choice under the attribute's name). A task
without annotation is an item not labelled. Problems name the task and the field.
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


@dataclass(frozen=True)
class _Naming:
    """How a problem names a row and a column: a CSV's rows and columns, or a Label Studio export's
    tasks and fields."""

    row_word: str
    tasks: bool = False

    def row(self, number: int) -> str:
        return f"{self.row_word} {number}"

    def column(self, column: str) -> str:
        if not self.tasks:
            return f"column {column!r}"
        if column.startswith(TRUTH_PREFIX):
            return f"choice {column[len(TRUTH_PREFIX):]!r}"
        return f"data field {column!r}"


_CSV = _Naming("row")
_TASKS = _Naming("task", tasks=True)


def read_labels(path: str | os.PathLike, items: pl.DataFrame, classes: dict[str, tuple[str, ...]]) -> LabelSet:
    """Read a labels file for a run whose items are ``items`` (``items.parquet``'s rows) and whose
    schema's attributes have ``classes`` (``{attribute: class names}``)."""
    from clipengine.tables import read_table

    path = Path(path)
    where = str(path)
    if path.suffix.lower() == ".json":
        table, naming = label_studio_table(path, classes), _TASKS
    else:
        table, naming = read_table(path, what="labels", as_text=True), _CSV
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
            raise ClipengineError(f"{where}: {naming.column(column)} names no attribute of the schema "
                                  f"(attributes: {', '.join(classes)})")
    rows = _match_rows(table, items, where, naming)
    truth = {}
    for column in truth_columns:
        attribute = column[len(TRUTH_PREFIX):]
        truth[attribute] = _truth_values(table.get_column(column), classes[attribute], where, naming)
    if not any(any(v is not None for v in values) for values in truth.values()):
        raise ClipengineError(f"{where}: no {naming.row_word} has a true_<attribute> value yet; label some items first")
    population = items.height
    inclusion = _inclusion(table, where, population, naming)
    return LabelSet(rows=rows, truth=truth, inclusion=inclusion, population=population, source=path)


def _match_rows(table: pl.DataFrame, items: pl.DataFrame, where: str, naming: _Naming) -> np.ndarray:
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
                raise ClipengineError(f"{where}: {naming.row(number)}, {naming.column('box')}: {text!r} is not "
                                      "[x0, y0, x1, y1]") from None
            if box is not None and len(box) != 4:
                raise ClipengineError(f"{where}: {naming.row(number)}, {naming.column('box')}: {text!r} is not "
                                      "[x0, y0, x1, y1]")
            boxes.append(box)
        frame = frame.with_columns(pl.Series("box", boxes, dtype=pl.List(pl.Float64)))
    frame = frame.with_columns(pl.col("path").cast(pl.String))
    for number, value in enumerate(frame.get_column("path").to_list(), start=1):
        if value is None or not value.strip():
            raise ClipengineError(f"{where}: {naming.row(number)}, {naming.column('path')} is empty")
    position = {key: i for i, key in enumerate(item_keys(items))}
    rows = []
    seen: dict[int, int] = {}
    for number, key in enumerate(item_keys(frame), start=1):
        row = position.get(key)
        if row is None:
            raise ClipengineError(f"{where}: {naming.row(number)}, {naming.column('path')}: "
                                  f"{key.split(chr(9))[0]!r} is not an item of this run")
        if row in seen:
            raise ClipengineError(f"{where}: {naming.row(number)} repeats the item of {naming.row(seen[row])}")
        seen[row] = number
        rows.append(row)
    return np.asarray(rows, dtype=np.int64)


def _truth_values(series: pl.Series, classes: tuple[str, ...], where: str, naming: _Naming) -> np.ndarray:
    known = set(classes)
    values = []
    for number, value in enumerate(series.cast(pl.String).to_list(), start=1):
        if value is None or not value.strip():
            values.append(None)
            continue
        value = value.strip()
        if value not in known:
            raise ClipengineError(f"{where}: {naming.row(number)}, {naming.column(series.name)}: {value!r} is not a "
                                  f"class of the attribute (classes: {', '.join(classes)})")
        values.append(value)
    return np.asarray(values, dtype=object)


def _inclusion(table: pl.DataFrame, where: str, population: int, naming: _Naming) -> np.ndarray:
    if INCLUSION_COLUMN not in table.columns:
        return np.full(table.height, table.height / population, dtype=np.float64)
    column = table.get_column(INCLUSION_COLUMN)
    values = column.cast(pl.Float64, strict=False).to_numpy()
    for number, value in enumerate(values, start=1):
        if not (math.isfinite(value) and 0 < value <= 1):
            given = column[number - 1]
            shown = "an empty value" if given is None or not str(given).strip() else str(given).strip()
            raise ClipengineError(f"{where}: {naming.row(number)}, {naming.column(INCLUSION_COLUMN)}: "
                                  f"{shown} is not a probability in (0, 1]")
    return values.astype(np.float64)


# ---- Label Studio's export ---------------------------------------------------------------------
def label_studio_table(path: Path, classes: dict[str, tuple[str, ...]]) -> pl.DataFrame:
    """Label Studio's JSON (or JSON-MIN) export as the labels table: ``path`` [, ``box``],
    [``inclusion_prob``], ``true_<attr>`` (text; one row per task, in the file's order)."""
    where = str(path)
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ClipengineError(f"{where}: not a readable Label Studio JSON export ({first})") from None
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise ClipengineError(f"{where}: a Label Studio export is a list of tasks")
    if not tasks:
        raise ClipengineError(f"{where}: lists no labelled item")
    records: list[dict] = []
    for number, task in enumerate(tasks, start=1):
        if not isinstance(task, dict):
            raise ClipengineError(f"{where}: task {number} is not an object")
        if isinstance(task.get("data"), dict):
            data, choices = task["data"], _annotation_choices(task, number, where)
        else:  # JSON-MIN: the task's data and its choices side by side
            data = task
            choices = {name: value for name, value in task.items() if name in classes}
        record = {"path": _text(data.get("path"))}
        if "box" in data:
            box = data["box"]
            record["box"] = box if isinstance(box, str) or box is None else json.dumps(box)
        if INCLUSION_COLUMN in data:
            record[INCLUSION_COLUMN] = _text(data[INCLUSION_COLUMN])
        for name, value in choices.items():
            record[TRUTH_PREFIX + name] = _single_choice(value, name, number, where)
        records.append(record)
    if not any(key.startswith(TRUTH_PREFIX) for record in records for key in record):
        raise ClipengineError(f"{where}: no task has an annotation yet; label some items first")
    columns = list(dict.fromkeys(key for record in records for key in record))
    return pl.DataFrame({c: [r.get(c) for r in records] for c in columns}, schema={c: pl.String for c in columns})


def _annotation_choices(task: dict, number: int, where: str) -> dict:
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not annotations:
        return {}
    choices = {}
    for result in annotations[-1].get("result") or []:
        value = result.get("value") if isinstance(result, dict) else None
        if not isinstance(value, dict) or "choices" not in value:
            continue  # other controls (text areas, ratings) are not attributes
        name = result.get("from_name")
        if not isinstance(name, str):
            raise ClipengineError(f"{where}: task {number}: a choice without a 'from_name'")
        choices[name] = value["choices"]
    return choices


def _single_choice(value, name: str, number: int, where: str) -> str | None:
    if isinstance(value, dict):
        value = value.get("choices")
    if isinstance(value, list):
        if len(value) > 1:
            raise ClipengineError(f"{where}: task {number}, choice {name!r}: {len(value)} classes chosen; one per "
                                  "attribute")
        value = value[0] if value else None
    return _text(value)


def _text(value) -> str | None:
    return None if value is None else str(value)
