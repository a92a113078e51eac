"""Read a run directory into what the report shows; nothing else feeds the report.

Every file is optional except the item table: a missing or unreadable file leaves its
section empty with a note saying why, so a half-finished run still gets a page.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipengine import artifacts
from clipengine.artifacts import ERROR_COLUMN, GIVEN_PREFIX, KEY_COLUMNS
from clipengine.errors import ClipengineError

ROW_COLUMN = "__row"


@dataclass
class RunData:
    """Everything the report shows, read from one run directory.

    ``frame`` has one row per item (row order of ``items.parquet`` when present), the
    columns ``__row`` (int), ``path``, ``file``, ``box`` (list[f64] or null), the metadata
    attributes with their ``_prob`` / ``_margin`` columns, ``error`` and the geometric
    metadata from ``errors.parquet``.
    """

    run_dir: Path
    manifest: dict[str, Any]
    frame: Any  # pl.DataFrame
    attributes: list[str]  # schema attributes (from metadata.parquet), in file order
    extra_features: list[str]  # other feature columns (from errors.parquet)
    has_error: bool
    slices: list[dict[str, Any]] | None
    slices_summary: dict[str, Any]  # run-level facts of slices.json: n_evaluated, params, skipped_features...
    label_quality: list[dict[str, str]] | None
    label_quality_columns: list[str]
    summary_md: str | None
    skipped: int | None
    skipped_reasons: list[tuple[str, int]]
    notes: dict[str, str] = field(default_factory=dict)  # section -> why it is empty
    comparison: dict[str, Any] | None = None  # compare.json, when it describes the run's current files
    comparison_items: Any = None  # compare_items.parquet as a frame (or None)
    coverage: dict[str, Any] | None = None  # coverage.json
    coverage_pairs: Any = None  # pl.DataFrame: coverage.parquet's rows of feature pairs (t = 2)


def read_run(run_dir: str | Path) -> RunData:
    """Read ``run_dir``'s files; raise :class:`ClipengineError` when it holds no run at all."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ClipengineError(f"{run_dir}: not a run directory (it does not exist)")
    notes: dict[str, str] = {}
    manifest = artifacts.read_manifest(run_dir)
    if manifest is None:
        notes["manifest"] = f"{artifacts.MANIFEST} not found or unreadable"
        manifest = {}

    items = _read_parquet(run_dir / artifacts.ITEMS, notes, "items")
    metadata = _read_parquet(run_dir / artifacts.METADATA, notes, "metadata")
    errors = _read_parquet(run_dir / artifacts.ERRORS, notes, "errors")
    if items is None and metadata is None and errors is None:
        raise ClipengineError(f"{run_dir}: not a run directory (none of {artifacts.ITEMS}, {artifacts.METADATA}, "
                              f"{artifacts.ERRORS} found)")

    frame, attributes, extra = _join(items, metadata, errors, run_dir)
    has_error = ERROR_COLUMN in frame.columns
    if not has_error:
        notes.setdefault("errors", f"{artifacts.ERRORS} is missing: no error rates to show")

    slices: list[dict[str, Any]] | None = None
    slices_summary: dict[str, Any] = {}
    if (run_dir / artifacts.SLICES_JSON).is_file():
        try:
            slices_summary, slices = artifacts.read_slices(run_dir)
        except ClipengineError as error:
            notes["slices"] = str(error)
    else:
        notes["slices"] = f"{artifacts.SLICES_JSON} not found"

    label_quality, lq_columns = _read_csv(run_dir / artifacts.LABEL_QUALITY_CSV)
    if label_quality is None:
        notes["label_quality"] = f"no ground truth in this run ({artifacts.LABEL_QUALITY_CSV} not found)"

    summary_md = artifacts.read_summary(run_dir)
    skipped, reasons = _read_skipped(run_dir)
    comparison, comparison_items = _read_comparison(run_dir, notes)
    coverage, coverage_pairs = _read_coverage(run_dir, notes)
    return RunData(
        run_dir=run_dir,
        manifest=manifest,
        frame=frame,
        attributes=attributes,
        extra_features=extra,
        has_error=has_error,
        slices=slices,
        slices_summary=slices_summary,
        label_quality=label_quality,
        label_quality_columns=lq_columns,
        summary_md=summary_md,
        skipped=skipped,
        skipped_reasons=reasons,
        notes=notes,
        comparison=comparison,
        comparison_items=comparison_items,
        coverage=coverage,
        coverage_pairs=coverage_pairs,
    )


def _read_comparison(run_dir: Path, notes: dict[str, str]):
    """compare.json (+ its items) when present and still about this run's files; else a note why not."""
    try:
        found = artifacts.read_comparison(run_dir)
    except ClipengineError as error:
        notes["baseline"] = str(error)
        return None, None
    if found is None:
        return None, None
    document, items = found
    if not artifacts.comparison_is_current(run_dir, document):
        notes["baseline"] = (f"{artifacts.COMPARE_JSON} was made from this run's files as they were before they "
                             f"changed; run `clipengine compare BASELINE {run_dir} --out {run_dir}` again")
        return None, None
    return document, items


