"""What ``clipengine coverage`` reads: a run directory (its metadata joined with its errors) or a table."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from clipengine.errors import ClipengineError


def read_run_table(run_dir: str | Path) -> pl.DataFrame:
    """A run directory's items as one frame: ``metadata.parquet`` (the labels, their ``_prob`` and
    ``_margin``) joined with ``errors.parquet`` on ``path`` (and ``box`` when both have it), as the slice
    stage joins them; without ``errors.parquet``, the metadata alone. An errors column named like a
    schema attribute gets the run's ``given_`` prefix."""
    from clipengine.annotate import KEY_COLUMNS, METADATA_FILE
    from clipengine.run import ERRORS_FILE, GIVEN_PREFIX

    run_dir = Path(run_dir)
    metadata_path = run_dir / METADATA_FILE
    if not metadata_path.is_file():
        raise ClipengineError(f"{run_dir}: no {METADATA_FILE} (annotate the run first: clipengine run, or "
                              f"clipengine annotate)")
    metadata = _read_parquet(metadata_path)
    errors_path = run_dir / ERRORS_FILE
    if not errors_path.is_file():
        return metadata
    errors = _read_parquet(errors_path)
    keys = [k for k in KEY_COLUMNS if k in metadata.columns and k in errors.columns]
    if "path" not in keys:
        raise ClipengineError(f"{errors_path}: no 'path' column to join with {METADATA_FILE}")
    labels = [c for c in metadata.columns if c not in keys]
    errors = errors.rename({c: GIVEN_PREFIX + c for c in errors.columns if c in labels})
    frame = metadata.join(errors, on=keys, how="inner", nulls_equal=True, maintain_order="left")
    if frame.height == 0:
        raise ClipengineError(f"{run_dir}: no item of {METADATA_FILE} has a row in {ERRORS_FILE}")
    return frame


def read_coverage_input(path: str | Path) -> tuple[pl.DataFrame, bool]:
    """``(frame, is_run)``: a run directory through :func:`read_run_table`, else a Parquet/CSV table."""
    from clipengine.slices import read_table

    path = Path(path)
    if path.is_dir():
        return read_run_table(path), True
    return read_table(path), False


def _read_parquet(path: Path) -> pl.DataFrame:
    try:
        return pl.read_parquet(path)
    except Exception as error:  # polars raises many kinds; the user needs one line
        raise ClipengineError(f"cannot read '{path}': {str(error).splitlines()[0]}") from None
