"""The report's coverage section, read from ``coverage.json`` and ``coverage.parquet`` alone.

Per pair of features a heat map of the items in each combination of their values (missing cells
marked), the t-way coverage figures, the missing and thin combinations in words with the count
expected if the features were independent (and how unlikely so few items would be then), and the
items out of the ODD with thumbnails. Written by ``clipengine run``'s coverage stage or
``clipengine coverage SOURCE --out RUN``; the file is read defensively (a hand-edited or foreign
one loses the parts it lacks, never the page).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from clipengine.report.rundir import RunData, finite_or_none

MAX_HEAT_MAPS = 12  # pairs drawn, least covered first
MAX_HEAT_MAP_CELLS = 600  # a pair with more combinations is listed, not drawn
MISSING_SHOWN = 40  # missing / thin combinations listed in the page (coverage.json holds more)
FEATURE_SETS_SHOWN = 10
EXAMPLES_SHOWN = 12  # out-of-ODD items with thumbnails
UNLIKELY_P = 0.01  # fewer items than this likely under independence: "unexpected"


@dataclass
class HeatMap:
    """One pair of features: its heat map (None when it has too many combinations to draw)."""

    row_feature: str
    column_feature: str
    svg: str | None
    covered: int
    valid: int
    missing: int  # valid combinations without an item
    thin: int  # valid combinations with fewer than min_count items, but some
    cells: int


@dataclass
class MissingRow:
    """A valid combination with fewer than min_count items."""

    predicates: list[tuple[str, str, str]]  # feature, "=" or "in", value(s)
    t: int | None
    count: float | None
    expected: float | None
    p_value: float | None  # P(count or fewer items) if the features were independent
    implied: bool
    errors: float | None = None
    error_rate: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None

    @property
    def unexpected(self) -> bool:
        return self.p_value is not None and self.p_value < UNLIKELY_P


@dataclass
class OddExample:
    path: str
    reasons: list[str]
    example: Any = None  # thumbs.Example, None when the item is not among the run's items


@dataclass
class CoverageSection:
    rows: int | None
    features: list[tuple[str, int]]  # name, number of values
    min_count: float
    soft: bool
    min_prob: float | None
    has_odd: bool  # coverage.json records an ODD
    odd: str | None  # its file
    t_requested: int | None
    levels: list[dict[str, Any]]
    heat_maps: list[HeatMap]
    pairs_total: int
    missing: list[MissingRow]  # not implied by a smaller one, thinnest first
    implied: list[MissingRow]  # under min_count because a smaller combination inside is
    missing_total: int
    has_errors: bool
    feature_sets: list[dict[str, Any]]
    feature_sets_total: int
    out_of_odd: int
    odd_reasons: list[tuple[str, int]]
    examples: list[OddExample]
    skipped: list[tuple[str, str]]
    unknown: list[tuple[str, int]]
    unexpected: int = 0  # missing / thin combinations listed that independence makes unlikely
    listed: int = 0  # missing / thin combinations coverage.json lists
    notes: list[str] = field(default_factory=list)


def coverage_section(run: RunData, thumbs) -> CoverageSection | None:
    """The section's content, or None when the run has no ``coverage.json``; ``thumbs`` (a
    :class:`~clipengine.report.thumbs.ThumbnailWriter`) renders the out-of-ODD items."""
    data = run.coverage
    if not isinstance(data, dict):
        return None
    params = data.get("params") if isinstance(data.get("params"), dict) else {}
    min_count = finite_or_none(params.get("min_count")) or 1.0
    domains = _domains(data.get("features"))
    levels = []
    for entry in _dicts(data.get("coverage")):
        covered, valid = _int(entry.get("covered")), _int(entry.get("valid"))
        levels.append({"t": _int(entry.get("t")), "covered": covered, "valid": valid,
                       "share": covered / valid if covered is not None and valid else None,
                       "sets": _int(entry.get("sets")), "complete_sets": _int(entry.get("complete_sets")),
                       "covered_by_labels": _int(entry.get("covered_by_labels"))})
    heat_maps, pairs_total, notes = _heat_maps(run.coverage_pairs, domains, min_count)
    missing = [_missing_row(entry) for entry in _dicts(data.get("missing"))]
    feature_sets = [{"features": [str(f) for f in entry.get("features", []) if f is not None],
                     "covered": _int(entry.get("covered")), "valid": _int(entry.get("valid"))}
                    for entry in _dicts(data.get("feature_sets"))[:FEATURE_SETS_SHOWN]
                    if isinstance(entry.get("features"), list)]
    skipped = data.get("skipped_features") if isinstance(data.get("skipped_features"), dict) else {}
    unknown = data.get("unknown") if isinstance(data.get("unknown"), dict) else {}
    section = CoverageSection(
        rows=_int(data.get("rows")),
        features=[(name, len(values)) for name, values in domains.items()],
        min_count=min_count,
        soft=params.get("soft") is True,
        min_prob=finite_or_none(params.get("min_prob")),
        has_odd=isinstance(data.get("odd"), dict),
        odd=str(params["odd"]) if isinstance(params.get("odd"), str) else None,
        t_requested=_int(params.get("t_requested")),
        levels=levels,
        heat_maps=heat_maps,
        pairs_total=pairs_total,
        missing=[row for row in missing if not row.implied][:MISSING_SHOWN],
        implied=[row for row in missing if row.implied][:MISSING_SHOWN],
        missing_total=_int(data.get("missing_total")) or len(missing),
        has_errors=isinstance(data.get("errors"), dict),
        feature_sets=feature_sets,
        feature_sets_total=_int(data.get("feature_sets_total")) or len(feature_sets),
        out_of_odd=_int(data.get("out_of_odd")) or 0,
        odd_reasons=_odd_reasons(data),
        examples=_examples(run, thumbs, data, list(domains)),
        skipped=sorted((str(k), str(v)) for k, v in skipped.items()),
        unknown=[(str(k), n) for k, v in unknown.items() if (n := _int(v))],
        notes=notes,
    )
    section.unexpected = sum(row.unexpected for row in missing)
    section.listed = len(missing)
    return section


# ---- reading, defensively ------------------------------------------------------------------------
def _dicts(value: Any) -> list[dict]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _int(value: Any) -> int | None:
    number = finite_or_none(value)
    return int(number) if number is not None else None


def _domains(value: Any) -> dict[str, list[str]]:
    """``{feature: [values in order]}`` of coverage.json's ``features``."""
    if not isinstance(value, dict):
        return {}
    return {str(name): [str(v) for v in values] for name, values in value.items() if isinstance(values, list)}


