"""The slice stage: Polars front end of SliceLine.

``find_slices(frame, error=...)`` types and codes the feature columns (categoricals as
they are, numeric columns with many values binned), validates the error column, runs
the SliceLine kernel (:mod:`clipengine.kernels.sliceline`) and attaches statistics
(:mod:`clipengine.stats`) to every reported slice, with Benjamini–Hochberg q-values
over every candidate the search evaluated.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl

from clipengine.config import (
    DEFAULT_ALPHA,
    DEFAULT_BINNING,
    DEFAULT_BINS,
    DEFAULT_K,
    DEFAULT_MAX_LEVEL,
    DEFAULT_MAX_LEVELS,
    DEFAULT_MAX_Q,
    SliceConfig,
)
from clipengine.errors import ClipengineError

COMPAT_MODES = ("systemds",)
BINNINGS = ("quantile", "width")
# integer columns with at most this many distinct values (or `bins`, if larger) stay categorical
INT_CATEGORICAL_LEVELS = 20


@dataclass
class SliceResult:
    """Top-K slices best first, with statistics; row masks over the input frame's rows.

    ``predicates[i]``: ``{feature: value}`` (original values; interval labels such as
    ``"(127.0, 653.0]"`` for binned columns; None for the null level). Statistic arrays are
    ``(K,)``. ``n_evaluated``: candidates the search evaluated (the BH family size).
    """

    predicates: list[dict[str, Any]]
    score: np.ndarray
    size: np.ndarray
    error_sum: np.ndarray
    error_mean_: np.ndarray
    max_error: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    p_value: np.ndarray
    q_value: np.ndarray
    significant: np.ndarray
    n_rows: int
    error_mean: float
    n_evaluated: int
    binary_errors: bool
    skipped_features: dict[str, str]
    features: list[str]
    params: dict[str, Any]
    levels: list[tuple[int, int, int]] = field(default_factory=list)
    _codes: np.ndarray | None = field(default=None, repr=False)  # (f, m) level codes, feature-major
    _col_feature: np.ndarray | None = field(default=None, repr=False)
    _columns: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.predicates)

    @property
    def nothing_significant(self) -> bool:
        return not bool(np.any(self.significant))

    def row_mask(self, i: int) -> np.ndarray:
        """``(n_rows,)`` bool: the rows of slice ``i`` in the input frame's order."""
        from clipengine.kernels.sliceline import slice_mask_local

        if not 0 <= i < len(self):
            raise IndexError(f"slice {i} out of range (0..{len(self) - 1})")
        offsets = np.concatenate(([0], np.cumsum(np.bincount(self._col_feature))))
        return slice_mask_local(self._codes, offsets, self._columns[i])

    def describe(self, i: int) -> str:
        """``"gender = female AND age = child"``."""
        return " AND ".join(f"{name} = {_text(value)}" for name, value in self.predicates[i].items())

    def to_records(self) -> list[dict[str, Any]]:
        """JSON-ready records, best first."""
        records = []
        for i, predicates in enumerate(self.predicates):
            record: dict[str, Any] = {"predicates": dict(predicates)}
            record["score"] = _num(self.score[i])
            record["size"] = int(self.size[i])
            record["error_sum"] = _num(self.error_sum[i])
            record["error_mean"] = _num(self.error_mean_[i])
            record["max_error"] = _num(self.max_error[i])
            record["ci_low"] = _num(self.ci_low[i])
            record["ci_high"] = _num(self.ci_high[i])
            record["p_value"] = _num(self.p_value[i])
            record["q_value"] = _num(self.q_value[i])
            record["significant"] = bool(self.significant[i])
            records.append(record)
        return records

    def to_polars(self) -> pl.DataFrame:
        """One row per slice, best first: rank, slice (text), level, features, values, statistics."""
        return pl.DataFrame(
            {
                "rank": pl.Series(np.arange(1, len(self) + 1), dtype=pl.Int64),
                "slice": pl.Series([self.describe(i) for i in range(len(self))], dtype=pl.String),
                "level": pl.Series([len(p) for p in self.predicates], dtype=pl.Int64),
                "features": pl.Series([list(p) for p in self.predicates], dtype=pl.List(pl.String)),
                "values": pl.Series([[_text(v) for v in p.values()] for p in self.predicates], dtype=pl.List(pl.String)),
                "score": pl.Series(self.score, dtype=pl.Float64),
                "size": pl.Series(self.size, dtype=pl.Int64),
                "error_sum": pl.Series(self.error_sum, dtype=pl.Float64),
                "error_mean": pl.Series(self.error_mean_, dtype=pl.Float64),
                "max_error": pl.Series(self.max_error, dtype=pl.Float64),
                "ci_low": pl.Series(self.ci_low, dtype=pl.Float64),
                "ci_high": pl.Series(self.ci_high, dtype=pl.Float64),
                "p_value": pl.Series(self.p_value, dtype=pl.Float64),
                "q_value": pl.Series(self.q_value, dtype=pl.Float64),
                "significant": pl.Series(self.significant, dtype=pl.Boolean),
            }
        )

    def summary(self) -> dict[str, Any]:
        """Run-level facts (deterministic: no timings)."""
        return {
            "n_rows": self.n_rows,
            "error_mean": _num(self.error_mean),
            "binary_errors": self.binary_errors,
            "n_evaluated": self.n_evaluated,
            "nothing_significant": self.nothing_significant,
            "features": list(self.features),
            "skipped_features": dict(self.skipped_features),
            "params": dict(self.params),
            "levels": [{"level": a, "candidates": b, "valid": c} for a, b, c in self.levels],
        }


