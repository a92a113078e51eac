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

from clipengine.report.rundir import (
    ERROR_COLUMN,
    PROB_SUFFIX,
    RunData,
    finite_or_none,
    predicate_mask,
)

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
    mask: Any = None  # (n,) bool or None when a feature is not in the run's tables
    membership_note: str | None = None
    examples: dict[str, list] = field(default_factory=dict)  # "inside"/"outside" -> thumbnails


def slice_rows(run: RunData, overall: Overall) -> list[SliceRow]:
    rows: list[SliceRow] = []
    n = run.frame.height
    membership = SliceMembership(run.frame, run.slices_summary.get("params") or {})
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
        )
        try:
            row.mask = membership.mask(predicates)
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


class SliceMembership:
    """Rows of a slice, recomputed from its predicates over the run's joined frame.

    Each feature is coded exactly as SliceLine coded it (same binning parameters, read
    from slices.json), so binned numeric predicates select the very rows SliceLine
    counted; without SliceLine's coder the labels are parsed (``(lo, hi]`` intervals).
    """

    def __init__(self, frame, params: dict[str, Any]):
        self.frame = frame
        self.params = params
        self._levels: dict[str, tuple[Any, list[Any]] | None] = {}

    def mask(self, predicates: dict[str, Any]):
        import numpy as np

        result = np.ones(self.frame.height, dtype=bool)
        for feature, value in predicates.items():
            if feature not in self.frame.columns:
                raise KeyError(feature)
            coded = self._coded(feature)
            if coded is None:
                result &= predicate_mask(self.frame, {feature: value})
                continue
            codes, labels = coded
            hits = np.array([_json_value(label) == value for label in labels] + [False], dtype=bool)
            result &= hits[np.minimum(codes, len(labels))]
        return result

    def _coded(self, feature: str):
        if feature not in self._levels:
            self._levels[feature] = self._code(feature)
        return self._levels[feature]

    def _code(self, feature: str):
        """SliceLine's own coding of ``feature`` with the run's binning, so interval labels
        select exactly the rows the search counted; None when SliceLine did not use the feature."""
        from clipengine.config import DEFAULT_BINNING, DEFAULT_BINS
        from clipengine.errors import ClipengineError
        from clipengine.slices import code_features

        bins = self.params.get("bins", DEFAULT_BINS)
        if isinstance(bins, dict):
            bins = bins.get(feature, DEFAULT_BINS)
        try:
            codes, used, levels, _ = code_features(
                self.frame, [feature], bins=bins, binning=self.params.get("binning", DEFAULT_BINNING)
            )
        except ClipengineError:  # a column SliceLine could not code: parse the labels instead
            return None
        if not used:
            return None
        return codes[:, 0], list(levels[0])


def _json_value(value: Any) -> Any:
    """``value`` as it reads back from slices.json (so 3 == 3.0 and tuples are lists)."""
    import json

    return json.loads(json.dumps(value, default=str))


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
    parts = [_class_labels(column, run.slices_summary.get("params") or {}).alias("__class")]
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
    grouped = pl.DataFrame(parts).group_by("__class").agg(aggregations)
    if column.dtype.is_numeric():  # values and bins in numeric order
        keys = [_bin_sort_key(v) for v in grouped.get_column("__class").to_list()]
        grouped = grouped.with_columns(pl.Series("__k", keys, dtype=pl.Float64)).sort(["__k"]).drop("__k")
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


def _class_labels(column, params: dict[str, Any]):
    """The class of each row: the value itself, or for many-valued numbers the bin SliceLine
    put it in (so the bins here are the bins of the slices), else a quantile bin."""
    import numpy as np
    import polars as pl

    if column.dtype.is_numeric() and column.n_unique() > MAX_NUMERIC_DISTINCT:
        coded = SliceMembership(pl.DataFrame([column]), params)._code(column.name)
        if coded is not None:
            codes, labels = coded
            names = [None if label is None else str(label) for label in labels] + [None]
            return pl.Series(codes, dtype=pl.Int64).replace_strict(
                list(range(len(names))), names, default=None, return_dtype=pl.Utf8
            )

    if not column.dtype.is_numeric() or column.n_unique() <= MAX_NUMERIC_DISTINCT:
        if column.dtype.is_numeric():
            values = column.cast(pl.Float64).drop_nulls().unique().to_list()
            return column.cast(pl.Float64).replace_strict(
                values, [f"{v:g}" for v in values], default=None, return_dtype=pl.Utf8
            )
        return column.cast(pl.Utf8)
    values = column.cast(pl.Float64).to_numpy()
    finite = values[np.isfinite(values)]
    edges = np.unique(np.quantile(finite, np.linspace(0, 1, NUMERIC_BINS + 1)))
    labels = np.full(values.shape, None, dtype=object)
    for i in range(len(edges) - 1):
        low, high = edges[i], edges[i + 1]
        inside = (values > low) & (values <= high) if i else (values >= low) & (values <= high)
        opening = "[" if i == 0 else "("
        labels[inside & (labels == None)] = f"{opening}{low:.4g}, {high:.4g}]"  # noqa: E711
    return pl.Series(labels.tolist(), dtype=pl.Utf8)


def _bin_sort_key(label: str) -> float:
    from clipengine.report.rundir import parse_interval

    interval = parse_interval(label)
    if interval is not None:
        return interval[0]
    try:
        return float(label)
    except (TypeError, ValueError):
        return float("inf")
