"""Tables users give: CSV, TSV or Parquet in; the error column checked by one set of rules.

Every user table (errors, predictions, boxes, ground truth, a table to slice) is read by
:func:`read_table`, and every error column is checked by :func:`check_error_column` at the first
stage that reads it, so bad values fail before any expensive work with one line naming the file
and row.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from clipengine.errors import ClipengineError

PARQUET_SUFFIXES = (".parquet", ".pq")
TAB_SUFFIXES = (".tsv", ".tab")
INFER_SCHEMA_ROWS = 10_000


def read_table(path: str | os.PathLike, *, what: str = "table", as_text: bool = False):
    """A CSV, TSV (``.tsv``/``.tab``) or Parquet (``.parquet``/``.pq``) file as a Polars frame; another
    suffix is tried as Parquet, then CSV. A one-line error naming ``what`` and the file when it is
    missing or unreadable. ``as_text``: every CSV column as text, as written (``007`` stays ``007``)."""
    import polars as pl

    infer = {"infer_schema": False} if as_text else {"infer_schema_length": INFER_SCHEMA_ROWS}

    path = Path(path)
    if not path.is_file():
        raise ClipengineError(f"{what} file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in PARQUET_SUFFIXES:
            return pl.read_parquet(path)
        if suffix in TAB_SUFFIXES:
            return pl.read_csv(path, separator="\t", **infer)
        if suffix == ".csv":
            return pl.read_csv(path, **infer)
        try:
            return pl.read_parquet(path)
        except Exception:
            return pl.read_csv(path, **infer)
    except Exception as error:  # polars raises many kinds; the user needs one line
        text = str(error).strip()
        first = text.splitlines()[0] if text else type(error).__name__
        raise ClipengineError(f"cannot read {what} file {path}: {first}") from None


def check_error_column(frame, column: str, *, source: str) -> np.ndarray:
    """The (n,) float64 values of ``frame[column]`` after checking they are errors: numeric or
    boolean, present, finite and non-negative. ``source`` names the table in the one-line error."""
    import polars as pl

    if column not in frame.columns:
        raise ClipengineError(f"{source}: no error column '{column}' (columns: {', '.join(frame.columns)})")
    if frame.height == 0:
        raise ClipengineError(f"{source}: lists no item (the table has a header but no rows)")
    series = frame.get_column(column)
    if not (series.dtype.is_numeric() or series.dtype == pl.Boolean):
        raise ClipengineError(f"{source}: error column '{column}' must be numeric (0/1 or a non-negative number), "
                              f"not {series.dtype}")
    values = series.cast(pl.Float64).to_numpy().astype(np.float64)
    for problem, bad in (("a missing value", np.isnan(values) | series.is_null().to_numpy()),
                         ("a value that is not finite", np.isinf(values)),
                         ("a negative value", values < 0)):
        rows = np.flatnonzero(bad)
        if rows.size:
            row = int(rows[0])
            more = f" (and {rows.size - 1} more)" if rows.size > 1 else ""
            raise ClipengineError(f"{source}: row {row + 1} of error column '{column}' has {problem} "
                                  f"({series[row]!r}){more}; errors must be finite and ≥ 0")
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow is the finding, not a warning to print
        summable = np.isfinite(values.sum()) and np.isfinite(np.dot(values, values))
    if not summable:
        raise ClipengineError(f"{source}: error column '{column}' holds values too large to add up "
                              f"(largest {values.max():g}); rescale them")
    return values