def _num(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _text(value) -> str:
    return "null" if value is None else str(value)


def _fmt_edge(x: float) -> str:
    x = float(x)
    if x.is_integer() and abs(x) < 1e15:
        return f"{x:.1f}"
    return f"{x:.6g}"


# ---- features -----------------------------------------------------------------------------------


@dataclass
class _Coded:
    codes: np.ndarray  # (m,) integer, 0..len(labels)-1
    labels: list[Any]  # value of each level; None = null level


def _code_categorical(series: pl.Series) -> _Coded:
    if series.dtype in (pl.Categorical,) or isinstance(series.dtype, pl.Enum):
        series = series.cast(pl.String)
    values = series.drop_nulls().unique().sort()
    n = len(values)
    codes = (
        series.replace_strict(values, pl.Series(np.arange(n, dtype=np.int64)), default=None, return_dtype=pl.Int64)
        .fill_null(n)
        .to_numpy()
    )
    labels = values.to_list()
    if series.null_count():
        labels.append(None)
    return _Coded(np.asarray(codes, dtype=np.int64), labels)


def _bin_numeric(series: pl.Series, name: str, bins: int | Sequence[float], binning: str) -> _Coded:
    values = series.cast(pl.Float64).to_numpy()
    present = ~np.isnan(values)
    v = values[present]
    if isinstance(bins, (int, np.integer)):
        if binning == "quantile":
            edges = np.unique(np.quantile(v, np.linspace(0, 1, int(bins) + 1)))
        else:
            edges = np.unique(np.linspace(v.min(), v.max(), int(bins) + 1))
        if edges.size < 2:
            edges = np.array([v.min(), v.max()])
        labels = [f"({_fmt_edge(lo)}, {_fmt_edge(hi)}]" for lo, hi in zip(edges[:-1], edges[1:])]
        if np.mean(v == edges[0]) > 1.0 / int(bins):
            # a heavy point mass at the minimum (e.g. capital-gain = 0) is a bin of its own
            inner = edges[:-1]
            labels.insert(0, f"[{_fmt_edge(edges[0])}, {_fmt_edge(edges[0])}]")
        else:
            inner = edges[1:-1]
            labels[0] = f"[{_fmt_edge(edges[0])}, {_fmt_edge(edges[1])}]"
    else:
        edges = np.asarray(sorted(float(b) for b in bins), dtype=np.float64)
        if edges.size == 0 or not np.all(np.isfinite(edges)):
            raise ClipengineError(f"bins for feature '{name}' must be finite numbers")
        inner = edges
        bounds = [-np.inf, *edges.tolist(), np.inf]
        labels = [
            f"({'-inf' if lo == -np.inf else _fmt_edge(lo)}, {'inf' if hi == np.inf else _fmt_edge(hi)}"
            + (")" if hi == np.inf else "]")
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ]
    codes = np.full(values.shape[0], len(labels), dtype=np.int64)
    codes[present] = np.searchsorted(inner, v, side="left")
    if not present.all():
        labels = [*labels, None]
    return _Coded(codes, labels)


def _code_feature(series: pl.Series, name: str, bins, binning: str) -> _Coded | str:
    dtype = series.dtype
    if dtype.is_float():
        series = series.fill_nan(None)
    if dtype == pl.Boolean or dtype == pl.String or dtype == pl.Categorical or isinstance(dtype, pl.Enum):
        return _code_categorical(series)
    if dtype.is_numeric():
        user_edges = not isinstance(bins, (int, np.integer))
        if series.null_count() == len(series):
            return _code_categorical(series)
        # at most this many values: categorical (user-given edges always bin)
        few = 0 if user_edges else max(int(bins), INT_CATEGORICAL_LEVELS) if dtype.is_integer() else int(bins)
        if dtype.is_integer() and not user_edges and not series.null_count():
            coded = _code_small_integers(series.to_numpy(), few)
            if coded is not None:
                return coded
        n_unique = series.drop_nulls().n_unique()
        if not user_edges and n_unique <= few:
            return _code_categorical(series)
        return _bin_numeric(series, name, bins, binning)
    return f"unsupported dtype {dtype}"


def _code_small_integers(values: np.ndarray, few: int) -> _Coded | None:
    """:func:`_code_categorical` of a null-free integer column with at most ``few`` distinct values
    in a small range, by counting (one pass; tables of millions of rows are mostly such columns);
    None otherwise."""
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
    return _Coded(code_of[shifted], (present + low).tolist())


def _compact(coded: _Coded) -> _Coded:
    """Drop levels no row has (empty bins), keeping level order."""
    counts = np.bincount(coded.codes, minlength=len(coded.labels))
    used = np.flatnonzero(counts)
    if used.size == len(coded.labels):
        return coded
    remap = np.cumsum(counts > 0) - 1
    return _Coded(remap[coded.codes], [coded.labels[i] for i in used])


def _code_features(frame: pl.DataFrame, features, bins, binning: str, max_levels: int):
    bins_map = dict(bins) if isinstance(bins, Mapping) else {}
    used: list[str] = []
    coded: list[_Coded] = []
    skipped: dict[str, str] = {}
    for name in features:
        feature_bins = bins_map.get(name, bins if not isinstance(bins, Mapping) else DEFAULT_BINS)
        result = _code_feature(frame[name], name, feature_bins, binning)
        if isinstance(result, str):
            skipped[name] = result
            continue
        result = _compact(result)
        n_levels = len(result.labels)
        if n_levels < 2:
            skipped[name] = "one value"
        elif n_levels > max_levels:
            skipped[name] = f"{n_levels} levels > max_levels {max_levels}"
        else:
            used.append(name)
            # one byte per row and feature (two past 256 levels): tables of millions of rows stay small
            coded.append(_Coded(result.codes.astype(np.uint8 if n_levels <= 256 else np.uint16), result.labels))
    return used, coded, skipped


def code_features(
    frame: pl.DataFrame,
    features: Sequence[str],
    *,
    bins: int | Mapping[str, int | Sequence[float]] = DEFAULT_BINS,
    binning: str = DEFAULT_BINNING,
    max_levels: int = DEFAULT_MAX_LEVELS,
) -> tuple[np.ndarray, list[str], list[list[Any]], dict[str, str]]:
    """The coding :func:`find_slices` uses: ``codes (m, f') int64`` (level index per used feature,
    levels sorted, null last), the used feature names, each one's level values, and the skipped
    features with reasons."""
    used, coded, skipped = _code_features(frame, list(features), bins, binning, max_levels)
    codes = np.column_stack([c.codes.astype(np.int64) for c in coded]) if coded else np.zeros((frame.height, 0), np.int64)
    return codes, used, [c.labels for c in coded], skipped


# ---- validation -----------------------------------------------------------------------------------


def _validate_errors(frame: pl.DataFrame, error: str) -> np.ndarray:
    if error not in frame.columns:
        raise ClipengineError(f"error column '{error}' not found; available columns: {', '.join(frame.columns)}")
    series = frame[error]
    if not (series.dtype.is_numeric() or series.dtype == pl.Boolean):
        raise ClipengineError(f"error column '{error}' must be numeric (0/1 or non-negative), not {series.dtype}")
    missing = series.null_count()
    if missing:
        raise ClipengineError(f"error column '{error}' has {missing} missing value(s)")
    values = series.cast(pl.Float64).to_numpy().astype(np.float64)
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise ClipengineError(f"error column '{error}' has {bad} NaN or infinite value(s)")
    negative = int(np.count_nonzero(values < 0))
    if negative:
        raise ClipengineError(f"error column '{error}' has {negative} negative value(s); errors must be ≥ 0")
    return values


def _resolve_min_sup(min_sup, n_rows: int) -> int:
    if min_sup is None:
        return max(1, math.ceil(n_rows / 100))
    if isinstance(min_sup, bool):
        raise ClipengineError(f"min_sup must be a row count ≥ 1 or a fraction in (0, 1), not {min_sup!r}")
    if isinstance(min_sup, (int, np.integer)):
        if min_sup < 1:
            raise ClipengineError(f"min_sup must be a row count ≥ 1 or a fraction in (0, 1), not {min_sup}")
        return int(min_sup)
    value = float(min_sup)
    if 0 < value < 1:
        return max(1, math.ceil(value * n_rows))
    if value >= 1 and value.is_integer():
        return int(value)
    raise ClipengineError(f"min_sup must be a row count ≥ 1 or a fraction in (0, 1), not {min_sup}")


def _check_params(k, alpha, max_level, bins, compat, max_q, binning, max_levels):
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ClipengineError(f"k must be an integer ≥ 1, not {k!r}")
    if not 0 < float(alpha) <= 1:
        raise ClipengineError(f"alpha must be in (0, 1], not {alpha}")
    if not isinstance(max_level, (int, np.integer)) or max_level < 0:
        raise ClipengineError(f"max_level must be an integer ≥ 1 (0 = unlimited), not {max_level!r}")
    if isinstance(bins, (int, np.integer)) and bins < 2:
        raise ClipengineError(f"bins must be ≥ 2, not {bins}")
    if compat is not None and compat not in COMPAT_MODES:
        raise ClipengineError(f"compat must be one of {', '.join(COMPAT_MODES)} (or unset), not {compat!r}")
    if max_q is not None and not 0 < float(max_q) <= 1:
        raise ClipengineError(f"max_q must be in (0, 1], not {max_q}")
    if binning not in BINNINGS:
        raise ClipengineError(f"binning must be one of {', '.join(BINNINGS)}, not {binning!r}")
    if max_levels < 2:
        raise ClipengineError(f"max_levels must be ≥ 2, not {max_levels}")


# ---- the stage --------------------------------------------------------------------------------------


def find_slices(
    frame: pl.DataFrame,
    *,
    error: str,
    features: Sequence[str] | None = None,
    k: int = DEFAULT_K,
    alpha: float = DEFAULT_ALPHA,
    min_sup: int | float | None = None,
    max_level: int = DEFAULT_MAX_LEVEL,
    bins: int | Mapping[str, int | Sequence[float]] = DEFAULT_BINS,
    compat: str | None = None,
    max_q: float | None = DEFAULT_MAX_Q,
    binning: str = DEFAULT_BINNING,
    drop_nulls: bool = False,
    max_levels: int = DEFAULT_MAX_LEVELS,
    progress: bool = False,
    max_memory: int | None = None,
) -> SliceResult:
    """Top-K weak slices of ``frame`` by SliceLine score, with statistics.

    ``error``: column of per-row errors (0/1 or any non-negative number). ``features``: columns
    to slice on (default: every other column). ``min_sup``: rows (int ≥ 1) or fraction of rows
    (0 < f < 1); None = ⌈n/100⌉. ``bins``: bins per numeric column, or a mapping
    ``{column: bins | [edges]}`` (unlisted numeric columns get ``DEFAULT_BINS``); ``binning``:
    ``"quantile"`` or ``"width"``. Nulls are a level of their own unless ``drop_nulls``.
    Features with one value or more than ``max_levels`` levels are skipped and reported.
    ``compat="systemds"`` reproduces SystemDS's sliceLine output exactly. ``max_q``: slices
    with Benjamini–Hochberg q ≤ max_q are flagged ``significant`` (None = 1). ``progress``: a bar
    over lattice levels on stderr. ``max_memory``: bytes the search may use (None: 80 % of the
    memory available now); a lattice level that would need more is refused before it is allocated,
    naming the ``min_sup``/``max_level`` that would fit.

    >>> import polars as pl
    >>> frame = pl.DataFrame({"color": ["red", "blue"] * 50, "error": [1, 0] * 50})
    >>> result = find_slices(frame, error="error", k=1, min_sup=5)
    >>> result.predicates[0], int(result.size[0])
    ({'color': 'red'}, 50)
    """
    if isinstance(frame, pl.LazyFrame):
        frame = frame.collect()
    if not isinstance(frame, pl.DataFrame):
        raise ClipengineError(f"find_slices needs a Polars DataFrame, not {type(frame).__name__}")
    _check_params(k, alpha, max_level, bins if not isinstance(bins, Mapping) else DEFAULT_BINS, compat, max_q,
                  binning, max_levels)
    n_rows = frame.height
    if n_rows == 0:
        raise ClipengineError("the table has no rows")
    errors = _validate_errors(frame, error)
    if features is None:
        features = [c for c in frame.columns if c != error]
    else:
        features = list(features)
        unknown = [f for f in features if f not in frame.columns]
        if unknown:
            raise ClipengineError(
                f"feature column(s) {', '.join(repr(f) for f in unknown)} not found; "
                f"available columns: {', '.join(frame.columns)}"
            )
        if error in features:
            raise ClipengineError(f"the error column '{error}' cannot also be a feature")
    bins_map = dict(bins) if isinstance(bins, Mapping) else {}
    unknown_bins = [c for c in bins_map if c not in features]
    if unknown_bins:
        raise ClipengineError(f"bins given for column(s) {', '.join(unknown_bins)} that are not features")
    min_sup_rows = _resolve_min_sup(min_sup, n_rows)

    used, coded, skipped = _code_features(frame, features, bins, binning, max_levels)
    if not used:
        detail = "; ".join(f"{k_}: {v}" for k_, v in skipped.items()) or "no feature columns"
        raise ClipengineError(f"no usable feature column ({detail})")

    params = {
        "k": int(k),
        "alpha": float(alpha),
        "min_sup": int(min_sup_rows),
        "max_level": int(max_level),
        "bins": {c: (list(map(float, b)) if not isinstance(b, (int, np.integer)) else int(b)) for c, b in bins_map.items()}
        if bins_map
        else int(bins),
        "binning": binning,
        "drop_nulls": bool(drop_nulls),
        "compat": compat,
        "max_q": float(max_q) if max_q is not None else 1.0,
    }
    if max_memory is not None and max_memory < 1:
        raise ClipengineError(f"max_memory must be a positive number of bytes, not {max_memory!r}")
    return _search(coded, used, errors, skipped, params, progress, max_memory)


# per evaluated candidate after the search: its p-value and one sorted copy for the q-values
STATS_BYTES_PER_EVALUATED = 16
P_VALUE_CHUNK = 1 << 20


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now (Linux ``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _memory_refusal(error) -> ClipengineError:
    """The kernel's refusal in the options a user types."""
    options = []
    if "min_sup" in error.fits:
        options.append(f"--min-sup {error.fits['min_sup']}")
    if "max_level" in error.fits:
        options.append(f"--max-level {error.fits['max_level']}")
    if error.level == 0:
        most = error.fits.get("features")
        options.append(f"at most {most} features (--features)" if most else "a sample of the rows")
        what = "the data alone"
    else:
        options.append("fewer features (--features)")
        what = f"lattice level {error.level} ({error.candidates} candidates)"
    return ClipengineError(f"slice search needs ≈ {error.needed / 1e9:.2f} GB for {what}, over the "
                           f"{error.limit / 1e9:.2f} GB memory limit (--max-memory); would fit: {', '.join(options)}")


def _search(coded: list[_Coded], used: list[str], errors: np.ndarray, skipped, params, progress,
            max_memory=None) -> SliceResult:
    from clipengine import stats
    from clipengine.envs import num_threads
    from clipengine.kernels.sliceline import SliceLineMemoryError, local_code_dtype, slice_line_local
    from clipengine.progress import progress_bar

    n_rows = errors.shape[0]
    domains = np.array([len(c.labels) for c in coded], dtype=np.int64)
    codes = np.empty((len(coded), n_rows), local_code_dtype(domains))  # (f, m) feature-major
    for j, c in enumerate(coded):
        codes[j] = c.codes
        c.codes = codes[j]  # one copy of the codes, not two
    col_feature = np.repeat(np.arange(len(coded), dtype=np.int32), domains)
    if max_memory is None:
        available = available_memory()
        max_memory = int(0.8 * available) if available else None
    labels = [label for c in coded for label in c.labels]
    allowed = np.array([not (params["drop_nulls"] and label is None) for label in labels], dtype=bool)
    total = float(errors.sum())
    total_sq = float(np.dot(errors, errors))
    binary = bool(np.all((errors == 0) | (errors == 1)))
    if total > 0:
        levels_total = min(params["max_level"] or len(used), len(used))
        bar = progress_bar(levels_total, "slicing: lattice levels", enabled=progress, unit="level")

        def on_level(level, candidates):
            bar.set_postfix_str(f"level {level}: {candidates} candidates")
            bar.update(1)

        try:
            out = slice_line_local(codes, domains, errors, k=params["k"], alpha=params["alpha"],
                                   min_sup=params["min_sup"], max_level=params["max_level"],
                                   compat=params["compat"] == "systemds", allowed=allowed, threads=num_threads(),
                                   on_level=on_level, memory_limit=max_memory,
                                   extra_per_evaluated=STATS_BYTES_PER_EVALUATED)
        except SliceLineMemoryError as error:
            raise _memory_refusal(error) from None
        finally:
            bar.close()
        n_all = out.evaluated_size.size
        p_all = np.empty(n_all)
        for start in range(0, n_all, P_VALUE_CHUNK):  # chunks: the temporaries stay small
            part = slice(start, min(n_all, start + P_VALUE_CHUNK))
            p_all[part] = stats.slice_p_values(out.evaluated_size[part], out.evaluated_error[part],
                                               out.evaluated_sq[part], binary=binary, n_rows=n_rows,
                                               total_error=total, total_sq=total_sq)
        top_columns, top_stats, top_sq, top_index = out.top_slices, out.top_stats, out.top_sq, out.top_index
        q = stats.benjamini_hochberg_at(p_all, top_index)
        n_evaluated, levels = int(out.evaluated_size.size), list(out.levels)
    else:  # no error anywhere: nothing to find
        top_columns = np.zeros((0, max(1, params["max_level"])), np.int32)
        top_stats, top_sq, top_index = np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
        p_all = q = np.zeros(0)
        n_evaluated, levels = 0, []
    size = top_stats[:, 3].astype(np.int64)
    error_sum = top_stats[:, 1]
    low, high = stats.slice_intervals(size, error_sum, top_sq, binary=binary)
    predicates = []
    for columns in top_columns:
        predicates.append({used[col_feature[c]]: labels[c] for c in columns if c >= 0})
    with np.errstate(invalid="ignore", divide="ignore"):
        means = error_sum / size
    return SliceResult(
        predicates=predicates,
        score=top_stats[:, 0],
        size=size,
        error_sum=error_sum,
        error_mean_=means,
        max_error=top_stats[:, 2],
        ci_low=low,
        ci_high=high,
        p_value=p_all[top_index],
        q_value=q,
        significant=q <= params["max_q"],
        n_rows=n_rows,
        error_mean=total / n_rows,
        n_evaluated=n_evaluated,
        binary_errors=binary,
        skipped_features=skipped,
        features=used,
        params=params,
        levels=levels,
        _codes=codes,
        _col_feature=col_feature,
        _columns=top_columns,
    )


def find_slices_with_config(frame: pl.DataFrame, *, error: str, config: SliceConfig,
                            features: Sequence[str] | None = None) -> SliceResult:
    """:func:`find_slices` with settings from a :class:`SliceConfig`."""
    return find_slices(
        frame,
        error=error,
        features=features,
        k=config.k,
        alpha=config.alpha,
        min_sup=config.min_sup,
        max_level=config.max_level,
        bins=config.bins,
        compat=config.compat,
        max_q=config.max_q,
        binning=config.binning,
        drop_nulls=config.drop_nulls,
        max_levels=config.max_levels,
        progress=config.progress,
        max_memory=config.max_memory,
    )


def write_slices(result: SliceResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``slices.parquet`` (one row per slice) and ``slices.json`` (summary + records)
    into ``out_dir`` atomically; deterministic (no timings)."""
    from clipengine.bindings.files import write_json, write_parquet

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    parquet_path = out_dir / "slices.parquet"
    json_path = out_dir / "slices.json"
    write_parquet(parquet_path, result.to_polars(), metadata={"clipengine.slices": json.dumps(summary, sort_keys=True)})
    write_json(json_path, {**summary, "slices": result.to_records()})
    return parquet_path, json_path


def read_table(path: str | Path) -> pl.DataFrame:
    """A Parquet or CSV table (by suffix; other suffixes are tried as Parquet then CSV)."""
    path = Path(path)
    if not path.exists():
        raise ClipengineError(f"table '{path}' not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pl.read_csv(path, infer_schema_length=10_000)
        if suffix in (".parquet", ".pq"):
            return pl.read_parquet(path)
        try:
            return pl.read_parquet(path)
        except Exception:
            return pl.read_csv(path, infer_schema_length=10_000)
    except ClipengineError:
        raise
    except Exception as exc:  # polars raises many kinds; the user needs one line
        raise ClipengineError(f"cannot read table '{path}': {str(exc).splitlines()[0]}") from None