def _read_coverage(run_dir: Path, notes: dict[str, str]):
    """(coverage.json, coverage.parquet's pair rows), each None with a note when absent or unreadable."""
    try:
        coverage = artifacts.read_coverage(run_dir)
    except ClipengineError as error:
        notes["coverage"] = str(error)
        return None, None
    if coverage is None:
        notes["coverage"] = f"{artifacts.COVERAGE_JSON} not found"
        return None, None
    if not isinstance(coverage, dict):
        notes["coverage"] = f"{artifacts.COVERAGE_JSON} holds no coverage (not written by clipengine)"
        return None, None
    try:
        pairs = artifacts.read_coverage_table(run_dir, t=2)
    except ClipengineError as error:
        notes["coverage_table"] = str(error)
        pairs = None
    return coverage, pairs


def _read_parquet(path: Path, notes: dict[str, str], section: str):
    if not path.is_file():
        notes[section] = f"{path.name} not found"
        return None
    try:
        return artifacts.read_parquet_file(path)
    except ClipengineError as error:  # a truncated or foreign file: say so in the page
        notes[section] = str(error)
        return None


def _read_csv(path: Path) -> tuple[list[dict[str, str]] | None, list[str]]:
    if not path.is_file():
        return None, []
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return rows, list(reader.fieldnames or [])


def _read_skipped(run_dir: Path) -> tuple[int | None, list[tuple[str, int]]]:
    import polars as pl

    skipped = artifacts.read_skipped(run_dir)
    if skipped is None:
        return None, []
    reasons: list[tuple[str, int]] = []
    if "reason" in skipped.columns and skipped.height:
        # "corrupt: detail" -> "corrupt": the code before the detail
        codes = skipped.get_column("reason").cast(pl.Utf8).fill_null("unknown").str.split(":").list.first()
        counts = codes.value_counts(sort=True)
        reasons = sorted(((str(r[0]), int(r[1])) for r in counts.iter_rows()), key=lambda rc: (-rc[1], rc[0]))
    return skipped.height, reasons


def _key_frame(frame, with_box: bool):
    """Add a join key: the path, and the box written out exactly (lists do not join)."""
    import polars as pl

    key = pl.col("path").cast(pl.Utf8)
    if with_box and "box" in frame.columns:
        box = pl.col("box").cast(pl.List(pl.Float64)).list.eval(pl.element().cast(pl.Utf8)).list.join(",")
        key = pl.concat_str([key, pl.lit("\x1f"), box.fill_null("")])
    return frame.with_columns(key.alias("__key"))


def _join(items, metadata, errors, run_dir: Path):
    """One row per item: items ⟕ metadata ⟕ errors on (path, box)."""
    import polars as pl

    base = items if items is not None else (metadata if metadata is not None else errors)
    if "path" not in base.columns:
        raise ClipengineError(f"{run_dir}: the item table has no 'path' column")
    frame = base.select([c for c in base.columns if c in ("path", "file", "box")])
    if "file" not in frame.columns:
        frame = frame.with_columns(pl.col("path").alias("file"))
    if "box" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, dtype=pl.List(pl.Float64)).alias("box"))
    frame = frame.with_row_index(ROW_COLUMN)

    attributes: list[str] = []
    extra: list[str] = []
    present: list[str] = []
    for table, name in ((metadata, artifacts.METADATA), (errors, artifacts.ERRORS)):
        if table is None:
            continue
        if "path" not in table.columns:
            raise ClipengineError(f"{run_dir / name}: no 'path' column")
        if name == artifacts.METADATA:
            payload = [c for c in table.columns if c not in KEY_COLUMNS and c not in frame.columns]
            attributes = artifacts.attribute_columns(payload)
        else:
            # a dataset column named like a schema attribute is sliced on as given_<name> (as run does)
            clashing = {c: GIVEN_PREFIX + c for c in table.columns if c not in KEY_COLUMNS and c in frame.columns}
            table = table.rename(clashing)
            payload = [c for c in table.columns if c not in KEY_COLUMNS]
            extra = [c for c in payload if c != ERROR_COLUMN and not c.startswith("__")]
        marker = f"__in_{name.split('.')[0]}"
        present.append(marker)
        table = table.with_columns(pl.lit(True).alias(marker))
        payload.append(marker)
        if table.height == frame.height and table.get_column("path").cast(pl.Utf8).equals(
            frame.get_column("path").cast(pl.Utf8)
        ):
            # same items in the same order (the usual case): no join needed
            frame = frame.with_columns(table.select(payload))
            continue
        with_box = "box" in table.columns
        right = _key_frame(table, with_box).select(["__key", *payload]).unique("__key", keep="first")
        left = _key_frame(frame, with_box)
        frame = left.join(right, on="__key", how="left").drop("__key").sort(ROW_COLUMN)
    if present:
        # the items slicing saw: those with metadata and an error row (an inner join, as in run)
        frame = frame.filter(pl.all_horizontal([pl.col(m).fill_null(False) for m in present])).drop(present)
        frame = frame.drop(ROW_COLUMN).with_row_index(ROW_COLUMN)
    return frame, attributes, extra


def finite_or_none(value: Any) -> float | None:
    """A float when ``value`` is a finite number, else None (JSON nulls, NaN, strings)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