def _predicates(value: Any) -> list[tuple[str, str, str]]:
    """``(feature, "=", value)`` per predicate; a list of values reads ``(feature, "in", "(a, b)")``."""
    if not isinstance(value, dict):
        return []
    out = []
    for name, item in value.items():
        if isinstance(item, list):
            out.append((str(name), "in", "(" + ", ".join(str(v) for v in item) + ")"))
        else:
            out.append((str(name), "=", str(item)))
    return out


def poisson_cdf(k: int, mean: float) -> float:
    """P(X ≤ k) for X ~ Poisson(mean), summed in log space (no underflow for large means)."""
    if mean <= 0:
        return 1.0
    log_mean = math.log(mean)
    return min(1.0, sum(math.exp(i * log_mean - mean - math.lgamma(i + 1)) for i in range(max(k, 0) + 1)))


def _missing_row(entry: dict) -> MissingRow:
    count = finite_or_none(entry.get("count"))
    expected = finite_or_none(entry.get("expected"))
    p_value = poisson_cdf(int(math.floor(count)), expected) if count is not None and expected is not None else None
    return MissingRow(
        predicates=_predicates(entry.get("predicates")),
        t=_int(entry.get("t")),
        count=count,
        expected=expected,
        p_value=p_value,
        implied=entry.get("implied") is True,
        errors=finite_or_none(entry.get("errors")),
        error_rate=finite_or_none(entry.get("error_rate")),
        ci_low=finite_or_none(entry.get("ci_low")),
        ci_high=finite_or_none(entry.get("ci_high")),
    )


def _odd_reasons(data: dict) -> list[tuple[str, int]]:
    """Why items are out of the ODD: ``feature = value`` outside its list, or an excluded combination."""
    reasons = []
    values = data.get("out_of_odd_values") if isinstance(data.get("out_of_odd_values"), dict) else {}
    for feature, counts in values.items():
        if isinstance(counts, dict):
            reasons += [(f"{feature} = {value}", n) for value, raw in counts.items() if (n := _int(raw))]
    for entry in _dicts(data.get("excluded_present")):
        words = " and ".join(f"{name} {op} {value}" for name, op, value in _predicates(entry.get("predicates")))
        if (n := _int(entry.get("count"))) and words:
            reasons.append((f"excluded: {words}", n))
    return reasons


