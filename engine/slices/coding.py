"""Feature coding for SliceLine: each feature column → integer level codes, with what each level means.

Strings, booleans, categoricals and numbers with few distinct values are used as they are (one
level per value, sorted). Numeric columns with many values are binned (quantile or equal-width
bins, or edges a caller gives): a value ``x`` falls in bin ``i`` exactly when ``inner[i-1] < x ≤
inner[i]`` (``inner`` the bins' inner edges, ±∞ at the ends), which is what ``np.searchsorted(inner,
x, side="left")`` computes. Each binned level keeps its numeric bounds ``(low, high)`` so that a
slice's rows can be found again — in the report, or in another run with the same edges — without
parsing the printed labels. Nulls (and NaN) form a level of their own, listed last; ``-inf`` and
``inf`` in a numeric column are levels of their own too (a bin ``(100.0, inf]`` would mix them with
finite values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl

from clipengine.config import DEFAULT_BINNING, DEFAULT_BINS, DEFAULT_MAX_LEVELS
from clipengine.errors import ClipengineError

BINNINGS = ("quantile", "width")
# integer columns with at most this many distinct values (or `bins`, if larger) stay categorical
INT_CATEGORICAL_LEVELS = 20
NEG_INF_LABEL = "-inf"
POS_INF_LABEL = "inf"


@dataclass
class CodedFeature:
    """One feature as SliceLine sees it: ``codes`` (m,) int64 in ``0 .. len(labels) - 1``; ``labels`` the
    value of each level (None = the null level); ``bounds`` per level ``(low, high)`` with ``low < x ≤
    high`` for a bin, None for a level that is one value; ``edges`` the inner bin edges of a binned
    feature and ``bin_labels`` the label of each of its ``len(edges) + 1`` bins (None otherwise):
    with both, :func:`code_with_edges` codes other values the same way."""

    codes: np.ndarray
    labels: list[Any]
    bounds: list[tuple[float, float] | None] = field(default_factory=list)
    edges: list[float] | None = None
    bin_labels: list[str] | None = None

    def __post_init__(self):
        if not self.bounds:
            self.bounds = [None] * len(self.labels)


def format_edge(x: float) -> str:
    """An edge as printed in a bin label: ``127.0``, ``0.000123``, ``-inf``."""
    x = float(x)
    if math.isinf(x):
        return NEG_INF_LABEL if x < 0 else POS_INF_LABEL
    if x.is_integer() and abs(x) < 1e15:
        return f"{x:.1f}"
    return f"{x:.6g}"


def code_categorical(series: pl.Series) -> CodedFeature:
    """One level per distinct value (sorted), nulls last."""
    if series.dtype == pl.Categorical or isinstance(series.dtype, pl.Enum):
        series = series.cast(pl.String)
    values = series.drop_nulls().unique().sort()
    n = len(values)
    codes = (
        series.replace_strict(values, pl.Series(np.arange(n, dtype=np.int64)), default=None, return_dtype=pl.Int64)
        .fill_null(n)
        .to_numpy()
    )
    labels = [_finite_or_text(v) for v in values.to_list()]
    if series.null_count():
        labels.append(None)
    return CodedFeature(np.asarray(codes, dtype=np.int64), labels)


def _finite_or_text(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return NEG_INF_LABEL if value < 0 else POS_INF_LABEL
    return value


def bin_numeric(series: pl.Series, name: str, bins: int | Sequence[float], binning: str) -> CodedFeature:
    """Bins of a numeric column: ``bins`` quantile or equal-width bins of its finite values, or the
    given edges; ``-inf``/``inf`` and nulls get levels of their own."""
    values = series.cast(pl.Float64).to_numpy()
    finite = np.isfinite(values)
    v = values[finite]
    if isinstance(bins, (int, np.integer)):
        inner, labels = _auto_bins(v, int(bins), binning)
    else:
        inner = np.asarray(sorted(float(b) for b in bins), dtype=np.float64)
        if inner.size == 0 or not np.all(np.isfinite(inner)):
            raise ClipengineError(f"bins for feature '{name}' must be finite numbers")
        bounds = [-np.inf, *inner.tolist(), np.inf]
        labels = [f"({format_edge(lo)}, {format_edge(hi)}" + (")" if hi == np.inf else "]")
                  for lo, hi in zip(bounds[:-1], bounds[1:])]
    return code_with_edges(values, inner, labels)


def _auto_bins(v: np.ndarray, bins: int, binning: str) -> tuple[np.ndarray, list[str]]:
    """Inner edges and bin labels of ``bins`` bins over the finite values ``v``."""
    if v.size == 0:
        return np.zeros(0), ["(-inf, inf)"]
    if binning == "quantile":
        edges = np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)))
    else:
        edges = np.unique(np.linspace(v.min(), v.max(), bins + 1))
    if edges.size < 2:
        edges = np.array([v.min(), v.max()])
    labels = [f"({format_edge(lo)}, {format_edge(hi)}]" for lo, hi in zip(edges[:-1], edges[1:])]
    if np.mean(v == edges[0]) > 1.0 / bins:
        # a heavy point mass at the minimum (e.g. capital-gain = 0) is a bin of its own
        inner = edges[:-1]
        labels.insert(0, f"[{format_edge(edges[0])}, {format_edge(edges[0])}]")
    else:
        inner = edges[1:-1]
        labels[0] = f"[{format_edge(edges[0])}, {format_edge(edges[1])}]"
    return inner, labels


def code_with_edges(values: np.ndarray, inner: np.ndarray, labels: list[str]) -> CodedFeature:
    """Code (m,) float64 ``values`` into the bins of ``inner`` edges (``len(labels) == len(inner) + 1``);
    levels: ``-inf`` (if present), the bins, ``inf`` (if present), null (if present)."""
    inner = np.asarray(inner, dtype=np.float64)
    finite = np.isfinite(values)
    negative, positive = values == -np.inf, values == np.inf
    missing = np.isnan(values)
    shift = int(negative.any())
    codes = np.empty(values.shape[0], dtype=np.int64)
    codes[finite] = np.searchsorted(inner, values[finite], side="left") + shift
    edges = [-np.inf, *inner.tolist(), np.inf]
    out_labels: list[Any] = [NEG_INF_LABEL] if shift else []
    bounds: list[tuple[float, float] | None] = [None] if shift else []
    out_labels += list(labels)
    bounds += [(edges[i], edges[i + 1]) for i in range(len(labels))]
    codes[negative] = 0
    if positive.any():
        codes[positive] = len(out_labels)
        out_labels.append(POS_INF_LABEL)
        bounds.append(None)
    if missing.any():
        codes[missing] = len(out_labels)
        out_labels.append(None)
        bounds.append(None)
    return CodedFeature(codes, out_labels, bounds, inner.tolist(), list(labels))


def code_feature(series: pl.Series, name: str, bins, binning: str) -> CodedFeature | str:
    """The coding of one column, or the reason it cannot be a feature."""
    dtype = series.dtype
    if dtype == pl.Boolean or dtype == pl.String or dtype == pl.Categorical or isinstance(dtype, pl.Enum):
        return code_categorical(series)
    if dtype.is_numeric():
        user_edges = not isinstance(bins, (int, np.integer))
        if dtype.is_float():
            series = series.fill_nan(None)
        if series.null_count() == len(series):
            return code_categorical(series)
        # at most this many values: categorical (user-given edges always bin)
        few = 0 if user_edges else max(int(bins), INT_CATEGORICAL_LEVELS) if dtype.is_integer() else int(bins)
        if dtype.is_integer() and not user_edges and not series.null_count():
            coded = _code_small_integers(series.to_numpy(), few)
            if coded is not None:
                return coded
        if not user_edges and series.drop_nulls().n_unique() <= few:
            return code_categorical(series)
        return bin_numeric(series, name, bins, binning)
    return f"unsupported dtype {dtype}"


def _code_small_integers(values: np.ndarray, few: int) -> CodedFeature | None:
    """:func:`code_categorical` of a null-free integer column with at most ``few`` distinct values in a
    small range, by counting (one pass: tables of millions of rows are mostly such columns); None
    otherwise."""
    low, high = int(values.min()), int(values.max())
    if high - low >= 1 << 16:
        return None
    shifted = values.astype(np.int64) - low if low else values
    counts = np.bincount(shifted, minlength=high - low + 1)
    present = np.flatnonzero(counts)
    if present.size > few:
        return None
    code_of = np.zeros(high - low + 1, np.uint8 if present.size <= 256 else np.uint16)
    code_of[present] = np.arange(present.size)
    return CodedFeature(code_of[shifted], (present + low).tolist())


def compact(coded: CodedFeature) -> CodedFeature:
    """Drop levels no row has (empty bins), keeping level order; the edges stay as they were."""
    counts = np.bincount(coded.codes, minlength=len(coded.labels))
    used = np.flatnonzero(counts)
    if used.size == len(coded.labels):
        return coded
    remap = np.cumsum(counts > 0) - 1
    return CodedFeature(remap[coded.codes], [coded.labels[i] for i in used], [coded.bounds[i] for i in used],
                        coded.edges, coded.bin_labels)


def code_features(
    frame: pl.DataFrame,
    features: Sequence[str],
    *,
    bins: int | Mapping[str, int | Sequence[float]] = DEFAULT_BINS,
    binning: str = DEFAULT_BINNING,
    max_levels: int = DEFAULT_MAX_LEVELS,
) -> tuple[list[str], list[CodedFeature], dict[str, str]]:
    """Code every feature of ``frame``: the used feature names, their codings, and the skipped
    features with reasons (single-valued, too many levels, unsupported dtype). ``bins``: bins per
    numeric column, or ``{column: bins | [edges]}`` (unlisted columns get ``DEFAULT_BINS``)."""
    bins_map = dict(bins) if isinstance(bins, Mapping) else {}
    used: list[str] = []
    coded: list[CodedFeature] = []
    skipped: dict[str, str] = {}
    for name in features:
        feature_bins = bins_map.get(name, bins if not isinstance(bins, Mapping) else DEFAULT_BINS)
        result = code_feature(frame[name], name, feature_bins, binning)
        if isinstance(result, str):
            skipped[name] = result
            continue
        result = compact(result)
        n_levels = len(result.labels)
        if n_levels < 2:
            skipped[name] = "one value"
        elif n_levels > max_levels:
            skipped[name] = f"{n_levels} levels > max_levels {max_levels}"
        else:
            used.append(name)
            # one byte per row and feature (two past 256 levels): tables of millions of rows stay small
            result.codes = result.codes.astype(np.uint8 if n_levels <= 256 else np.uint16, copy=False)
            coded.append(result)
    return used, coded, skipped


# ---- membership -------------------------------------------------------------------------------------
def predicate_mask(frame: pl.DataFrame, predicates: Mapping[str, Any],
                   bounds: Mapping[str, Sequence[float | None]] | None = None) -> np.ndarray:
    """(n,) bool: the rows of ``frame`` where every predicate of a slice holds.

    ``predicates``: ``{feature: level label}`` as a slice reports them; ``bounds``: ``{feature: [low,
    high]}`` for binned features (``low < x ≤ high``; None for an infinite end), as stored with the
    slice. Other features match by value (None = null; ``"inf"``/``"-inf"`` in a numeric column match
    those values). Raises KeyError naming a feature that is not a column of ``frame``.
    """
    bounds = bounds or {}
    mask = np.ones(frame.height, dtype=bool)
    for feature, value in predicates.items():
        if feature not in frame.columns:
            raise KeyError(feature)
        column = frame.get_column(feature)
        if feature in bounds and bounds[feature] is not None:
            low, high = bounds[feature]
            values = column.cast(pl.Float64).to_numpy()
            low = -np.inf if low is None else float(low)
            high = np.inf if high is None else float(high)
            with np.errstate(invalid="ignore"):
                hit = np.isfinite(values) & (values > low) & (values <= high)
            mask &= hit
            continue
        if value is None:
            hit = column.is_null() | (column.is_nan() if column.dtype.is_float() else False)
        elif column.dtype.is_numeric():
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            hit = column.cast(pl.Float64) == number
        elif column.dtype == pl.Boolean:
            hit = column == (value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1"))
        else:
            hit = column.cast(pl.String) == str(value)
        mask &= hit.fill_null(False).to_numpy().astype(bool)
    return mask
