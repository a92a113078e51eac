"""The slice stage: Polars front end of SliceLine.

``find_slices(frame, error=...)`` types and codes the feature columns (categoricals as
they are, numeric columns with many values binned), validates the error column, runs
the SliceLine kernel (:mod:`clipengine.kernels.sliceline`) and attaches statistics
(:mod:`clipengine.slices.stats`) to every reported slice.

The multiple-testing family, and where the reported numbers come from (README, "Slice statistics"):

- ``family="split"`` (the default): the rows are split at random; SliceLine searches one part for the
  top ``max(k, family_size)`` slices; each of them is tested (one-sided, against the rest) and
  estimated on the held-out part only; Benjamini–Hochberg runs over those slices. The search never
  saw the held-out rows, so the p-values are valid and the error rates and intervals unbiased
  whatever SliceLine's pruning, ``k``, ``min_sup`` or ``compat`` did.
- ``family="lattice"``: search and test on every row; the family is every slice with ≥ ``min_sup``
  rows and ≤ ``max_level`` predicates (counted by :mod:`clipengine.kernels.lattice`), a slice the
  search pruned counting with p = 1. The error rates are the slices' own (selected as the worst,
  biased upwards), so their intervals are widened to the level that keeps the false coverage rate of
  the reported slices at 5 % (Benjamini & Yekutieli 2005).

In both, the search looks for ``max(k, family_size)`` slices whatever ``k`` is, so a slice's q-value
does not change with ``k`` (up to ``family_size``) — except with ``compat``, whose pruning depends on
``k``, so it searches for ``k`` slices as SystemDS does. With a labelled sample
(:class:`clipengine.slices.corrected.LabelledSample`) each reported slice also gets its true group's
size and error rate (:mod:`clipengine.slices.corrected`), estimated on the same rows as its error rate.
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
    DEFAULT_FAMILY,
    DEFAULT_FAMILY_SIZE,
    DEFAULT_K,
    DEFAULT_MAX_LEVEL,
    DEFAULT_MAX_LEVELS,
    DEFAULT_MAX_Q,
    DEFAULT_SPLIT_SEED,
    DEFAULT_TEST_FRACTION,
    FAMILIES,
    SliceConfig,
)
from clipengine.errors import ClipengineError
from clipengine.slices.coding import BINNINGS, CodedFeature, code_features
from clipengine.slices.corrected import LabelledSample
from clipengine.tables import check_error_column

COMPAT_MODES = ("systemds",)


@dataclass
class SliceResult:
    """Top-K slices best first, with statistics; row masks over the input frame's rows.

    ``predicates[i]``: ``{feature: value}`` (original values; interval labels such as
    ``"(127.0, 653.0]"`` for binned columns; None for the null level); ``bounds[i]``: ``{feature:
    (low, high)}`` for its binned predicates (``low < x ≤ high``); ``binned``: every binned feature's
    ``{"edges": inner edges, "labels": bin labels}`` (:func:`clipengine.slices.coding.code_with_edges`).
    Statistic arrays are ``(K,)``:

    - ``size``, ``error_sum``, ``max_error``: the slice's rows and errors in the whole table (facts);
    - ``score``: SliceLine's score on the rows it searched; ``search_error_mean``: the error rate there
      (what selected the slice: biased upwards);
    - ``error_mean_``, ``ci_low``, ``ci_high``, ``p_value``: estimate, interval (at ``confidence``) and
      one-sided test on ``test_size`` rows with ``test_error_sum`` errors — the held-out rows under
      ``family="split"``, every row under ``"lattice"``;
    - ``q_value``: Benjamini–Hochberg over the ``n_family`` hypotheses of the family;
    - ``true_error_mean``, ``true_ci_low``, ``true_ci_high``, ``true_size``: the true group's numbers
      from a labelled sample (:mod:`clipengine.slices.corrected`; NaN without labels or without an
      estimate); ``confirmed``: the corrected interval lies above the whole table's error rate
      (None without an estimate).

    ``n_evaluated``: candidates the search evaluated.
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
    family: dict[str, Any] = field(default_factory=dict)
    confidence: float = 0.95
    test_size: np.ndarray | None = None
    test_error_sum: np.ndarray | None = None
    search_error_mean: np.ndarray | None = None
    true_error_mean: np.ndarray | None = None
    true_ci_low: np.ndarray | None = None
    true_ci_high: np.ndarray | None = None
    true_size: np.ndarray | None = None
    true_note: list[str] = field(default_factory=list)
    labels: dict[str, Any] | None = None
    _codes: np.ndarray | None = field(default=None, repr=False)  # (f, m) level codes, feature-major
    _col_feature: np.ndarray | None = field(default=None, repr=False)
    _columns: np.ndarray | None = field(default=None, repr=False)
    _test_rows: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        k = len(self.predicates)
        nan = np.full(k, np.nan)
        for name in ("true_error_mean", "true_ci_low", "true_ci_high", "true_size", "search_error_mean"):
            if getattr(self, name) is None:
                setattr(self, name, nan.copy())
        if self.test_size is None:
            self.test_size = np.asarray(self.size, dtype=np.int64).copy()
        if self.test_error_sum is None:
            self.test_error_sum = np.asarray(self.error_sum, dtype=np.float64).copy()
        if len(self.true_note) != k:
            self.true_note = [""] * k

    def __len__(self) -> int:
        return len(self.predicates)

    @property
    def nothing_significant(self) -> bool:
        return not bool(np.any(self.significant))

    @property
    def n_family(self) -> int:
        """Hypotheses in the Benjamini–Hochberg family."""
        return int(self.family.get("size", 0))

    @property
    def confirmed(self) -> list[bool | None]:
        """Per slice: the corrected interval lies above the whole table's error rate (None: no estimate)."""
        return [None if not np.isfinite(low) else bool(low > self.error_mean) for low in self.true_ci_low]

    def row_mask(self, i: int) -> np.ndarray:
        """``(n_rows,)`` bool: the rows of slice ``i`` in the input frame's order."""
        from clipengine.kernels.sliceline import slice_mask_local

        if not 0 <= i < len(self):
            raise IndexError(f"slice {i} out of range (0..{len(self) - 1})")
        return slice_mask_local(self._codes, _offsets(self._col_feature), self._columns[i])

    def describe(self, i: int) -> str:
        """``"gender = female AND age = child"``."""
        return " AND ".join(f"{name} = {_text(value)}" for name, value in self.predicates[i].items())

    def to_records(self) -> list[dict[str, Any]]:
        """JSON-ready records, best first (the keys of :data:`clipengine.artifacts.SLICE_RECORD_KEYS`)."""
        records = []
        confirmed = self.confirmed
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
            record["test_size"] = int(self.test_size[i])
            record["test_error_sum"] = _num(self.test_error_sum[i])
            record["search_error_mean"] = _num(self.search_error_mean[i])
            record["true_error_mean"] = _num(self.true_error_mean[i])
            record["true_ci_low"] = _num(self.true_ci_low[i])
            record["true_ci_high"] = _num(self.true_ci_high[i])
            record["true_size"] = _num(self.true_size[i])
            record["confirmed"] = confirmed[i]
            record["true_note"] = self.true_note[i] or None
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
                "test_size": pl.Series(self.test_size, dtype=pl.Int64),
                "test_error_sum": pl.Series(self.test_error_sum, dtype=pl.Float64),
                "search_error_mean": pl.Series([_num(v) for v in self.search_error_mean], dtype=pl.Float64),
                "true_error_mean": pl.Series([_num(v) for v in self.true_error_mean], dtype=pl.Float64),
                "true_ci_low": pl.Series([_num(v) for v in self.true_ci_low], dtype=pl.Float64),
                "true_ci_high": pl.Series([_num(v) for v in self.true_ci_high], dtype=pl.Float64),
                "true_size": pl.Series([_num(v) for v in self.true_size], dtype=pl.Float64),
                "confirmed": pl.Series(self.confirmed, dtype=pl.Boolean),
                "true_note": pl.Series([n or None for n in self.true_note], dtype=pl.String),
            }
        )

    def summary(self) -> dict[str, Any]:
        """Run-level facts (deterministic: no timings)."""
        return {
            "n_rows": self.n_rows,
            "error_mean": _num(self.error_mean),
            "binary_errors": self.binary_errors,
            "n_evaluated": self.n_evaluated,
            "n_family": self.n_family,
            "family": dict(self.family),
            "confidence": self.confidence,
            "nothing_significant": self.nothing_significant,
            "features": list(self.features),
            "skipped_features": dict(self.skipped_features),
            "params": dict(self.params),
            "binned": {name: dict(bins) for name, bins in self.binned.items()},
            "levels": [{"level": a, "candidates": b, "valid": c} for a, b, c in self.levels],
            "labels": dict(self.labels) if self.labels is not None else None,
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


def _check_family(family, family_size, test_fraction, compat) -> str:
    family = family if family is not None else ("lattice" if compat is not None else DEFAULT_FAMILY)
    if family not in FAMILIES:
        raise ClipengineError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    if not isinstance(family_size, (int, np.integer)) or family_size < 1:
        raise ClipengineError(f"family_size must be an integer ≥ 1, not {family_size!r}")
    if not 0 < float(test_fraction) < 1:
        raise ClipengineError(f"test_fraction must be in (0, 1), not {test_fraction}")
    return family


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
    family: str | None = None,
    family_size: int = DEFAULT_FAMILY_SIZE,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    split_seed: int = DEFAULT_SPLIT_SEED,
    labels: LabelledSample | None = None,
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
    with Benjamini–Hochberg q ≤ max_q are flagged ``significant`` (None = 1). ``family``: "split"
    (search on one part of the rows, test and estimate on the other ``test_fraction``, drawn with
    ``split_seed``) or "lattice" (every row; the family is every slice with ≥ min_sup rows); None means
    split, or lattice with ``compat``. ``family_size``: the search looks for max(k, family_size)
    slices. ``labels``: a labelled sample of the rows; each slice then gets its true group's size and
    error rate. ``progress``: a bar over lattice levels on stderr. ``max_memory``: bytes the search may
    use (None: 80 % of the memory available now); a lattice level that would need more is refused
    before it is allocated, naming the ``min_sup``/``max_level`` that would fit.

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
    family = _check_family(family, family_size, test_fraction, compat)
    if labels is not None:
        if labels.rows.size and (labels.rows.min() < 0 or labels.rows.max() >= n_rows):
            raise ClipengineError(f"{labels.source or 'labels'}: a labelled row is not a row of the table")

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
        "family": family,
        "family_size": int(family_size),
        "test_fraction": float(test_fraction) if family == "split" else None,
        "split_seed": int(split_seed) if family == "split" else None,
    }
    if max_memory is not None and max_memory < 1:
        raise ClipengineError(f"max_memory must be a positive number of bytes, not {max_memory!r}")
    result = _search(coded, used, errors, skipped, params, progress, max_memory)
    if labels is not None:
        _correct(result, frame, errors, labels)
    return result