# ---- heat maps ------------------------------------------------------------------------------------
def _heat_maps(pairs, domains: dict[str, list[str]], min_count: float) -> tuple[list[HeatMap], int, list[str]]:
    """The pairs' heat maps, least covered first (then in file order), at most ``MAX_HEAT_MAPS``."""
    import numpy as np

    from clipengine.report.charts import COVERED, EXCLUDED, MISSING, THIN, heat_map

    needed = {"feature_1", "feature_2", "value_1", "value_2", "count", "valid"}
    if pairs is None or pairs.height == 0 or not needed <= set(pairs.columns):
        return [], 0, []
    notes = []
    grouped = {}
    for row in pairs.select(sorted(needed)).iter_rows(named=True):
        if row["feature_1"] is None or row["feature_2"] is None:
            continue
        grouped.setdefault((row["feature_1"], row["feature_2"]), []).append(row)
    summaries = []
    for order, ((first, second), rows) in enumerate(grouped.items()):
        valid = [r for r in rows if r["valid"]]
        covered = sum(1 for r in valid if (finite_or_none(r["count"]) or 0.0) >= min_count)
        share = covered / len(valid) if valid else 1.0
        summaries.append((share, order, first, second, rows, covered, len(valid)))
    summaries.sort(key=lambda item: (item[0], item[1]))
    heat_maps = []
    for index, (_, _, first, second, rows, covered, valid) in enumerate(summaries[:MAX_HEAT_MAPS]):
        row_values = _ordered(domains.get(first, []), [r["value_1"] for r in rows])
        column_values = _ordered(domains.get(second, []), [r["value_2"] for r in rows])
        at_row = {v: i for i, v in enumerate(row_values)}
        at_column = {v: j for j, v in enumerate(column_values)}
        counts = np.zeros((len(row_values), len(column_values)))
        states = np.full(counts.shape, MISSING, np.int8)
        for r in rows:
            i, j = at_row[r["value_1"]], at_column[r["value_2"]]
            count = finite_or_none(r["count"]) or 0.0
            counts[i, j] = count
            if not r["valid"]:
                states[i, j] = EXCLUDED
            elif count >= min_count:
                states[i, j] = COVERED
            elif count > 0:
                states[i, j] = THIN
        cells = int(counts.size)
        svg = None
        if cells <= MAX_HEAT_MAP_CELLS:
            svg = heat_map(row_values, column_values, counts, states, row_title=first, column_title=second,
                                  salt=f"coverage-{index + 1}")
        heat_maps.append(HeatMap(row_feature=first, column_feature=second, svg=svg, covered=covered, valid=valid,
                                 missing=int(np.sum(states == MISSING)), thin=int(np.sum(states == THIN)),
                                 cells=cells))
    return heat_maps, len(summaries), notes


def _ordered(domain: list[str], seen: list[Any]) -> list[str]:
    """The domain's order, then any value the table holds that the domain lacks (None as "(null)")."""
    values = list(domain)
    known = set(values)
    for value in seen:
        text = "(null)" if value is None else str(value)
        if text not in known:
            values.append(text)
            known.add(text)
    return values


# ---- out-of-ODD examples ----------------------------------------------------------------------------
def _examples(run: RunData, thumbs, data: dict, features: list[str]) -> list[OddExample]:
    entries = _dicts(data.get("out_of_odd_examples"))[:EXAMPLES_SHOWN]
    if not entries:
        return []
    rows = _rows_by_key(run)
    out = []
    for entry in entries:
        path = str(entry.get("path", ""))
        reasons = [str(r) for r in entry.get("reasons", [])] if isinstance(entry.get("reasons"), list) else []
        row = rows.get((path, _box_key(entry.get("box"))))
        example = None
        if row is not None:
            focus = tuple(f for f in features if any(f in reason for reason in reasons))
            example = thumbs.example(row, inside=True, focus=focus)
        out.append(OddExample(path=path, reasons=reasons, example=example))
    return out


def _box_key(box: Any) -> tuple[float, ...] | None:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None
    values = [finite_or_none(v) for v in box]
    return None if any(v is None for v in values) else tuple(values)


def _rows_by_key(run: RunData) -> dict[tuple[str, tuple | None], int]:
    """The report frame's row of each item, by (path, box)."""
    import polars as pl

    frame = run.frame
    boxes = frame.get_column("box").to_list() if "box" in frame.columns else [None] * frame.height
    rows = {}
    for row, (path, box) in enumerate(zip(frame.get_column("path").cast(pl.String).to_list(), boxes)):
        rows.setdefault((path, _box_key(box)), row)
    return rows
