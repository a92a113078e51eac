"""The compared family: which slices two runs are compared on, each with one definition for both.

The family is the union of both runs' reported slices, every level-1 slice (each level of each
compared feature) and, where the runs share items, the slices a search over the items' error
changes found (:func:`clipengine.compare.stage.change_search`). A slice is a set of predicates, each either ``feature = value`` or, for a
binned numeric feature, ``low < feature ≤ high``. One definition serves both runs:

- a numeric feature the old run binned keeps the old run's bins in both runs (a feature only the
  new run binned takes the new run's); ``-inf``, ``inf`` and null are levels of their own;
- a new-run slice on a binned feature whose bounds are not one of those bins is moved to the bin
  that holds most of its items in the new run, and its bounds as reported are kept (``snapped``);
- a slice on a feature that is not compared (missing in a run, or defined differently) is not
  compared, and says why.

Slices are identified by their definition (:func:`slice_key`), so a slice both runs report is one
member of the family.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl

from clipengine.slices.coding import NEG_INF_LABEL, POS_INF_LABEL, predicate_mask

BOUND_TOLERANCE = 1e-9  # relative: bounds read back from JSON equal to a bin's edges within this


@dataclass(frozen=True)
class FeatureDefinition:
    """How a compared feature is read in both runs: by value, or in bins (``edges`` the inner edges,
    ``labels`` the bin labels, ``source`` the run whose binning it is)."""

    name: str
    edges: tuple[float, ...] | None = None
    labels: tuple[str, ...] | None = None
    source: str | None = None

    @property
    def binned(self) -> bool:
        return self.edges is not None

    def bins(self) -> list[tuple[str, tuple[float | None, float | None]]]:
        """``(label, (low, high))`` of every bin, ``None`` for an infinite end."""
        ends = [None, *self.edges, None]
        return [(label, (ends[i], ends[i + 1])) for i, label in enumerate(self.labels)]


@dataclass
class SliceDefinition:
    """One member of the family: ``predicates`` ``{feature: label}`` and ``bounds`` ``{feature: (low,
    high)}`` of its binned predicates; its rank (1 = first) among the old run's, the new run's and the
    change search's slices, and whether it is a level-1 slice; ``snapped``: a run's own bounds where
    they were moved to a bin of the family's definition."""

    predicates: dict[str, Any]
    bounds: dict[str, tuple[float | None, float | None]]
    reported_old: int | None = None
    reported_new: int | None = None
    found_by_change: int | None = None
    level_one: bool = False
    snapped: dict[str, list] = field(default_factory=dict)

    @property
    def chosen_by_errors_of_one_run(self) -> bool:
        """In the family only because a run's search chose it by that run's errors (not a level-1
        slice, not found by the change search): its comparison needs a correction for that choice."""
        return not self.level_one and self.found_by_change is None

    @property
    def key(self) -> tuple:
        return slice_key(self.predicates, self.bounds)

    def describe(self) -> str:
        return describe(self.predicates)


def describe(predicates: Mapping[str, Any]) -> str:
    """``"color = red AND size = small"``."""
    return " AND ".join(f"{name} = {'null' if value is None else value}" for name, value in predicates.items())


def slice_key(predicates: Mapping[str, Any], bounds: Mapping[str, Sequence]) -> tuple:
    """What identifies a slice across runs: per feature its bounds (binned) or its value."""
    parts = []
    for name in sorted(predicates):
        if name in bounds and bounds[name] is not None:
            low, high = bounds[name]
            parts.append((name, "bin", _round(low), _round(high)))
        else:
            parts.append((name, "value", json.dumps(predicates[name], sort_keys=True, default=str)))
    return tuple(parts)


def _round(value) -> float | None:
    if value is None or not math.isfinite(float(value)):
        return None
    return float(f"{float(value):.12g}")