def _split_rows(n_rows: int, test_fraction: float, seed: int) -> np.ndarray:
    """(n_rows,) bool: the held-out rows, ``round(test_fraction · n_rows)`` of them drawn at random."""
    n_test = int(round(test_fraction * n_rows))
    if n_test < 1 or n_test >= n_rows:
        raise ClipengineError(f"{n_rows} rows cannot be split into a search part and a test part "
                              f"(test_fraction {test_fraction:g}); use family lattice")
    test = np.zeros(n_rows, dtype=bool)
    test[np.random.default_rng(seed).permutation(n_rows)[:n_test]] = True
    return test


def _offsets(col_feature: np.ndarray) -> np.ndarray:
    """(f + 1,) int64: each feature's first one-hot column (feature j owns offsets[j] .. offsets[j+1]-1)."""
    return np.concatenate(([0], np.cumsum(np.bincount(col_feature)))).astype(np.int64)


def _sum_of_squares(values: np.ndarray, binary: bool) -> float:
    """Σ values²: with 0/1 values that is Σ values, exactly; otherwise a dot product. Skipping the dot
    product where it is not needed matters: BLAS hands a long vector to its thread pool, and right
    after the search's parallel kernels that hand-off can wait a scheduler tick per call."""
    return float(values.sum()) if binary else float(np.dot(values, values))


