"""What ``clipengine coverage`` reads: a run directory (its metadata joined with its errors) or a table."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from clipengine.errors import ClipengineError


def read_run_table(run_dir: str | Path) -> pl.DataFrame:
    """A run directory's items as one frame: ``metadata.parquet`` (the labels, their ``_prob`` and
    ``_margin``) joined with ``errors.parquet`` as the slice stage joins them
    (:func:`clipengine.artifacts.read_joined`); without ``errors.parquet``, the metadata alone."""
    from clipengine import artifacts

    run_dir = Path(run_dir)
    if not (run_dir / artifacts.METADATA).is_file():
        raise ClipengineError(f"{run_dir}: no {artifacts.METADATA} (annotate the run first: clipengine run, or "
                              "clipengine annotate)")
    frame, _, _ = artifacts.read_joined(run_dir, errors_required=False)
    if frame.height == 0:
        raise ClipengineError(f"{run_dir}: no item of {artifacts.METADATA} has a row in {artifacts.ERRORS}")
    return frame


def read_coverage_input(path: str | Path) -> tuple[pl.DataFrame, bool]:
    """``(frame, is_run)``: a run directory through :func:`read_run_table`, else a Parquet/CSV table."""
    from clipengine.tables import read_table

    path = Path(path)
    if path.is_dir():
        return read_run_table(path), True
    return read_table(path, what="table"), False


def run_features(run_dir: str | Path) -> list[str] | None:
    """The features ``clipengine run`` covers in ``run_dir`` (and slices on): the list its
    ``manifest.json`` records — the schema's attributes, then the dataset's own feature columns
    (:func:`clipengine.artifacts.joined_features`); None for a folder without that record (e.g. one
    written by ``clipengine annotate`` alone)."""
    from clipengine import artifacts

    manifest = artifacts.read_manifest(run_dir) or {}
    features = manifest.get("features")
    if isinstance(features, list) and features and all(isinstance(f, str) for f in features):
        return list(features)
    return None


def run_values(run_dir: str | Path) -> dict[str, list[str]]:
    """Each schema attribute's classes, in the schema's order, from the schema record ``metadata.parquet``
    carries: the values a run's attribute can take, seen or not (a class no item was given is a
    missing combination); {} when the file has no record."""
    import json

    from clipengine import artifacts

    try:
        meta = artifacts.read_parquet_metadata(Path(run_dir) / artifacts.METADATA)
        content = json.loads(meta.get(artifacts.META_SCHEMA_CONTENT) or "null")
    except (ClipengineError, OSError, ValueError):
        return {}
    values = {}
    for attribute in (content or {}).get("attributes", []) if isinstance(content, dict) else []:
        if not isinstance(attribute, dict) or not isinstance(attribute.get("classes"), list):
            continue
        names = [c.get("name") for c in attribute["classes"] if isinstance(c, dict)]
        if names and all(isinstance(n, str) for n in names) and len(set(names)) == len(names):
            values[str(attribute.get("name"))] = names
    return values
