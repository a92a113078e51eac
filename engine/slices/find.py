"""The slice stage: Polars front end of SliceLine.

``find_slices(frame, error=...)`` types and codes the feature columns (categoricals as
they are, numeric columns with many values binned), validates the error column, runs
the SliceLine kernel (:mod:`clipengine.kernels.sliceline`) and attaches statistics
(:mod:`clipengine.slices.stats`) to every reported slice, with Benjamini–Hochberg q-values
over every candidate the search evaluated.
"""

from __future__ import annotations

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
from clipengine.slices.coding import BINNINGS, CodedFeature, code_features
from clipengine.tables import check_error_column

COMPAT_MODES = ("systemds",)


@dataclass
class SliceResult:
    """Top-K slices best first, with statistics; row masks over the input frame's rows.

    ``predicates[i]``: ``{feature: value}`` (original values; interval labels such as
    ``"(127.0, 653.0]"`` for binned columns; None for the null level); ``bounds[i]``: ``{feature:
    (low, high)}`` for its binned predicates (``low < x ≤ high``); ``binned``: every binned feature's
    ``{"edges": inner edges, "labels": bin labels}`` (:func:`clipengine.slices.coding.code_with_edges`). Statistic arrays are ``(K,)``. ``n_evaluated``: candidates the search
    evaluated (the BH family size).
    """

    predicates: list[dict[str, Any]]
    bounds: list[dict[str, tuple[float, float]]]
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
    binned: dict[str, dict[str, list]] = field(default_factory=dict)
    levels: list[tuple[int, int, int]] = field(default_factory=list)
    _codes: np.ndarray | None = field(default=None, repr=False)
    _col_feature: np.ndarray | None = field(default=None, repr=False)
    _columns: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.predicates)

    @property
    def nothing_significant(self) -> bool:
        return not bool(np.any(self.significant))

    def row_mask(self, i: int) -> np.ndarray:
        """``(n_rows,)`` bool: the rows of slice ``i`` in the input frame's order."""
        from clipengine.kernels.sliceline import slice_mask

        if not 0 <= i < len(self):
            raise IndexError(f"slice {i} out of range (0..{len(self) - 1})")
        return slice_mask(self._codes, self._col_feature, self._columns[i])

    def describe(self, i: int) -> str:
        """``"gender = female AND age = child"``."""
        return " AND ".join(f"{name} = {_text(value)}" for name, value in self.predicates[i].items())

    def to_records(self) -> list[dict[str, Any]]:
        """JSON-ready records, best first."""
        records = []
        for i, predicates in enumerate(self.predicates):
            record: dict[str, Any] = {"predicates": dict(predicates)}
            record["bounds"] = {f: [_num(low), _num(high)] for f, (low, high) in self.bounds[i].items()}
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
                # per predicate: low < x ≤ high for binned features, null for one-value levels
                "lows": pl.Series([[b[f][0] if f in b else None for f in p] for p, b in zip(self.predicates, self.bounds)],
                                  dtype=pl.List(pl.Float64)),
                "highs": pl.Series([[b[f][1] if f in b else None for f in p]
                                    for p, b in zip(self.predicates, self.bounds)], dtype=pl.List(pl.Float64)),
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
            "binned": {name: dict(bins) for name, bins in self.binned.items()},
            "levels": [{"level": a, "candidates": b, "valid": c} for a, b, c in self.levels],
        }


def _num(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _text(value) -> str:
    return "null" if value is None else str(value)


# ---- validation -----------------------------------------------------------------------------------


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
    over lattice levels on stderr.

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
    errors = check_error_column(frame, error, source="the table")
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

    used, coded, skipped = code_features(frame, features, bins=bins, binning=binning, max_levels=max_levels)
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
    return _search(coded, used, errors, skipped, params, progress)


def _search(coded: list[CodedFeature], used: list[str], errors: np.ndarray, skipped, params, progress) -> SliceResult:
    from clipengine.envs import num_threads
    from clipengine.kernels.sliceline import prepare_codes, slice_line
    from clipengine.progress import progress_bar
    from clipengine.slices import stats

    n_rows = errors.shape[0]
    domains = np.array([len(c.labels) for c in coded], dtype=np.int64)
    local = np.column_stack([c.codes for c in coded])
    codes, col_feature, offsets = prepare_codes(local, domains)
    labels = [label for c in coded for label in c.labels]
    column_bounds = [bound for c in coded for bound in c.bounds]
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
            out = slice_line(codes, errors, col_feature, k=params["k"], alpha=params["alpha"],
                             min_sup=params["min_sup"], max_level=params["max_level"],
                             compat=params["compat"] == "systemds", allowed=allowed, threads=num_threads(),
                             on_level=on_level)
        finally:
            bar.close()
        p_all = stats.slice_p_values(out.evaluated_size, out.evaluated_error, out.evaluated_sq, binary=binary,
                                     n_rows=n_rows, total_error=total, total_sq=total_sq)
        q_all = stats.benjamini_hochberg(p_all)
        top_columns, top_stats, top_sq, top_index = out.top_slices, out.top_stats, out.top_sq, out.top_index
        n_evaluated, levels = int(out.evaluated_size.size), list(out.levels)
    else:  # no error anywhere: nothing to find
        top_columns = np.zeros((0, max(1, params["max_level"])), np.int32)
        top_stats, top_sq, top_index = np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
        p_all = q_all = np.zeros(0)
        n_evaluated, levels = 0, []
    size = top_stats[:, 3].astype(np.int64)
    error_sum = top_stats[:, 1]
    low, high = stats.slice_intervals(size, error_sum, top_sq, binary=binary)
    q = q_all[top_index]
    predicates, bounds = [], []
    for columns in top_columns:
        predicates.append({used[col_feature[c]]: labels[c] for c in columns if c >= 0})
        bounds.append({used[col_feature[c]]: column_bounds[c] for c in columns if c >= 0 and column_bounds[c]})
    with np.errstate(invalid="ignore", divide="ignore"):
        means = error_sum / size
    return SliceResult(
        predicates=predicates,
        bounds=bounds,
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
        binned={name: {"edges": c.edges, "labels": c.bin_labels} for name, c in zip(used, coded)
                if c.edges is not None},
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
    )


def write_slices(result: SliceResult, out_dir: str | Path) -> tuple[Path, Path]:
    """``slices.parquet`` and ``slices.json`` of ``result`` in ``out_dir`` (:func:`clipengine.artifacts.write_slices`)."""
    from clipengine.artifacts import write_slices as write

    return write(out_dir, result.to_polars(), result.summary(), result.to_records())


def slice_run(run_dir: str | Path, config: SliceConfig, features: Sequence[str]) -> SliceResult:
    """The slices stage of a run: metadata ⋈ errors (:func:`clipengine.artifacts.read_joined`) →
    :func:`find_slices` on ``features`` → ``slices.parquet``/``slices.json`` in ``run_dir``."""
    from clipengine.artifacts import ERROR_COLUMN, read_joined

    frame, _, _ = read_joined(run_dir)
    if frame.height == 0:
        raise ClipengineError(f"{run_dir}: no encoded item has an error row (check the dataset's ids)")
    result = find_slices_with_config(frame, error=ERROR_COLUMN, config=config, features=features)
    write_slices(result, run_dir)
    return result