def _slice_sums(codes, col_feature, columns, errors, test, binary):
    """Whole-table ``(size, error_sum, sq, max_error)`` and held-out ``(size, error_sum, sq)`` of each
    slice; ``codes`` (f, m) feature-major level codes; ``binary``: every error is 0 or 1."""
    from clipengine.kernels.sliceline import slice_mask_local

    k = columns.shape[0]
    whole = np.zeros((k, 4))
    held_out = np.zeros((k, 3))
    offsets = _offsets(col_feature)
    for i in range(k):
        mask = slice_mask_local(codes, offsets, columns[i])
        e = errors[mask]
        whole[i] = (e.size, e.sum(), _sum_of_squares(e, binary), e.max() if e.size else 0.0)
        if test is not None:
            e = errors[mask & test]
            held_out[i] = (e.size, e.sum(), _sum_of_squares(e, binary))
    return whole, held_out


def _lattice_p_values(codes, col_feature, allowed, errors, out, params, binary, total, total_sq):
    """p-values of the evaluated members of the lattice family: every allowed level-1 column with
    ≥ min_sup rows and every evaluated candidate of level ≥ 2 with ≥ min_sup rows."""
    from clipengine.slices import stats

    n_rows, n_cols = errors.shape[0], col_feature.shape[0]
    size, error_sum, sq = np.zeros(n_cols, np.int64), np.zeros(n_cols), np.zeros(n_cols)
    squared = errors * errors
    offsets = _offsets(col_feature)
    for j in range(codes.shape[0]):  # one feature at a time: no (rows × features) temporary
        column = codes[j].astype(np.int64) + offsets[j]
        size += np.bincount(column, minlength=n_cols)
        error_sum += np.bincount(column, weights=errors, minlength=n_cols)
        sq += np.bincount(column, weights=squared, minlength=n_cols)
    first = allowed & (size >= params["min_sup"])
    deeper = (out.evaluated_level >= 2) & (out.evaluated_size >= params["min_sup"])
    return stats.slice_p_values(np.concatenate([size[first], out.evaluated_size[deeper]]),
                                np.concatenate([error_sum[first], out.evaluated_error[deeper]]),
                                np.concatenate([sq[first], out.evaluated_sq[deeper]]),
                                binary=binary, n_rows=n_rows, total_error=total, total_sq=total_sq)


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


