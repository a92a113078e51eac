"""The coverage stage: which value combinations of the features a table covers, misses or holds thinly.

:func:`measure_coverage` takes a frame (one row per item; the features as columns; optionally each
feature's ``<feature>_prob`` and an error column) and returns a :class:`CoverageResult`:

- for every t = 1 .. ``t`` and every set of t features, the items of every combination of their values
  (the counting is :mod:`clipengine.kernels.coverage`); a combination is *valid* unless it contains an
  ``exclude`` entry of the ODD, *covered* when it is valid and has at least ``min_count`` items;
  t-way coverage = covered / valid, over all sets of t features and per set;
- the valid combinations with fewer than ``min_count`` items (*missing*: none; *thin*: some), thinnest
  first, each with its count under independence of the features' marginals
  (``expected = n · ∏ share(value)``, the shares counted like the counts) and whether a smaller
  combination inside it is already under ``min_count`` (``implied``);
- with an ODD: the items out of it (a value outside its list, or an excluded combination);
- with an error column: per combination the error count (0/1 errors, with a Wilson 95 % interval of
  the rate) or sum (other non-negative errors, with a t interval of the mean);
- with ``against``: the same counts on another frame, and the combinations covered in one and not in
  the other, both ways.

Label confidence. ``metadata.parquet`` stores for each attribute only its label ``<attr>``, the
label's probability ``<attr>_prob`` and its lead over the runner-up ``<attr>_margin``; the
probabilities of the other values are not kept. So:

- default: an item counts for the label it was given;
- ``min_prob = P``: a label with ``<attr>_prob < P`` counts as unknown: the item counts in no
  combination involving that attribute (and in every other); it is neither out of the ODD there;
- ``soft``: an item adds ``∏ <attr>_prob`` over the combination's attributes to the combination of its
  labels — the expected number of items whose labels in that combination are all right, if the
  probabilities are calibrated and the attributes' labelling errors independent. It is a lower bound
  of the expected number of items truly in the combination (the unkept probability mass of the other
  values could only add to it). Covered means an expected count ≥ ``min_count``; the hard label
  counts are reported beside it, and error rates use the hard labels.

Features without a ``_prob`` column (e.g. ground-truth columns of the dataset) count as certain.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl

from clipengine.config import CoverageConfig
from clipengine.coverage.odd import Odd
from clipengine.errors import ClipengineError

PROB_SUFFIX = "_prob"
MARGIN_SUFFIX = "_margin"
KEY_COLUMNS = ("path", "box")
DEFAULT_ERROR_COLUMN = "error"
MAX_COMBINATIONS = 300_000_000  # all t together: each costs ~30 bytes of arrays
MAX_SETS = 20_000_000
EXAMPLES = 20  # out-of-ODD items recorded with their reasons
TOP_VALUES = 20  # out-of-ODD values listed per feature


@dataclass
class Level:
    """Everything about the combinations of one t (arrays ``(C,)`` in the kernel's flat order)."""

    plan: Any  # clipengine.kernels.coverage.CombinationPlan
    count: np.ndarray  # int64 items (float64 expected items with soft)
    expected: np.ndarray  # float64, under independence
    valid: np.ndarray  # bool
    hard: np.ndarray  # int64 items by their labels (below min_prob: unknown) — the error rates' denominator
    labels: np.ndarray  # int64 items by every label, whatever its probability
    errors: np.ndarray | None = None  # float64 error count / sum among `hard`
    errors_sq: np.ndarray | None = None  # float64 sum of squared errors (non-0/1 errors)
    other: np.ndarray | None = None  # the --against frame's counts

    @property
    def t(self) -> int:
        return self.plan.t

    def covered(self, min_count: float) -> np.ndarray:
        return self.valid & (self.count >= min_count)

    def under(self, min_count: float) -> np.ndarray:
        return self.valid & (self.count < min_count)


@dataclass
class CoverageResult:
    """What :func:`measure_coverage` found; ``to_json()`` is the output contract (``--json``)."""

    n_rows: int
    features: list[str]
    values: list[list[str]]  # each feature's domain, in order
    levels: list[Level]
    params: dict[str, Any]
    out_of_odd: int = 0
    out_of_odd_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    out_of_odd_values: dict[str, dict[str, int]] = field(default_factory=dict)
    excluded_present: list[dict[str, Any]] = field(default_factory=list)
    out_of_odd_examples: list[dict[str, Any]] = field(default_factory=list)
    unknown: dict[str, int] = field(default_factory=dict)  # per feature: items without a usable value
    skipped_features: dict[str, str] = field(default_factory=dict)
    certain_features: list[str] = field(default_factory=list)
    binary_errors: bool = True
    error_column: str | None = None
    against: dict[str, Any] | None = None  # source, rows
    odd: dict[str, Any] | None = None  # Odd.to_dict()

    @property
    def min_count(self) -> float:
        return self.params["min_count"]

    # ---- combinations in words ----------------------------------------------------------------

    def predicates(self, level: Level, index: np.ndarray) -> list[dict[str, str]]:
        """``{feature: value}`` of each flat combination ``index`` of ``level``."""
        sets, values = level.plan.decode(np.asarray(index, dtype=np.int64))
        features = level.plan.sets[sets]
        return [{self.features[f]: self.values[f][v] for f, v in zip(fs, vs)}
                for fs, vs in zip(features.tolist(), values.tolist())]

    @staticmethod
    def describe(predicates: dict[str, Any]) -> str:
        """``"weather = fog AND time = night"`` (a list of values: ``"weather in (fog, rain)"``)."""
        return " AND ".join(f"{name} in ({', '.join(value)})" if isinstance(value, list) else f"{name} = {value}"
                            for name, value in predicates.items())

    # ---- summaries ----------------------------------------------------------------------------

    def coverage(self) -> list[dict[str, Any]]:
        """Per t: covered and valid combinations over all feature sets, the sets, and the sets with every
        valid combination covered (NIST's share of fully covered t-way variable combinations)."""
        out = []
        for level in self.levels:
            covered = level.covered(self.min_count)
            per_set_covered, per_set_valid = _per_set(level, covered), _per_set(level, level.valid)
            entry = {"t": level.t, "covered": int(covered.sum()), "valid": int(level.valid.sum()),
                     "sets": level.plan.n_sets, "complete_sets": int(np.sum(per_set_covered == per_set_valid))}
            if self.params["min_prob"] is not None or self.params["soft"]:
                entry["covered_by_labels"] = int(np.sum(level.valid & (level.labels >= self.min_count)))
            out.append(entry)
        return out

    def feature_sets(self, limit: int) -> tuple[list[dict[str, Any]], int]:
        """The feature sets, least covered first (ties: lower t, then file order), capped by ``limit``."""
        shares, ts, order_keys, rows = [], [], [], []
        for level in self.levels:
            covered = _per_set(level, level.covered(self.min_count))
            valid = _per_set(level, level.valid)
            with np.errstate(invalid="ignore", divide="ignore"):
                share = np.where(valid > 0, covered / np.maximum(valid, 1), 1.0)
            shares.append(share)
            ts.append(np.full(level.plan.n_sets, level.t))
            order_keys.append(np.arange(level.plan.n_sets))
            rows.append((level, covered, valid))
        if not shares:
            return [], 0
        share, t, index = np.concatenate(shares), np.concatenate(ts), np.concatenate(order_keys)
        order = np.lexsort((index, t, share))[:limit]
        out = []
        for i in order:
            level, covered, valid = rows[int(t[i]) - self.levels[0].t]
            s = int(index[i])
            out.append({"features": [self.features[f] for f in level.plan.sets[s]], "t": level.t,
                        "covered": int(covered[s]), "valid": int(valid[s])})
        return out, int(share.shape[0])

    def missing(self, limit: int) -> tuple[list[dict[str, Any]], int]:
        """The valid combinations under ``min_count``: thinnest first (then lower t, then the highest
        expected count), capped by ``limit``; and their total."""
        picked = []
        lower_under = None
        for level in self.levels:
            under = level.under(self.min_count)
            index = np.flatnonzero(under)
            implied = np.zeros(index.shape[0], bool)
            if lower_under is not None and index.size:
                from clipengine.kernels.coverage import flagged_below

                implied = flagged_below(level.plan, lower_under[0], index, lower_under[1])
            lower_under = (level.plan, under)
            picked.append((level, index, implied))
        total = sum(p[1].shape[0] for p in picked)
        if total == 0:
            return [], 0
        counts = np.concatenate([lv.count[ix] for lv, ix, _ in picked]).astype(np.float64)
        expected = np.concatenate([lv.expected[ix] for lv, ix, _ in picked])
        ts = np.concatenate([np.full(ix.shape[0], lv.t) for lv, ix, _ in picked])
        order = np.lexsort((-expected, ts, counts))[:limit]
        starts = np.cumsum([0] + [p[1].shape[0] for p in picked])
        out = []
        for i in order:
            which = int(np.searchsorted(starts, i, side="right") - 1)
            level, index, implied = picked[which]
            j = int(i - starts[which])
            out.append(self._record(level, int(index[j]), implied=bool(implied[j])))
        return out, total

    def _record(self, level: Level, c: int, *, implied: bool | None = None) -> dict[str, Any]:
        record: dict[str, Any] = {"predicates": self.predicates(level, [c])[0],
                                  "expected": _round(level.expected[c])}
        record["count"] = _count_value(level.count[c])
        record["t"] = level.t
        if implied is not None:
            record["implied"] = implied
        if self.params["min_prob"] is not None or self.params["soft"]:
            record["count_by_labels"] = int(level.labels[c])
        if level.errors is not None and level.hard[c] > 0:
            record.update(self._error_fields(level, np.array([c]), scalar=True))
        return record

    def _error_fields(self, level: Level, index: np.ndarray, *, scalar: bool = False) -> dict[str, Any]:
        from clipengine.slices import stats

        n = level.hard[index].astype(np.float64)
        total = level.errors[index]
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = total / n
        if self.binary_errors:
            low, high = stats.wilson_interval(total, n)
        else:
            low, high = stats.mean_t_interval(total, level.errors_sq[index], n)
        fields = {"errors": total, "error_rate": rate, "ci_low": low, "ci_high": high}
        if scalar:
            return {key: _round(value[0]) for key, value in fields.items()}
        return fields

    def differences(self, limit: int) -> dict[str, Any] | None:
        """Set-difference coverage against the ``against`` frame (None without one); ``to_json()["against"]``.

        Both frames are counted over the same features, values (the ODD's, the known values, else those
        seen in either frame) and valid combinations; *covered* means ``min_count`` items (expected
        items with ``soft``) in that frame. Other tools read this (``clipengine compare``: with the
        baseline as ``against``, ``other_not_this`` are the combinations newly missing, ``this_not_other``
        the newly covered), so its form is kept::

            {"source": str | None, "rows": int,                       # the against frame
             "coverage": [{"t", "valid", "covered_this", "covered_other", "common",
                           "this_not_other", "other_not_this"}, ...],  # one per t, counts of combinations
             "this_not_other": {"total": int, "combinations": [{"predicates": {feature: value, ...},
                                                                "t", "count", "count_other"}, ...]},
             "other_not_this": {...the same...}}

        Each list: the largest count first (here for ``this_not_other``, there for ``other_not_this``),
        then the lower t; at most ``limit`` entries of ``total``."""
        if self.against is None:
            return None
        per_t, here_only, there_only = [], [], []
        for level in self.levels:
            here = level.covered(self.min_count)
            there = level.valid & (level.other >= self.min_count)
            per_t.append({"t": level.t, "valid": int(level.valid.sum()), "covered_this": int(here.sum()),
                          "covered_other": int(there.sum()), "common": int(np.sum(here & there)),
                          "this_not_other": int(np.sum(here & ~there)), "other_not_this": int(np.sum(there & ~here))})
            here_only.append((level, np.flatnonzero(here & ~there)))
            there_only.append((level, np.flatnonzero(there & ~here)))

        def listing(picked, key) -> dict[str, Any]:
            total = sum(ix.shape[0] for _, ix in picked)
            if total == 0:
                return {"total": 0, "combinations": []}
            weight = np.concatenate([key(lv)[ix].astype(np.float64) for lv, ix in picked])
            ts = np.concatenate([np.full(ix.shape[0], lv.t) for lv, ix in picked])
            order = np.lexsort((ts, -weight))[:limit]
            starts = np.cumsum([0] + [ix.shape[0] for _, ix in picked])
            out = []
            for i in order:
                which = int(np.searchsorted(starts, i, side="right") - 1)
                level, index = picked[which]
                c = int(index[i - starts[which]])
                out.append({"predicates": self.predicates(level, [c])[0], "t": level.t,
                            "count": _count_value(level.count[c]), "count_other": _count_value(level.other[c])})
            return {"total": total, "combinations": out}

        return {**self.against, "coverage": per_t,
                "this_not_other": listing(here_only, lambda lv: lv.count),
                "other_not_this": listing(there_only, lambda lv: lv.other)}

    def to_json(self, limit: int | None = None) -> dict[str, Any]:
        """The output contract: ``coverage`` (per t: ``t``, ``covered``, ``valid``, …), ``missing`` (every
        valid combination under ``min_count``: ``predicates``, ``expected``, …; thinnest first, capped by
        ``limit`` with ``missing_total`` stated), ``out_of_odd`` (items), and the rest."""
        limit = self.params["limit"] if limit is None else limit
        missing, missing_total = self.missing(limit)
        sets, sets_total = self.feature_sets(limit)
        out: dict[str, Any] = {
            "coverage": self.coverage(),
            "missing": missing,
            "missing_total": missing_total,
            "out_of_odd": int(self.out_of_odd),
            "rows": self.n_rows,
            "features": {name: list(values) for name, values in zip(self.features, self.values)},
            "params": dict(self.params),
            "feature_sets": sets,
            "feature_sets_total": sets_total,
            "out_of_odd_values": self.out_of_odd_values,
            "excluded_present": self.excluded_present,
            "out_of_odd_examples": self.out_of_odd_examples,
            "unknown": dict(self.unknown),
            "skipped_features": dict(self.skipped_features),
        }
        if self.params["min_prob"] is not None or self.params["soft"]:
            out["certain_features"] = list(self.certain_features)
        if self.odd is not None:
            out["odd"] = self.odd
        if self.error_column is not None:
            out["errors"] = {"column": self.error_column, "binary": self.binary_errors}
        differences = self.differences(limit)
        if differences is not None:
            out["against"] = differences
        return out

    def summary(self) -> dict[str, Any]:
        """Run-level facts for Parquet metadata (no listings)."""
        return {"coverage": self.coverage(), "rows": self.n_rows, "out_of_odd": int(self.out_of_odd),
                "features": list(self.features), "params": dict(self.params)}

    def to_polars(self) -> pl.DataFrame:
        """One row per combination (every t; beyond ``table_rows`` combinations, only t ≤ 2 and those
        under ``min_count``): ``t``, ``feature_1..T`` / ``value_1..T`` (categorical; null past t),
        ``count``, ``expected``, ``valid``, ``covered`` and, as they apply, ``count_by_labels``,
        ``errors`` / ``error_rate`` / ``ci_low`` / ``ci_high``, ``count_other``."""
        total = sum(level.plan.n_combinations for level in self.levels)
        keep_all = total <= self.params["table_rows"]
        top = self.levels[-1].t if self.levels else 1
        all_values = sorted({v for values in self.values for v in values})
        value_code = {v: i for i, v in enumerate(all_values)}
        # each feature's value codes → codes into the union of every value
        lookup = np.full((len(self.features), max(len(v) for v in self.values)), -1, np.int32)
        for f, domain in enumerate(self.values):
            lookup[f, : len(domain)] = [value_code[v] for v in domain]
        parts = []
        for level in self.levels:
            index = (np.arange(level.plan.n_combinations) if keep_all or level.t <= 2
                     else np.flatnonzero(level.under(self.min_count)))
            sets, values = level.plan.decode(index)
            features = level.plan.sets[sets]
            columns: dict[str, Any] = {"t": pl.Series(np.full(index.shape[0], level.t, np.uint8))}
            for position in range(top):
                if position < level.t:
                    feature_codes = features[:, position].astype(np.int32)
                    value_codes = lookup[feature_codes, values[:, position]]
                    columns[f"feature_{position + 1}"] = _categorical(feature_codes, self.features)
                    columns[f"value_{position + 1}"] = _categorical(value_codes, all_values)
                else:
                    columns[f"feature_{position + 1}"] = _categorical(None, self.features, index.shape[0])
                    columns[f"value_{position + 1}"] = _categorical(None, all_values, index.shape[0])
            columns["count"] = pl.Series(level.count[index])
            columns["expected"] = pl.Series(level.expected[index])
            columns["valid"] = pl.Series(level.valid[index])
            columns["covered"] = pl.Series(level.valid[index] & (level.count[index] >= self.min_count))
            if self.params["min_prob"] is not None or self.params["soft"]:
                columns["count_by_labels"] = pl.Series(level.labels[index])
            if level.errors is not None:
                for name, value in self._error_fields(level, index).items():
                    columns[name] = pl.Series(np.asarray(value, dtype=np.float64))
            if level.other is not None:
                columns["count_other"] = pl.Series(level.other[index])
            parts.append(pl.DataFrame(columns))
        return pl.concat(parts, how="vertical") if parts else pl.DataFrame()


def _categorical(codes: np.ndarray | None, categories: list[str], n: int = 0) -> pl.Series:
    """An Enum column of ``categories[codes]`` (all null without ``codes``)."""
    dtype = pl.Enum(categories)
    if codes is None:
        return pl.Series([None] * n, dtype=dtype)
    return pl.Series(np.asarray(codes, dtype=np.int64)).replace_strict(list(range(len(categories))), categories,
                                                                       return_dtype=dtype)


def _per_set(level: Level, flags: np.ndarray) -> np.ndarray:
    return np.add.reduceat(flags.astype(np.int64), level.plan.set_offsets[:-1]) if level.plan.n_sets else np.zeros(0)


def _round(value) -> float | None:
    value = float(value)
    if not math.isfinite(value):
        return None
    return round(value, 6)


def _count_value(value) -> int | float:
    return int(value) if isinstance(value, (np.integer, int)) else _round(value)


# ---- coding the features -------------------------------------------------------------------------------


@dataclass
class _Feature:
    name: str
    text: pl.Series  # the values as text (nulls kept)
    prob: np.ndarray | None  # (m,) float32 label probabilities, or None (certain)
    numeric: bool = False  # the column holds numbers (its values sort as numbers)
    observed: pl.Series | None = None  # its distinct values (without an ODD)


def _as_text(series: pl.Series, name: str) -> pl.Series | str:
    """The column as text the way ODD values are written, or the reason it cannot be a feature."""
    dtype = series.dtype
    if dtype == pl.String:
        return series
    if dtype == pl.Boolean:
        return series.cast(pl.String)  # "true" / "false"
    if dtype == pl.Categorical or isinstance(dtype, pl.Enum):
        return series.cast(pl.String)
    if dtype.is_integer():
        return series.cast(pl.String)
    if dtype.is_float():
        values = series.drop_nulls().drop_nans()
        if values.len() and not bool((values == values.round(0)).all()):
            return "continuous numbers (bin the column first, or list its values in an ODD file)"
        return series.fill_nan(None).cast(pl.Int64).cast(pl.String)
    if dtype in (pl.Date, pl.Datetime, pl.Time):
        return series.cast(pl.String)
    return f"unsupported type {dtype}"


def _domain(feature: _Feature, other: _Feature | None) -> list[str]:
    """The observed values in natural order (numbers numerically), over both frames."""
    seen = set(feature.observed.to_list())
    if other is not None:
        seen |= set(other.text.drop_nulls().unique().to_list())
    if feature.numeric:
        return [str(v) for v in sorted(int(x) for x in seen)]
    return sorted(seen)


def _features_of(frame: pl.DataFrame, is_run: bool, error: str | None) -> list[str]:
    """Default features: a run's labelled attributes (columns with a ``_prob`` column), else every
    column but keys, errors and label probabilities/margins."""
    columns = frame.columns
    labelled = [c for c in columns if c + PROB_SUFFIX in columns]
    if is_run and labelled:
        return labelled
    return [c for c in columns if c not in KEY_COLUMNS and c != error
            and not (c.endswith(PROB_SUFFIX) and c[: -len(PROB_SUFFIX)] in columns)
            and not (c.endswith(MARGIN_SUFFIX) and c[: -len(MARGIN_SUFFIX)] in columns)]


def _errors_of(frame: pl.DataFrame, column: str) -> np.ndarray:
    series = frame[column]
    if not (series.dtype.is_numeric() or series.dtype == pl.Boolean):
        raise ClipengineError(f"error column '{column}' must be numeric (0/1 or non-negative), not {series.dtype}")
    if series.null_count():
        raise ClipengineError(f"error column '{column}' has {series.null_count()} missing value(s)")
    values = series.cast(pl.Float64).to_numpy().astype(np.float64)
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise ClipengineError(f"error column '{column}' has {bad} NaN or infinite value(s)")
    if np.any(values < 0):
        raise ClipengineError(f"error column '{column}' has {int(np.sum(values < 0))} negative value(s)")
    return values


def _probs_of(frame: pl.DataFrame, name: str) -> np.ndarray | None:
    column = name + PROB_SUFFIX
    if column not in frame.columns:
        return None
    series = frame[column]
    if not series.dtype.is_numeric():
        raise ClipengineError(f"probability column '{column}' must be numeric, not {series.dtype}")
    values = series.cast(pl.Float32).fill_null(float("nan")).to_numpy().astype(np.float32)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if np.any(bad):
        raise ClipengineError(f"probability column '{column}' has {int(bad.sum())} value(s) outside [0, 1]")
    return values


def _resolve_features(frame: pl.DataFrame, names: Sequence[str] | None, odd: Odd | None, is_run: bool,
                      error: str | None, max_levels: int,
                      optional: bool = False) -> tuple[list[_Feature], dict[str, str]]:
    skipped: dict[str, str] = {}
    explicit = (names is not None and not optional) or odd is not None
    if odd is not None:
        chosen = list(odd.features)
        if names is not None:
            outside = [n for n in names if n not in odd.features]
            if outside:
                raise ClipengineError(f"feature '{outside[0]}' is not in {odd.source} (its features: "
                                      f"{', '.join(odd.features)})")
            chosen = [n for n in chosen if n in set(names)]
        missing = [n for n in chosen if n not in frame.columns]
        if missing:
            raise ClipengineError(f"{odd.source}: 'features.{missing[0]}': no column '{missing[0]}' in the table "
                                  f"(columns: {', '.join(frame.columns)})")
    elif names is not None:
        chosen = list(dict.fromkeys(names))
        missing = [n for n in chosen if n not in frame.columns]
        if missing and optional:
            skipped.update({n: "no such column" for n in missing})
            chosen = [n for n in chosen if n in frame.columns]
        elif missing:
            raise ClipengineError(f"feature column(s) {', '.join(repr(n) for n in missing)} not found; "
                                  f"available columns: {', '.join(frame.columns)}")
    else:
        chosen = _features_of(frame, is_run, error)
    if error is not None and error in chosen and optional and odd is None:
        skipped[error] = "the error column"
        chosen = [n for n in chosen if n != error]
    elif error is not None and error in chosen:
        raise ClipengineError(f"the error column '{error}' cannot also be a feature")
    texts = {}
    for name in chosen:
        text = _as_text(frame[name], name)
        if isinstance(text, str):
            if explicit:
                raise ClipengineError(f"feature '{name}': {text}")
            skipped[name] = text
        else:
            texts[name] = text.alias(name)
    observed = {}
    if odd is None and texts:  # every column's distinct values, the columns in parallel
        row = pl.DataFrame(list(texts.values())).select(pl.all().drop_nulls().unique().implode()).row(0)
        observed = dict(zip(texts, (pl.Series(values, dtype=pl.String) for values in row)))
    features = []
    for name, text in texts.items():
        if odd is None:
            n_values = observed[name].len()
            if n_values == 0:
                if explicit:
                    raise ClipengineError(f"feature '{name}' has no values (all missing)")
                skipped[name] = "no values"
                continue
            if n_values > max_levels:
                reason = f"{n_values} distinct values > max_levels {max_levels}"
                if explicit:
                    raise ClipengineError(f"feature '{name}': {reason} (list its values in an ODD file, or bin it)")
                skipped[name] = reason
                continue
        numeric = frame[name].dtype.is_numeric()
        features.append(_Feature(name, text, _probs_of(frame, name), numeric, observed.get(name)))
    return features, skipped


def _code(features: list[_Feature], domains: list[list[str]], min_prob: float | None, *, outside_kept: bool = True):
    """``(codes (f, m) int16, labels (f, m) int16 | None, outside (f, m) bool | None)``: mode codes (labels
    below ``min_prob`` unknown), codes of every label (when ``min_prob``), values outside the domain
    (None without ``outside_kept``: only an ODD reports items out of it; elsewhere such a value is
    unknown, as its code says)."""
    m = features[0].text.len() if features else 0
    codes = np.empty((len(features), m), np.int16)
    labels = np.empty((len(features), m), np.int16) if min_prob is not None else None
    outside = np.zeros((len(features), m), bool) if outside_kept else None
    # an Enum of the domain numbers the values in its order, a value outside it becomes null; the
    # columns are coded in parallel
    texts = pl.DataFrame([f.text.alias(f"c{j}") for j, f in enumerate(features)])
    coded = texts.select(pl.col(f"c{j}").cast(pl.Enum(domain), strict=False).to_physical().cast(pl.Int16)
                         .fill_null(-1).alias(f"code{j}") for j, domain in enumerate(domains))
    for j, feature in enumerate(features):
        code = coded.get_column(f"code{j}").to_numpy()
        if outside is not None:
            # outside the domain: coded -1 although the value is not null (found here rather than by a
            # second expression in the query, which would cost as much as the coding)
            outside[j] = code < 0
            if feature.text.null_count():
                outside[j] &= feature.text.is_not_null().to_numpy()
        if labels is not None:
            labels[j] = code
            if feature.prob is not None:
                unsure = feature.prob < min_prob
                code = np.where(unsure, np.int16(-1), code)
                if outside is not None:
                    outside[j] &= ~unsure
        codes[j] = code
    return codes, labels, outside


# ---- the stage ------------------------------------------------------------------------------------------


def _check(config: CoverageConfig) -> None:
    if not isinstance(config.t, (int, np.integer)) or not 1 <= config.t <= 4:
        raise ClipengineError(f"t must be 1, 2, 3 or 4, not {config.t!r}")
    if not isinstance(config.min_count, (int, np.integer)) or config.min_count < 1:
        raise ClipengineError(f"min_count must be an integer ≥ 1, not {config.min_count!r}")
    if config.min_prob is not None and not 0 <= float(config.min_prob) <= 1:
        raise ClipengineError(f"min_prob must be in [0, 1], not {config.min_prob}")
    if not isinstance(config.limit, (int, np.integer)) or config.limit < 0:
        raise ClipengineError(f"limit must be an integer ≥ 0, not {config.limit!r}")
    if config.max_levels < 1:
        raise ClipengineError(f"max_levels must be ≥ 1, not {config.max_levels}")


def _check_size(domains: list[int], t: int) -> None:
    """Refuse before allocating: C(f, t) sets and e_t(domains) combinations."""
    f = len(domains)
    sets = math.comb(f, t)
    poly = [1.0] + [0.0] * t  # elementary symmetric polynomials of the domain sizes
    for d in domains:
        for k in range(t, 0, -1):
            poly[k] += poly[k - 1] * d
    combinations = sum(poly[1:])
    if sets > MAX_SETS or combinations > MAX_COMBINATIONS:
        raise ClipengineError(f"t = {t} over {f} features makes {sets:,} feature sets and {combinations:,.0f} "
                              f"combinations (at most {MAX_SETS:,} / {MAX_COMBINATIONS:,}); choose fewer features "
                              f"(--features) or a lower --t")


def measure_coverage(
    frame: pl.DataFrame,
    *,
    config: CoverageConfig = CoverageConfig(),
    features: Sequence[str] | None = None,
    odd: Odd | None = None,
    against: pl.DataFrame | None = None,
    against_source: str | None = None,
    is_run: bool = False,
    features_optional: bool = False,
    known_values: Mapping[str, Sequence[str]] | None = None,
) -> CoverageResult:
    """t-way coverage of ``frame``'s features (see the module docstring).

    ``features``: the columns (default: the ODD's features, else a run's labelled attributes, else
    every column but keys, errors and ``_prob`` / ``_margin``); ``odd``: a parsed ODD
    (:func:`clipengine.coverage.odd.load_odd`); ``against``: another frame with the same feature
    columns; ``is_run``: ``frame`` is a run's metadata (for the default features);
    ``features_optional``: ``features`` is a default list (a run's, :func:`coverage_run`) rather than
    the user's — a name that is no column (here or in ``against``) or cannot be a feature is left out
    with its reason in ``skipped_features``, and ``t`` is lowered to the number of features left
    (``params["t_requested"]`` then keeps the asked one); ``known_values``: without an ODD, the values
    some features can take, in order (a run's schema attributes: their classes,
    :func:`clipengine.coverage.inputs.run_values`) — a value no item shows is missing, a value outside
    the list unknown; the other features take the values they show.

    >>> import polars as pl
    >>> frame = pl.DataFrame({"weather": ["rain", "fog", "rain", "clear"], "time": ["day", "day", "night", "night"]})
    >>> result = measure_coverage(frame, config=CoverageConfig(progress=False))
    >>> pairs = result.to_json()["coverage"][1]
    >>> pairs["covered"], pairs["valid"]
    (4, 6)
    >>> [m["predicates"] for m in result.to_json()["missing"]]
    [{'weather': 'clear', 'time': 'day'}, {'weather': 'fog', 'time': 'night'}]
    """
    from clipengine.bindings.numba_start import prepare_numba
    from clipengine.kernels import coverage as kernels

    prepare_numba()  # before the first kernel loads: Numba's start-up without scipy.linalg

    if isinstance(frame, pl.LazyFrame):
        frame = frame.collect()
    if isinstance(against, pl.LazyFrame):
        against = against.collect()
    _check(config)
    if frame.height == 0:
        raise ClipengineError("the table has no rows")
    error = config.error
    if error is None and DEFAULT_ERROR_COLUMN in frame.columns:
        error = DEFAULT_ERROR_COLUMN
    elif error is not None and error not in frame.columns:
        raise ClipengineError(f"error column '{error}' not found; available columns: {', '.join(frame.columns)}")
    optional = features_optional and features is not None and odd is None
    chosen, skipped = _resolve_features(frame, features, odd, is_run, error, config.max_levels, optional)
    if optional and against is not None:
        for feature in [f for f in chosen if f.name not in against.columns]:
            skipped[feature.name] = f"not in the --against table {against_source or ''}".rstrip()
            chosen.remove(feature)
    if not chosen:
        detail = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "no feature columns"
        raise ClipengineError(f"no usable feature column ({detail})")
    t_requested = config.t
    if config.t > len(chosen) and optional:
        config = replace(config, t=len(chosen))
    elif config.t > len(chosen):
        raise ClipengineError(f"t = {config.t} needs at least {config.t} features; there are {len(chosen)} "
                              f"({', '.join(f.name for f in chosen)})")
    uses_probs = config.min_prob is not None or config.soft
    certain = [f.name for f in chosen if f.prob is None]
    if uses_probs and len(certain) == len(chosen):
        flag = "--soft" if config.soft else "--min-prob"
        raise ClipengineError(f"{flag} needs label probabilities (<feature>{PROB_SUFFIX} columns, as metadata.parquet "
                              f"has); none of {', '.join(certain)} has one")

    other_features = None
    if against is not None:
        missing = [f.name for f in chosen if f.name not in against.columns]
        if missing:
            raise ClipengineError(f"--against {against_source or 'frame'}: no column '{missing[0]}' (a feature here)")
        if against.height == 0:
            raise ClipengineError(f"--against {against_source or 'frame'}: the table has no rows")
        other_features = []
        for feature in chosen:
            text = _as_text(against[feature.name], feature.name)
            if isinstance(text, str):
                raise ClipengineError(f"--against {against_source or 'frame'}: feature '{feature.name}': {text}")
            probs = _probs_of(against, feature.name) if uses_probs else None
            other_features.append(_Feature(feature.name, text, probs))

    if odd is not None:
        domains = [list(odd.features[f.name]) for f in chosen]
    else:
        domains = []
        for i, feature in enumerate(chosen):
            if known_values and feature.name in known_values:
                domains.append([str(v) for v in known_values[feature.name]])
                continue
            domains.append(_domain(feature, other_features[i] if other_features else None))
            if len(domains[-1]) > config.max_levels:
                raise ClipengineError(f"feature '{feature.name}': {len(domains[-1])} distinct values over both "
                                      f"tables > max_levels {config.max_levels}")
    sizes = np.array([len(d) for d in domains], np.int64)
    _check_size(sizes.tolist(), config.t)

    codes, label_codes, outside = _code(chosen, domains, config.min_prob, outside_kept=odd is not None)
    m = frame.height
    errors = _errors_of(frame, error) if error is not None else None
    binary = errors is None or bool(np.all((errors == 0) | (errors == 1)))
    probs = None
    if config.soft:
        probs = np.stack([f.prob if f.prob is not None else np.ones(m, np.float32) for f in chosen])

    other_codes = other_probs = None
    if other_features is not None:
        other_codes, _, _ = _code(other_features, domains, config.min_prob, outside_kept=False)
        if config.soft:
            other_probs = np.stack([f.prob if f.prob is not None else np.ones(against.height, np.float32)
                                    for f in other_features])
    plans, hard, labels, effective, error_sums, error_squares, other = _count_all(
        config, sizes, codes, label_codes, probs, errors, binary, other_codes, other_probs)

    rule_features, rule_values = _rules(odd, chosen, domains)
    shares = effective[0].astype(np.float64) / m
    levels = []
    for i, plan in enumerate(plans):
        valid = ~kernels.excluded_combinations(plan, rule_features, rule_values)
        levels.append(Level(plan=plan, count=effective[i], expected=m * kernels.expected_shares(plan, shares),
                            valid=valid, hard=hard[i], labels=labels[i],
                            errors=error_sums[i] if error_sums is not None else None,
                            errors_sq=error_squares[i] if error_squares is not None else None,
                            other=other[i] if other is not None else None))

    params = {"t": int(config.t), "min_count": int(config.min_count),
              "min_prob": float(config.min_prob) if config.min_prob is not None else None,
              "soft": bool(config.soft), "odd": odd.path if odd is not None else None,
              "error": error, "limit": int(config.limit), "table_rows": int(config.table_rows)}
    if t_requested != config.t:
        params["t_requested"] = int(t_requested)
    result = CoverageResult(n_rows=m, features=[f.name for f in chosen], values=domains, levels=levels,
                            params=params, skipped_features=skipped, certain_features=certain if uses_probs else [],
                            binary_errors=binary, error_column=error,
                            unknown={f.name: int(np.sum(codes[j] < 0)) for j, f in enumerate(chosen)})
    if odd is not None:
        result.odd = odd.to_dict()
        _out_of_odd(result, frame, codes, outside, rule_features, rule_values, odd, chosen, domains)
    if against is not None:
        result.against = {"source": against_source, "rows": int(against.height)}
    return result


def _count_all(config: CoverageConfig, sizes: np.ndarray, codes: np.ndarray, label_codes: np.ndarray | None,
               probs: np.ndarray | None, errors: np.ndarray | None, binary: bool, other_codes: np.ndarray | None,
               other_probs: np.ndarray | None):
    """Every pass over the rows, per t: ``(plans, hard, labels, effective, error_sums, error_squares,
    other)`` — counts by the mode's labels, by every label, the counts coverage uses (soft sums with
    ``soft``), error counts (0/1: the error rows' own counts) or sums and sums of squares, and the
    ``--against`` table's counts."""
    from clipengine import envs
    from clipengine.kernels import coverage as kernels
    from clipengine.progress import progress_bar

    m, ts = codes.shape[1], range(1, config.t + 1)
    passes = 1 + (label_codes is not None) + (config.t if config.soft else 0)
    passes += config.t if errors is not None and not binary else 0
    total_rows = passes * m + (int(np.sum(errors == 1)) if errors is not None and binary else 0)
    if other_codes is not None:
        total_rows += other_codes.shape[1] * (config.t if config.soft else 1)
    threads = envs.num_threads()
    bar = progress_bar(total_rows, "coverage: counting", enabled=config.progress, unit="row")
    try:
        def count(table):
            return kernels.count_combinations(table, sizes, config.t, threads=threads, on_rows=bar.update)

        def sums(table, t, values, weights=None):
            return kernels.sum_combinations(table, sizes, t, values=values, weights=weights, threads=threads,
                                            on_rows=bar.update)[1]

        levels = count(codes)
        plans, hard = [plan for plan, _ in levels], [c for _, c in levels]
        labels = [c for _, c in count(label_codes)] if label_codes is not None else hard
        effective = [sums(codes, t, np.ones((1, m)), probs)[0] for t in ts] if config.soft else hard
        error_sums = error_squares = None
        if errors is not None and binary:
            error_sums = [c.astype(np.float64) for _, c in count(np.ascontiguousarray(codes[:, errors == 1]))]
        elif errors is not None:
            pairs = [sums(codes, t, np.stack([errors, errors * errors])) for t in ts]
            error_sums, error_squares = [p[0] for p in pairs], [p[1] for p in pairs]
        other = None
        if other_codes is not None and config.soft:
            other = [sums(other_codes, t, np.ones((1, other_codes.shape[1])), other_probs)[0] for t in ts]
        elif other_codes is not None:
            other = [c for _, c in count(other_codes)]
    finally:
        bar.close()
    return plans, hard, labels, effective, error_sums, error_squares, other


def _rules(odd: Odd | None, chosen: list[_Feature], domains: list[list[str]]):
    """The ODD's exclusions over the chosen features: ``(rule_features (R, k) int32 padded with -1,
    rule_values (R, V) bool)``; a rule naming a feature left out (by --features) cannot apply."""
    from clipengine.kernels.coverage import value_offsets

    offsets = value_offsets(np.array([len(d) for d in domains]))
    position = {f.name: j for j, f in enumerate(chosen)}
    rules = [rule for rule in (odd.exclude if odd is not None else ()) if all(f in position for f in rule)]
    width = max((len(rule) for rule in rules), default=1)
    rule_features = np.full((len(rules), width), -1, np.int32)
    rule_values = np.zeros((len(rules), int(offsets[-1])), bool)
    for r, rule in enumerate(rules):
        for k, (name, values) in enumerate(rule.items()):
            j = position[name]
            rule_features[r, k] = j
            for value in values:
                rule_values[r, offsets[j] + domains[j].index(value)] = True
    return rule_features, rule_values


def _out_of_odd(result: CoverageResult, frame: pl.DataFrame, codes: np.ndarray, outside: np.ndarray,
                rule_features: np.ndarray, rule_values: np.ndarray, odd: Odd, chosen: list[_Feature],
                domains: list[list[str]]) -> None:
    from clipengine.kernels.coverage import value_offsets

    offsets = value_offsets(np.array([len(d) for d in domains]))
    for j, feature in enumerate(chosen):
        if outside[j].any():
            top = feature.text.filter(pl.Series(outside[j])).value_counts(sort=True).head(TOP_VALUES)
            result.out_of_odd_values[feature.name] = {str(v): int(n) for v, n in zip(top[top.columns[0]],
                                                                                   top["count"])}

    def matches(r: int, rows) -> np.ndarray:
        """Which ``rows`` show rule r (every feature of it known, with a value it names)."""
        hit = np.ones(np.shape(codes[0, rows]), bool)
        for j in rule_features[r][rule_features[r] >= 0]:
            code = codes[j, rows]
            hit &= (code >= 0) & rule_values[r, offsets[j] + np.maximum(code, 0)]
        return hit

    def words(r: int) -> dict[str, Any]:
        out = {}
        for j in rule_features[r][rule_features[r] >= 0]:
            matched = [domains[j][v] for v in np.flatnonzero(rule_values[r, offsets[j]: offsets[j + 1]])]
            out[chosen[j].name] = matched[0] if len(matched) == 1 else matched
        return out

    off = outside.any(axis=0)
    groups = [np.flatnonzero(outside[j]) for j in range(len(chosen)) if outside[j].any()]
    for r in range(rule_features.shape[0]):
        hit = matches(r, slice(None))
        if hit.any():
            result.excluded_present.append({"predicates": words(r), "count": int(hit.sum())})
            off |= hit
            groups.append(np.flatnonzero(hit))
    rows = np.flatnonzero(off)
    result.out_of_odd = int(rows.shape[0])
    result.out_of_odd_rows = rows
    # examples of every reason: the first items of each feature's outside values and of each exclusion
    share = max(1, EXAMPLES // max(len(groups), 1))
    examples = sorted(set(np.concatenate([g[:share] for g in groups]).tolist()) if groups else [])[:EXAMPLES]
    keys = [k for k in KEY_COLUMNS if k in frame.columns]
    for i in examples:
        example: dict[str, Any] = {"row": i, **(frame.select(keys).row(i, named=True) if keys else {})}  # box: a list
        example["reasons"] = [f"{f.name} = {f.text[i]}" for j, f in enumerate(chosen) if outside[j, i]] + [
            "excluded: " + CoverageResult.describe(words(r))
            for r in range(rule_features.shape[0]) if matches(r, [i])[0]]
        result.out_of_odd_examples.append(json.loads(json.dumps(example, default=str)))


# ---- the run's stage ---------------------------------------------------------------------------------


def coverage_run(run_dir: str | Path, config: CoverageConfig, features: Sequence[str] | None) -> CoverageResult:
    """The coverage stage of a run: its items (metadata ⋈ errors, :func:`clipengine.coverage.inputs.read_run_table`)
    → :func:`measure_coverage` → ``coverage.json`` / ``coverage.parquet`` in ``run_dir``.

    The features: the ODD's (``config.odd``), else ``features`` as a default list — a run passes the
    slices stage's features, the schema's attributes then the dataset's own columns
    (:func:`clipengine.artifacts.joined_features`); those that cannot be features (continuous
    numbers, more than ``max_levels`` values, absent) are left out with their reason, and ``t`` is
    lowered to the number left. Without an ODD an attribute's values are the schema's classes (a
    class no item was given shows as missing), a dataset column's the values it holds."""
    from clipengine.coverage.inputs import read_run_table, run_values
    from clipengine.coverage.odd import load_odd

    frame = read_run_table(run_dir)
    odd = load_odd(config.odd) if config.odd is not None else None
    result = measure_coverage(frame, config=config, features=None if odd is not None else features, odd=odd,
                              is_run=True, features_optional=True, known_values=run_values(run_dir))
    write_coverage(result, run_dir)
    return result


# ---- writing -------------------------------------------------------------------------------------------


def write_coverage(result: CoverageResult, out_dir: str | Path, *, record: dict | None = None) -> tuple[Path, Path]:
    """``coverage.parquet`` (one row per combination, :meth:`CoverageResult.to_polars`) and ``coverage.json``
    (``record``, by default :meth:`CoverageResult.to_json`) in ``out_dir``
    (:func:`clipengine.artifacts.write_coverage`)."""
    from clipengine import artifacts

    return artifacts.write_coverage(out_dir, result.to_polars(), result.summary(),
                                    result.to_json() if record is None else record)