def _same_bound(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = float(a), float(b)
    return abs(a - b) <= BOUND_TOLERANCE * max(1.0, abs(a), abs(b))


def _bound_pair(value) -> tuple[float | None, float | None]:
    low, high = value
    return (None if low is None or float(low) == -math.inf else float(low),
            None if high is None or float(high) == math.inf else float(high))


# ---- feature definitions -------------------------------------------------------------------------
def feature_definition(name: str, old_binned: Mapping[str, Any], new_binned: Mapping[str, Any]) -> FeatureDefinition:
    """The one definition of ``name``: the old run's bins, else the new run's, else by value."""
    for source, binned in (("old", old_binned), ("new", new_binned)):
        entry = binned.get(name)
        if isinstance(entry, Mapping) and entry.get("edges") is not None and entry.get("labels") is not None:
            return FeatureDefinition(name, tuple(float(e) for e in entry["edges"]),
                                     tuple(str(label) for label in entry["labels"]), source)
    return FeatureDefinition(name)


def level_one(definition: FeatureDefinition, frames: Sequence[pl.DataFrame], *, max_levels: int) -> list[SliceDefinition] | str:
    """Every level of a feature present in any of ``frames`` as a level-1 slice, or why there are too many."""
    name = definition.name
    columns = [frame.get_column(name) for frame in frames]
    slices: list[SliceDefinition] = []
    if definition.binned:
        values = np.concatenate([c.cast(pl.Float64).to_numpy() for c in columns])
        finite = values[np.isfinite(values)]
        codes = np.searchsorted(np.asarray(definition.edges), finite, side="left")
        present = set(np.unique(codes).tolist())
        for i, (label, bounds) in enumerate(definition.bins()):
            if i in present:
                slices.append(SliceDefinition({name: label}, {name: bounds}, level_one=True))
        if np.any(values == -np.inf):
            slices.insert(0, SliceDefinition({name: NEG_INF_LABEL}, {}, level_one=True))
        if np.any(values == np.inf):
            slices.append(SliceDefinition({name: POS_INF_LABEL}, {}, level_one=True))
        if np.any(np.isnan(values)):
            slices.append(SliceDefinition({name: None}, {}, level_one=True))
        return slices
    seen: dict[str, Any] = {}
    has_null = False
    for column in columns:
        if column.dtype.is_float():
            column = column.fill_nan(None)
        has_null |= column.null_count() > 0
        for value in column.drop_nulls().unique().to_list():
            if isinstance(value, float) and math.isinf(value):  # labelled as slice coding labels them
                value = NEG_INF_LABEL if value < 0 else POS_INF_LABEL
            seen.setdefault(json.dumps(value, default=str), value)
    if len(seen) + has_null > max_levels:
        return f"{len(seen) + has_null} values > max_levels {max_levels}"
    for value in sorted(seen.values(), key=_value_order):
        slices.append(SliceDefinition({name: value}, {}, level_one=True))
    if has_null:
        slices.append(SliceDefinition({name: None}, {}, level_one=True))
    return slices


def _value_order(value) -> tuple:
    """Values sorted within their type (numbers as numbers, text as text), types apart."""
    plain = isinstance(value, (bool, int, float, str))
    return type(value).__name__, value if plain else json.dumps(value, default=str)


# ---- reported slices ------------------------------------------------------------------------------
def from_record(record: Mapping[str, Any], definitions: Mapping[str, FeatureDefinition],
                frame: pl.DataFrame) -> SliceDefinition | str:
    """A run's reported slice in the family's definitions, or why it cannot be compared. ``frame``
    is the reporting run's table (to move a binned predicate to the bin holding most of its items)."""
    predicates = record.get("predicates")
    if not isinstance(predicates, Mapping) or not predicates:
        return "no predicates"
    raw_bounds = record.get("bounds") if isinstance(record.get("bounds"), Mapping) else {}
    missing = [name for name in predicates if name not in definitions]
    if missing:
        return f"feature{'s' if len(missing) > 1 else ''} {', '.join(missing)} not compared"
    out_predicates: dict[str, Any] = {}
    out_bounds: dict[str, tuple[float | None, float | None]] = {}
    snapped: dict[str, list] = {}
    members = None
    for name, label in predicates.items():
        definition = definitions[name]
        bounds = raw_bounds.get(name)
        if bounds is None:
            out_predicates[name] = label  # a value (or -inf / inf / null) means the same in both runs
            continue
        bounds = _bound_pair(bounds)
        if not definition.binned:
            return f"{name} is binned in one run only"
        bins = definition.bins()
        match = next((i for i, (_, b) in enumerate(bins)
                      if _same_bound(b[0], bounds[0]) and _same_bound(b[1], bounds[1])), None)
        if match is None:
            if members is None:
                members = predicate_mask(frame, predicates, raw_bounds)
            match = _fullest_bin(frame.get_column(name), members, definition, bounds)
            snapped[name] = [bounds[0], bounds[1]]
        out_predicates[name], out_bounds[name] = bins[match]
    return SliceDefinition(out_predicates, out_bounds, snapped=snapped)


def _fullest_bin(column: pl.Series, members: np.ndarray, definition: FeatureDefinition, bounds) -> int:
    """The bin of ``definition`` holding most of the slice's items (ties: the lower bin); without
    items, the bin holding the middle of ``bounds``."""
    values = column.cast(pl.Float64).to_numpy()[members]
    values = values[np.isfinite(values)]
    edges = np.asarray(definition.edges)
    if values.size:
        counts = np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(definition.labels))
        return int(np.argmax(counts))
    low, high = bounds
    middle = high if low is None else low if high is None else (low + high) / 2
    return int(np.searchsorted(edges, [middle if middle is not None else 0.0], side="left")[0])