def _memory_refusal(error, rows_per_searched_row: float = 1.0) -> ClipengineError:
    """The kernel's refusal (:class:`clipengine.kernels.sliceline.SliceLineMemoryError`) in the options a
    user types; ``rows_per_searched_row`` turns a support among the searched rows (the split design
    searches part of them) into the ``--min-sup`` over all rows."""
    options = []
    if "min_sup" in error.fits:
        options.append(f"--min-sup {math.ceil(error.fits['min_sup'] * rows_per_searched_row)}")
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


# per evaluated candidate after the search: its p-value and one sorted copy for the q-values
STATS_BYTES_PER_EVALUATED = 16


def _search(coded: list[CodedFeature], used: list[str], errors: np.ndarray, skipped, params, progress,
            max_memory: int | None = None) -> SliceResult:
    from clipengine.bindings.numba_start import prepare_numba

    prepare_numba()  # before the first kernel loads: Numba's start-up without scipy.linalg
    from clipengine.envs import num_threads
    from clipengine.kernels.lattice import count_lattice
    from clipengine.kernels.sliceline import SliceLineMemoryError, local_code_dtype, slice_line_local
    from clipengine.progress import progress_bar
    from clipengine.slices import stats

    n_rows = errors.shape[0]
    domains = np.array([len(c.labels) for c in coded], dtype=np.int64)
    codes = np.empty((len(coded), n_rows), local_code_dtype(domains))  # (f, m) feature-major level codes
    for j, c in enumerate(coded):
        codes[j] = c.codes
        c.codes = codes[j]  # one copy of the codes, not two
    col_feature = np.repeat(np.arange(len(coded), dtype=np.int32), domains)
    if max_memory is None:
        available = available_memory()
        max_memory = int(0.8 * available) if available else None
    labels = [label for c in coded for label in c.labels]
    column_bounds = [bound for c in coded for bound in c.bounds]
    allowed = np.array([not (params["drop_nulls"] and label is None) for label in labels], dtype=bool)
    total = float(errors.sum())
    binary = bool(np.all((errors == 0) | (errors == 1)))
    total_sq = _sum_of_squares(errors, binary)
    split = params["family"] == "split"
    test = _split_rows(n_rows, params["test_fraction"], params["split_seed"]) if split else None
    search_codes, search_errors = (np.ascontiguousarray(codes[:, ~test]), errors[~test]) if split else (codes, errors)
    search_rows = search_errors.shape[0]
    params["search_min_sup"] = max(1, math.ceil(params["min_sup"] * search_rows / n_rows))
    # SystemDS's pruning depends on k: compat reproduces its output for the k asked for
    k_search = params["k"] if params["compat"] == "systemds" else max(params["k"], params["family_size"])

    if search_errors.sum() > 0:
        levels_total = min(params["max_level"] or len(used), len(used))
        bar = progress_bar(levels_total, "slicing: lattice levels", enabled=progress, unit="level")

        def on_level(level, candidates):
            bar.set_postfix_str(f"level {level}: {candidates} candidates")
            bar.update(1)

        try:
            out = slice_line_local(search_codes, domains, search_errors, k=k_search, alpha=params["alpha"],
                                   min_sup=params["search_min_sup"], max_level=params["max_level"],
                                   compat=params["compat"] == "systemds", allowed=allowed, threads=num_threads(),
                                   on_level=on_level, memory_limit=max_memory,
                                   extra_per_evaluated=STATS_BYTES_PER_EVALUATED)
        except SliceLineMemoryError as error:
            raise _memory_refusal(error, n_rows / search_rows) from None
        finally:
            bar.close()
        found_columns, found_stats = out.top_slices, out.top_stats
        n_evaluated, levels = int(out.evaluated_size.size), list(out.levels)
    else:  # no error among the searched rows: nothing to find
        out = None
        found_columns = np.zeros((0, max(1, params["max_level"] or len(used))), np.int32)
        found_stats = np.zeros((0, 4))
        n_evaluated, levels = 0, []

    whole, held_out = _slice_sums(codes, col_feature, found_columns, errors, test, binary)
    if split:
        test_total = float(errors[test].sum())
        p = stats.slice_p_values(held_out[:, 0], held_out[:, 1], held_out[:, 2], binary=binary,
                                 n_rows=int(test.sum()), total_error=test_total,
                                 total_sq=_sum_of_squares(errors[test], binary))
        q = stats.benjamini_hochberg(p)
        confidence = stats.DEFAULT_CONFIDENCE
        estimate = held_out
        family = {"design": "split", "size": int(found_columns.shape[0]), "search_rows": int(search_rows),
                  "test_rows": int(test.sum()), "search_min_sup": params["search_min_sup"]}
    else:
        feature_major = np.ascontiguousarray(codes, dtype=np.int16 if domains.max() < 2**15 else np.int32)
        lattice = count_lattice(feature_major, domains, min_sup=params["min_sup"], max_level=params["max_level"],
                                allowed=allowed)
        del feature_major
        family_p = (_lattice_p_values(codes, col_feature, allowed, errors, out, params, binary, total, total_sq)
                    if out is not None else np.zeros(0))
        family_size = max(int(lattice.sum()), family_p.size)
        p = stats.slice_p_values(whole[:, 0], whole[:, 1], whole[:, 2], binary=binary, n_rows=n_rows,
                                 total_error=total, total_sq=total_sq)
        q = stats.family_q_values(family_p, p, family_size)
        confidence = stats.fcr_confidence(stats.DEFAULT_CONFIDENCE, min(params["k"], found_columns.shape[0]),
                                          family_size)
        estimate = whole[:, :3]
        family = {"design": "lattice", "size": family_size, "per_level": [int(c) for c in lattice],
                  "evaluated": int(family_p.size)}

    shown = slice(0, min(params["k"], found_columns.shape[0]))
    top_columns = found_columns[shown]
    size = whole[shown, 0].astype(np.int64)
    test_size = estimate[shown, 0].astype(np.int64)
    test_error_sum = estimate[shown, 1]
    low, high = stats.slice_intervals(test_size, test_error_sum, estimate[shown, 2], binary=binary,
                                      confidence=confidence)
    predicates, bounds = [], []
    for columns in top_columns:
        predicates.append({used[col_feature[c]]: labels[c] for c in columns if c >= 0})
        bounds.append({used[col_feature[c]]: column_bounds[c] for c in columns if c >= 0 and column_bounds[c]})
    with np.errstate(invalid="ignore", divide="ignore"):
        means = test_error_sum / test_size
        search_means = found_stats[shown, 1] / found_stats[shown, 3]
    q = q[shown]
    result = SliceResult(
        predicates=predicates,
        bounds=bounds,
        score=found_stats[shown, 0],
        size=size,
        error_sum=whole[shown, 1],
        error_mean_=means,
        max_error=whole[shown, 3],
        ci_low=low,
        ci_high=high,
        p_value=p[shown],
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
        family=family,
        confidence=float(confidence),
        test_size=test_size,
        test_error_sum=test_error_sum,
        search_error_mean=search_means,
        _codes=codes,
        _col_feature=col_feature,
        _columns=top_columns,
        _test_rows=test,
    )
    return result


