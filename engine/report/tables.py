"""The numbers the report shows: overall rate, slices with membership, per-attribute classes.

Error rates of 0/1 errors get Wilson score intervals; errors with other values get
a normal interval of the mean. Slice statistics are taken from ``slices.json`` as
SliceLine wrote them; the report only recomputes slice membership (to pick examples)
and says so when the recomputed size disagrees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from clipengine.artifacts import ERROR_COLUMN, PROB_SUFFIX
from clipengine.report.rundir import RunData, finite_or_none

CONFIDENCE = 0.95
MAX_CLASSES = 30  # classes shown per attribute; the rest are summed into "other"
NUMERIC_BINS = 5  # quantile bins for numeric features in the per-attribute section
MAX_NUMERIC_DISTINCT = 12  # numeric features with this few values are shown per value


def wilson_interval(successes: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion; (nan, nan) when n == 0."""
    if n <= 0:
        return float("nan"), float("nan")
    z = _z(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes <= 0 else max(0.0, centre - half)  # exact ends, not rounding noise
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return low, high


def _z(confidence: float) -> float:
    """The two-sided normal quantile (1.959964 for 95 %)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


def mean_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(low, high) of the mean of ``values``: Wilson for 0/1 values, normal otherwise."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    n = values.size
    if n == 0:
        return float("nan"), float("nan")
    if np.all((values == 0) | (values == 1)):
        return wilson_interval(float(values.sum()), n, confidence)
    z = _z(confidence)
    mean = float(values.mean())
    half = z * float(values.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    return mean - half, mean + half


@dataclass
class Overall:
    n: int
    error_sum: float
    rate: float | None
    ci_low: float | None
    ci_high: float | None
    binary: bool


def overall_rate(run: RunData) -> Overall:
    import numpy as np

    if not run.has_error:
        return Overall(run.frame.height, 0.0, None, None, None, True)
    errors = run.frame.get_column(ERROR_COLUMN).cast(float).to_numpy()
    errors = errors[np.isfinite(errors)]
    if errors.size == 0:
        return Overall(run.frame.height, 0.0, None, None, None, True)
    low, high = mean_interval(errors)
    binary = bool(np.all((errors == 0) | (errors == 1)))
    return Overall(int(errors.size), float(errors.sum()), float(errors.mean()), low, high, binary)


@dataclass
class SliceRow:
    """One slice of ``slices.json`` as shown: numbers from the file, membership recomputed."""

    rank: int
    predicates: list[tuple[str, str]]  # (feature, value label), in file order
    size: int | None
    share: float | None
    error_mean: float | None
    error_sum: float | None
    ci_low: float | None
    ci_high: float | None
    lift: float | None
    score: float | None
    p_value: float | None
    q_value: float | None
    significant: bool
    # the true group's numbers from a labels file (None without one); confirmed: its interval lies above
    # the overall rate
    true_error_mean: float | None = None
    true_ci_low: float | None = None
    true_ci_high: float | None = None
    true_size: float | None = None
    confirmed: bool | None = None
    true_note: str | None = None
    mask: Any = None  # (n,) bool or None when a feature is not in the run's tables
    membership_note: str | None = None
    examples: dict[str, list] = field(default_factory=dict)  # "inside"/"outside" -> thumbnails


def slice_rows(run: RunData, overall: Overall) -> list[SliceRow]:
    rows: list[SliceRow] = []
    n = run.frame.height
    from clipengine.slices.coding import predicate_mask

    for rank, record in enumerate(run.slices or [], start=1):
        predicates = record.get("predicates") or {}
        if not isinstance(predicates, dict):
            predicates = {}
        size = finite_or_none(record.get("size"))
        error_mean = finite_or_none(record.get("error_mean"))
        row = SliceRow(
            rank=rank,
            predicates=[(str(k), format_value(v)) for k, v in predicates.items()],
            size=int(size) if size is not None else None,
            share=(size / n) if size is not None and n else None,
            error_mean=error_mean,
            error_sum=finite_or_none(record.get("error_sum")),
            ci_low=finite_or_none(record.get("ci_low")),
            ci_high=finite_or_none(record.get("ci_high")),
            lift=(error_mean / overall.rate) if error_mean is not None and overall.rate else None,
            score=finite_or_none(record.get("score")),
            p_value=finite_or_none(record.get("p_value")),
            q_value=finite_or_none(record.get("q_value")),
            significant=bool(record.get("significant", False)),
            true_error_mean=finite_or_none(record.get("true_error_mean")),
            true_ci_low=finite_or_none(record.get("true_ci_low")),
            true_ci_high=finite_or_none(record.get("true_ci_high")),
            true_size=finite_or_none(record.get("true_size")),
            confirmed=record.get("confirmed") if isinstance(record.get("confirmed"), bool) else None,
            true_note=str(record["true_note"]) if record.get("true_note") else None,
        )
        bounds = record.get("bounds") if isinstance(record.get("bounds"), dict) else {}
        try:
            row.mask = predicate_mask(run.frame, predicates, bounds)
        except KeyError as missing:
            row.membership_note = f"feature {missing.args[0]!r} is not a column of the run's tables: no examples"
        else:
            found = int(row.mask.sum())
            if row.size is not None and found != row.size:
                row.membership_note = (
                    f"the predicates select {found:,} items here, slices.json says {row.size:,}"
                )
        rows.append(row)
    return rows


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass
class ClassRow:
    value: str
    count: int
    share: float
    error_sum: float | None
    rate: float | None
    ci_low: float | None
    ci_high: float | None
    mean_prob: float | None


@dataclass
class AttributeTable:
    name: str
    kind: str  # "attribute" (zero-shot label) or "feature" (from errors.parquet)
    rows: list[ClassRow]
    hidden_classes: int  # classes folded into "other"


def attribute_tables(run: RunData, overall: Overall) -> list[AttributeTable]:
    tables = [_class_table(run, name, "attribute", overall.binary) for name in run.attributes]
    tables += [_class_table(run, name, "feature", overall.binary) for name in run.extra_features]
    return [t for t in tables if t is not None]


def _class_table(run: RunData, name: str, kind: str, binary: bool) -> AttributeTable | None:
    import polars as pl

    frame = run.frame
    column = frame.get_column(name)
    if column.dtype.is_nested():
        return None
    labels, order = _class_labels(column, run.slices_summary.get("binned") or {})
    parts = [labels.alias("__class"), order.alias("__order")]
    aggregations = [pl.len().alias("count")]
    if run.has_error:
        parts.append(frame.get_column(ERROR_COLUMN).cast(pl.Float64).alias("__error"))
        aggregations += [
            pl.col("__error").sum().alias("error_sum"),
            pl.col("__error").mean().alias("rate"),
            pl.col("__error").std().alias("error_std"),
        ]
    prob = name + PROB_SUFFIX
    if prob in frame.columns and frame.get_column(prob).dtype.is_numeric():
        parts.append(frame.get_column(prob).cast(pl.Float64).alias("__prob"))
        aggregations.append(pl.col("__prob").mean().alias("mean_prob"))
    aggregations.append(pl.col("__order").first())
    grouped = pl.DataFrame(parts).group_by("__class").agg(aggregations)
    if column.dtype.is_numeric():  # values and bins in numeric order
        grouped = grouped.sort("__order", nulls_last=True)
    else:
        grouped = grouped.sort(["count", "__class"], descending=[True, False], nulls_last=True)
    hidden = max(0, grouped.height - MAX_CLASSES)
    total = max(1, frame.height)
    rows = [_class_row(record, total, binary) for record in grouped.head(MAX_CLASSES).iter_rows(named=True)]
    if hidden:
        rest = grouped.slice(MAX_CLASSES)
        count = int(rest.get_column("count").sum())
        record: dict[str, Any] = {"__class": f"other ({hidden} classes)", "count": count}
        if "error_sum" in rest.columns:
            record["error_sum"] = float(rest.get_column("error_sum").sum())
            record["rate"] = record["error_sum"] / count if count else None
        rows.append(_class_row(record, total, binary))
    return AttributeTable(name=name, kind=kind, rows=rows, hidden_classes=hidden)


def _class_row(record: dict, total: int, binary: bool) -> ClassRow:
    count = int(record["count"])
    rate = finite_or_none(record.get("rate"))
    low = high = None
    if rate is not None:
        if binary:
            low, high = wilson_interval(float(record.get("error_sum") or 0.0), count)
        else:
            std = finite_or_none(record.get("error_std")) or 0.0
            half = _z(CONFIDENCE) * std / math.sqrt(count)
            low, high = rate - half, rate + half
    return ClassRow(
        value="(missing)" if record["__class"] is None else str(record["__class"]),
        count=count,
        share=count / total,
        error_sum=finite_or_none(record.get("error_sum")),
        rate=rate,
        ci_low=finite_or_none(low),
        ci_high=finite_or_none(high),
        mean_prob=finite_or_none(record.get("mean_prob")),
    )


def _class_labels(column, binned: dict[str, Any]):
    """(the class of each row, a numeric order of the classes): the value itself; for a numeric
    feature SliceLine binned, the bin it put the row in (so the bins here are the bins of the
    slices, coded from the edges stored with them); for other many-valued numbers a quantile bin."""
    import numpy as np
    import polars as pl

    from clipengine.slices.coding import code_with_edges

    numeric = column.dtype.is_numeric()
    bins = binned.get(column.name) if numeric else None
    if isinstance(bins, dict) and isinstance(bins.get("edges"), list) and isinstance(bins.get("labels"), list):
        coded = code_with_edges(column.cast(pl.Float64).fill_null(np.nan).to_numpy(), np.asarray(bins["edges"]),
                                [str(label) for label in bins["labels"]])
        names = [None if label is None else str(label) for label in coded.labels]
        return (pl.Series([names[c] for c in coded.codes], dtype=pl.Utf8),
                pl.Series(coded.codes.astype(np.float64)))
    if not numeric:
        return column.cast(pl.Utf8), pl.Series(np.zeros(column.len()))
    values = column.cast(pl.Float64)
    if column.n_unique() <= MAX_NUMERIC_DISTINCT:
        distinct = values.drop_nulls().unique().to_list()
        return (values.replace_strict(distinct, [f"{v:g}" for v in distinct], default=None, return_dtype=pl.Utf8),
                values)
    array = values.fill_null(np.nan).to_numpy()
    finite = array[np.isfinite(array)]
    edges = np.unique(np.quantile(finite, np.linspace(0, 1, NUMERIC_BINS + 1)))
    labels = np.full(array.shape, None, dtype=object)
    order = np.full(array.shape, np.nan)
    for i in range(len(edges) - 1):
        low, high = edges[i], edges[i + 1]
        inside = ((array > low) & (array <= high) if i else (array >= low) & (array <= high)) & np.isnan(order)
        labels[inside] = f"{'[' if i == 0 else '('}{low:.4g}, {high:.4g}]"
        order[inside] = i
    return pl.Series(labels.tolist(), dtype=pl.Utf8), pl.Series(order)