def build_family(old_records: Sequence[Mapping], new_records: Sequence[Mapping],
                 definitions: Mapping[str, FeatureDefinition], old_frame: pl.DataFrame, new_frame: pl.DataFrame,
                 *, max_levels: int, change_records: Sequence[Mapping] = (), change_frame: pl.DataFrame | None = None,
                 ) -> tuple[list[SliceDefinition], list[dict], dict[str, str], dict[str, list[tuple]]]:
    """``(family, not compared, features without level-1 slices, levels)``: reported slices of both
    runs (old first, by rank), the change search's slices, then every level-1 slice, each definition
    once; the reported slices that cannot be compared as ``{"run", "rank", "predicates", "reason"}``;
    features skipped with a reason; per feature the keys of its level-1 slices in level order."""
    family: dict[tuple, SliceDefinition] = {}
    not_compared: list[dict] = []
    sources = [("old", old_records, old_frame), ("new", new_records, new_frame)]
    if change_frame is not None:
        sources.append(("change", change_records, change_frame))
    for run, records, frame in sources:
        for rank, record in enumerate(records, start=1):
            member = from_record(record, definitions, frame)
            if isinstance(member, str):
                not_compared.append({"run": run, "rank": rank, "predicates": dict(record.get("predicates") or {}),
                                     "reason": member})
                continue
            kept = family.setdefault(member.key, member)
            if run == "old":
                kept.reported_old = kept.reported_old or rank
            elif run == "new":
                kept.reported_new = kept.reported_new or rank
            else:
                kept.found_by_change = kept.found_by_change or rank
            kept.snapped = kept.snapped or member.snapped
    skipped: dict[str, str] = {}
    level_keys: dict[str, list[tuple]] = {}
    for name in definitions:
        levels = level_one(definitions[name], (old_frame, new_frame), max_levels=max_levels)
        if isinstance(levels, str):
            skipped[name] = levels
            continue
        level_keys[name] = [member.key for member in levels]
        for member in levels:
            family.setdefault(member.key, member).level_one = True
    return list(family.values()), not_compared, skipped, level_keys