def _correct(result: SliceResult, frame: pl.DataFrame, errors: np.ndarray, sample: LabelledSample) -> None:
    """Fill ``result``'s true-group columns from the labelled ``sample`` (:mod:`clipengine.slices.corrected`)."""
    from clipengine.slices.corrected import error_strata, estimate_group, sample_frame, true_membership

    labelled_features = set(sample.truth) & set(result.features)
    strata, n_strata = error_strata(errors, result.binary_errors)
    truth_rows = sample_frame(frame, sample)
    weights = 1.0 / sample.inclusion
    for i, predicates in enumerate(result.predicates):
        if not any(f in labelled_features for f in predicates):
            # no predicate on a labelled feature: the true group is the slice itself
            result.true_error_mean[i], result.true_ci_low[i], result.true_ci_high[i] = (
                result.error_mean_[i], result.ci_low[i], result.ci_high[i])
            result.true_size[i] = result.size[i]
            result.true_note[i] = "exact: no predicate on a labelled feature"
            continue
        usable, member = true_membership(truth_rows, predicates, result.bounds[i], labelled_features)
        got = estimate_group(result.row_mask(i), errors, strata, n_strata, result._test_rows, sample.rows[usable],
                             member[usable], weights[usable], binary=result.binary_errors,
                             confidence=result.confidence)
        result.true_error_mean[i], result.true_ci_low[i], result.true_ci_high[i] = (
            got.error_mean, got.ci_low, got.ci_high)
        result.true_size[i] = got.size
        result.true_note[i] = got.reason
    result.labels = {
        "source": sample.source,
        "labelled_items": int(sample.rows.size),
        "features": sorted(labelled_features),
        "not_features": sorted(set(sample.truth) - labelled_features),
        "estimated_on": "held-out rows" if result._test_rows is not None else "every row",
    }


def find_slices_with_config(frame: pl.DataFrame, *, error: str, config: SliceConfig,
                            features: Sequence[str] | None = None, labels: LabelledSample | None = None) -> SliceResult:
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
        family=config.family,
        family_size=config.family_size,
        test_fraction=config.test_fraction,
        split_seed=config.split_seed,
        labels=labels,
        progress=config.progress,
        max_memory=config.max_memory,
    )


def write_slices(result: SliceResult, out_dir: str | Path) -> tuple[Path, Path]:
    """``slices.parquet`` and ``slices.json`` of ``result`` in ``out_dir`` (:func:`clipengine.artifacts.write_slices`)."""
    from clipengine.artifacts import write_slices as write

    return write(out_dir, result.to_polars(), result.summary(), result.to_records())


def slice_run(run_dir: str | Path, config: SliceConfig, features: Sequence[str],
              labels: str | Path | None = None) -> SliceResult:
    """The slices stage of a run: metadata ⋈ errors (:func:`clipengine.artifacts.read_joined`) →
    :func:`find_slices` on ``features`` (corrected by the labels file ``labels``, if given) →
    ``slices.parquet``/``slices.json`` in ``run_dir``."""
    from clipengine.artifacts import ERROR_COLUMN, read_joined

    frame, _, _ = read_joined(run_dir)
    if frame.height == 0:
        raise ClipengineError(f"{run_dir}: no encoded item has an error row (check the dataset's ids)")
    frame = model_labels(run_dir, frame)
    sample = read_run_labels(run_dir, frame, labels) if labels is not None else None
    result = find_slices_with_config(frame, error=ERROR_COLUMN, config=config, features=features, labels=sample)
    write_slices(result, run_dir)
    return result


def model_labels(run_dir: str | Path, frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` (:func:`clipengine.artifacts.read_joined`) with the model's own label at every item a
    person labelled. An annotate stage given a labels file keeps the person's label in
    ``metadata.parquet`` (``<attr>_source`` = human); slices are defined on what the model predicts,
    and the prediction-powered correction needs the model's prediction on the labelled items too: the
    out-of-fold label recorded for each of them (never fitted on its own label)."""
    from clipengine import artifacts

    metadata_path = Path(run_dir) / artifacts.METADATA
    _, _, checks = artifacts.read_adaptation(metadata_path)
    if not checks:
        return frame
    metadata_keys = artifacts.item_keys(artifacts.key_columns(artifacts.read_parquet_file(metadata_path)))
    position = {key: i for i, key in enumerate(artifacts.item_keys(artifacts.key_columns(frame)))}
    columns = {}
    for attribute, check in checks.items():
        if attribute not in frame.columns:
            continue
        values = frame.get_column(attribute).to_list()
        for row, served in zip(check["rows"], check["served"]):
            at = position.get(metadata_keys[int(row)])
            if at is not None:
                values[at] = served
        columns[attribute] = pl.Series(attribute, values, dtype=frame.schema[attribute])
    return frame.with_columns(list(columns.values())) if columns else frame


def read_run_labels(run_dir: str | Path, frame: pl.DataFrame, labels: str | Path) -> LabelledSample:
    """The labels file ``labels`` as a sample of a run's joined table ``frame``, its classes checked
    against the schema the run's metadata was made with."""
    import json

    from clipengine.artifacts import META_SCHEMA_CONTENT, METADATA, read_parquet_metadata
    from clipengine.slices.corrected import read_sample, schema_classes

    record = read_parquet_metadata(Path(run_dir) / METADATA)
    classes = schema_classes(json.loads(record[META_SCHEMA_CONTENT])) if META_SCHEMA_CONTENT in record else None
    return read_sample(labels, frame, classes)
