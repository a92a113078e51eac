"""Compare two runs: which slices got worse or better, which are new or gone, how the data drifted.

``compare_runs(old_dir, new_dir, config)`` reads both run directories (metadata ⋈ errors, the
reported slices, the labelling's record) and returns a :class:`Comparison`; ``write_comparison``
writes ``compare.json`` and ``compare_items.parquet``. The work, in order:

1. **Definitions.** A feature is compared when both runs have it and define it alike: a zero-shot
   attribute needs the same labelling model and the same schema entry (classes, prompts, strategy)
   and threshold; a dataset feature the same kind of values. Errors must be 0/1 in both runs or in
   neither. Every disagreement is listed in ``mismatches``, and what it rules out is not compared.
2. **The family** (:mod:`clipengine.compare.family`): both runs' reported slices, every level-1
   slice and, over the items both runs hold, the top slices of a search for where errors changed
   (:func:`change_search`: SliceLine on |new error − old error|), each re-evaluated on both runs
   with one definition (the old run's bins).
3. **Per slice**: size and mean error in each run with its interval, the difference new − old
   with a 95 % interval and a two-sided p-value (:mod:`clipengine.compare.difference`: paired by
   item key where the same items are in the slice in both runs), and, over the items in both runs,
   how many turned from correct (error 0) to an error and back.
4. **Selection, then q-values.** A slice a run *reported* was chosen because that run's errors were
   high in it, and the same errors enter its comparison: tested as if chosen blindly, "no change"
   would look like a change. Three kinds of members need no correction: level-1 slices (fixed in
   advance), and the change search's slices — that search sees only *how much* each item's error
   changed, never in which direction, and the paired tests judge the direction (McNemar:
   given which items flipped, each flip is a fair coin under no change). A slice in the family
   only because a run reported it gets its p-value multiplied by the number of candidates that
   run's search evaluated (``selection``; Bonferroni over the search). Benjamini–Hochberg over the
   family then gives the q-values.
5. **Status** of a slice: ``gone`` (no item in the new run), ``new`` (no item in the old run; its
   test is then the slice against the rest of the new run), else ``worse`` / ``better`` (q ≤
   ``max_q``, |diff| ≥ ``min_diff``, by the sign of the difference) or ``unchanged`` (no change at
   that level: not evidence of no change).
6. **Drift** (:mod:`clipengine.compare.drift`): per compared feature its level counts in both runs,
   χ² test, q-values over the features, PSI; ``drifted`` when q ≤ ``max_q`` and PSI ≥ ``min_psi``.
7. **Coverage** (:mod:`clipengine.coverage`): pairs of compared categorical features' values the old
   run covered and the new one misses (``coverage.newly_missing``), and the reverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import polars as pl

from clipengine import artifacts
from clipengine.compare.difference import SliceSums, compare_means
from clipengine.compare.drift import Drift, measure_drift
from clipengine.compare.family import FeatureDefinition, SliceDefinition, build_family, feature_definition
from clipengine.config import DEFAULT_BINS, CompareConfig
from clipengine.errors import ClipengineError
from clipengine.slices.coding import predicate_mask
from clipengine.slices.stats import DEFAULT_CONFIDENCE, benjamini_hochberg, slice_intervals

FORMAT = 1
STATUSES = ("worse", "new", "better", "gone", "unchanged")  # the order slices are listed in
FAIL_ON = ("worse", "new", "drift")
CHANGE_COLUMN = "__change"
ITEM_EXAMPLES = 20  # newly failing items listed in compare.json (all of them are in compare_items.parquet)

COVERAGE_T = 2  # value combinations compared between the runs: pairs
COVERAGE_LIMIT = 100  # combinations listed each way


@dataclass
class RunSide:
    """What a comparison reads of one run: ``frame`` (metadata ⋈ errors), the features its slice search
    used, its reported slices (``slices.json`` records) and run-level facts (``summary``), and the
    labelling's record (model id, schema entries per attribute, thresholds)."""

    name: str
    frame: pl.DataFrame
    attributes: list[str]
    slices: list[dict]
    summary: dict
    labelling: dict = field(default_factory=dict)
    digest: str | None = None

    @property
    def features(self) -> list[str]:
        return [str(f) for f in self.summary.get("features", [])]

    @property
    def binned(self) -> dict:
        return self.summary.get("binned") if isinstance(self.summary.get("binned"), dict) else {}

    @property
    def n_evaluated(self) -> int:
        value = self.summary.get("n_evaluated")
        return int(value) if isinstance(value, int) else len(self.slices)


def read_side(run_dir: str | Path) -> RunSide:
    """One run directory as a :class:`RunSide`; a one-line error when it is not a finished run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ClipengineError(f"{run_dir}: not a run directory (it does not exist)")
    frame, attributes, _ = artifacts.read_joined(run_dir)
    if frame.height == 0:
        raise ClipengineError(f"{run_dir}: no item has both labels and an error row")
    summary, records = artifacts.read_slices(run_dir)
    return RunSide(str(run_dir), frame, attributes, records, summary, artifacts.read_labelling(run_dir),
                   artifacts.comparison_digest(run_dir))


# ---- definitions ----------------------------------------------------------------------------------
def _kind(dtype: pl.DataType) -> str:
    if dtype == pl.Boolean:
        return "boolean"
    if dtype.is_numeric():
        return "number"
    return "text"


def _attribute_mismatch(name: str, old: RunSide, new: RunSide) -> str | None:
    """Why the zero-shot attribute ``name`` is defined differently in the two runs (None: alike)."""
    a, b = old.labelling, new.labelling
    if a.get("model_id") != b.get("model_id"):
        return f"labelled by different models ({a.get('model_id') or '?'} → {b.get('model_id') or '?'})"
    entry_a = (a.get("attributes") or {}).get(name)
    entry_b = (b.get("attributes") or {}).get(name)
    if entry_a != entry_b:
        if entry_a is None or entry_b is None:
            return "no schema record in one run"
        if entry_a.get("strategy") != entry_b.get("strategy"):
            return f"prompt aggregation differs ({entry_a.get('strategy')} → {entry_b.get('strategy')})"
        return "its schema entry differs (classes, prompts or type)"
    threshold_a = (a.get("thresholds") or {}).get(name)
    threshold_b = (b.get("thresholds") or {}).get(name)
    if threshold_a != threshold_b:
        return f"its calibrated threshold differs ({threshold_a} → {threshold_b})"
    return None


def feature_definitions(old: RunSide, new: RunSide) -> tuple[dict[str, FeatureDefinition], list[dict]]:
    """The compared features with their one definition, and every mismatch that keeps one out."""
    names = list(dict.fromkeys([*old.features, *new.features]))
    definitions: dict[str, FeatureDefinition] = {}
    mismatches: list[dict] = []
    for name in names:
        where = [side.name for side in (old, new) if name not in side.frame.columns]
        if where:
            run = "old" if where == [old.name] else "new" if where == [new.name] else "either"
            mismatches.append({"what": "feature", "name": name, "reason": f"not in the {run} run"})
            continue
        zero_shot = (name in old.attributes, name in new.attributes)
        if zero_shot[0] != zero_shot[1]:
            mismatches.append({"what": "feature", "name": name,
                               "reason": "a zero-shot attribute in one run and a dataset column in the other"})
            continue
        if zero_shot[0]:
            reason = _attribute_mismatch(name, old, new)
            if reason:
                mismatches.append({"what": "attribute", "name": name, "reason": reason})
                continue
        kinds = (_kind(old.frame.schema[name]), _kind(new.frame.schema[name]))
        if kinds[0] != kinds[1]:
            mismatches.append({"what": "feature", "name": name, "reason": f"{kinds[0]} values → {kinds[1]} values"})
            continue
        definitions[name] = feature_definition(name, old.binned, new.binned)
    return definitions, mismatches


def _labelling_mismatches(old: RunSide, new: RunSide) -> list[dict]:
    """Run-level differences in how labels were made (stated even when no attribute is affected)."""
    out = []
    a, b = old.labelling, new.labelling
    if a.get("model_id") != b.get("model_id"):
        out.append({"what": "model", "name": "model_id",
                    "reason": f"labels made by different models ({a.get('model_id') or '?'} → {b.get('model_id') or '?'}); "
                              "zero-shot attributes are not compared"})
    if a.get("schema_hash") != b.get("schema_hash"):
        out.append({"what": "schema", "name": str(b.get("schema") or a.get("schema") or "?"),
                    "reason": f"schemas differ ({str(a.get('schema_hash') or '?')[:12]} → {str(b.get('schema_hash') or '?')[:12]}); "
                              "attributes whose entries differ are not compared"})
    return out


# ---- items ------------------------------------------------------------------------------------
def _key_columns(old: pl.DataFrame, new: pl.DataFrame) -> list[str] | None:
    old_keys = [c for c in artifacts.KEY_COLUMNS if c in old.columns]
    new_keys = [c for c in artifacts.KEY_COLUMNS if c in new.columns]
    return old_keys if old_keys == new_keys else None


def _key_expression(frame: pl.DataFrame, columns: list[str]) -> pl.Expr:
    key = pl.col("path").cast(pl.String)
    if "box" in columns:
        box = pl.col("box").cast(pl.List(pl.Float64)).list.eval(pl.element().cast(pl.String)).list.join(",")
        key = pl.concat_str([key, pl.lit("\x1f"), box.fill_null("")])
    return key


def match_items(old: pl.DataFrame, new: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs ``(old rows, new rows)``, ``(P,)`` int64 each, of the items in both runs (same
    ``path`` [, ``box``]), in the new run's row order."""
    columns = _key_columns(old, new)
    if columns is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    left = old.select(_key_expression(old, columns).alias("__key")).with_row_index("__old")
    right = new.select(_key_expression(new, columns).alias("__key")).with_row_index("__new")
    pairs = right.join(left, on="__key", how="inner", maintain_order="left")
    return pairs.get_column("__old").to_numpy().astype(np.int64), pairs.get_column("__new").to_numpy().astype(np.int64)


# ---- the comparison ------------------------------------------------------------------------------
@dataclass
class Comparison:
    """The result: ``slices`` and ``drift`` as the JSON records of the output contract, the run-level
    ``facts``, the ``mismatches``, and the changed items (``items``: a frame of the matched items whose
    error changed)."""

    facts: dict[str, Any]
    slices: list[dict]
    drift: list[dict]
    mismatches: list[dict]
    not_compared: list[dict]
    items: pl.DataFrame

    def findings(self, kinds=FAIL_ON) -> list[dict]:
        """The slices and drifted attributes that count as findings of ``kinds`` (worse, new, drift)."""
        out = []
        for record in self.slices:
            if record["status"] in kinds and record.get("finding"):
                out.append(record)
        if "drift" in kinds:
            out += [record for record in self.drift if record.get("finding")]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **self.facts, "mismatches": self.mismatches, "not_compared": self.not_compared,
                "slices": self.slices, "drift": self.drift}


class _Masks:
    """Row masks of predicates in one run, each atom (one predicate) computed once."""

    def __init__(self, frame: pl.DataFrame):
        self.frame = frame
        self.atoms: dict[tuple, np.ndarray] = {}

    def of(self, member: SliceDefinition) -> np.ndarray:
        mask = np.ones(self.frame.height, dtype=bool)
        for name, value in member.predicates.items():
            bounds = member.bounds.get(name)
            atom = (name, bounds) if bounds is not None else (name, "value", repr(value))
            if atom not in self.atoms:
                self.atoms[atom] = predicate_mask(self.frame, {name: value}, {name: bounds} if bounds else None)
            mask &= self.atoms[atom]
        return mask


def _errors(frame: pl.DataFrame) -> np.ndarray:
    return frame.get_column(artifacts.ERROR_COLUMN).cast(pl.Float64).fill_null(0.0).to_numpy()


def _is_binary(errors: np.ndarray) -> bool:
    return bool(np.all((errors == 0) | (errors == 1)))


def _num(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def compare_sides(old: RunSide, new: RunSide, config: CompareConfig | None = None) -> Comparison:
    """Compare two read runs (see the module's steps)."""
    config = config or CompareConfig()
    definitions, mismatches = feature_definitions(old, new)
    mismatches = _labelling_mismatches(old, new) + mismatches
    old_errors, new_errors = _errors(old.frame), _errors(new.frame)
    binary_old, binary_new = _is_binary(old_errors), _is_binary(new_errors)
    errors_agree = binary_old == binary_new
    if not errors_agree:
        kinds = ("0/1 errors" if binary_old else "errors of other values", "0/1 errors" if binary_new else "errors of other values")
        mismatches.append({"what": "errors", "name": artifacts.ERROR_COLUMN,
                           "reason": f"{kinds[0]} in the old run, {kinds[1]} in the new: slices are not compared"})
    binary = binary_old and binary_new
    old_rows, new_rows = match_items(old.frame, new.frame)
    if _key_columns(old.frame, new.frame) is None:
        mismatches.append({"what": "items", "name": "box",
                           "reason": "items are object boxes in one run and whole images in the other: none is matched"})

    change_records, change_frame, change_facts = ([], None, {}) if not errors_agree else \
        change_search(old, new, old_rows, new_rows, definitions, config)
    family, not_compared, skipped, level_keys = build_family(old.slices, new.slices, definitions, old.frame, new.frame,
                                                 max_levels=config.max_levels, change_records=change_records,
                                                 change_frame=change_frame)
    old_masks, new_masks = _Masks(old.frame), _Masks(new.frame)
    drift_tables = _drift_tables(family, level_keys, old_masks, new_masks)
    slice_records = _compare_slices(family, old_masks, new_masks, old_errors, new_errors, old_rows, new_rows,
                                    binary=binary, config=config, old=old, new=new) if errors_agree else []
    drift_records = _drift_records(measure_drift(drift_tables), config)

    items, item_facts = _changed_items(new.frame, old_errors[old_rows], new_errors[new_rows], new_rows)
    item_facts.update(matched=int(old_rows.size), old_only=int(old.frame.height - old_rows.size),
                      new_only=int(new.frame.height - new_rows.size))
    facts = {
        "old": _run_facts(old, old_errors),
        "new": _run_facts(new, new_errors),
        "binary_errors": binary,
        "settings": {"max_q": config.max_q, "min_diff": config.min_diff, "min_psi": config.min_psi,
                     "confidence": DEFAULT_CONFIDENCE},
        "family": _family_facts(family, slice_records, skipped, change_facts),
        "items": item_facts,
        "features": {name: ({"binned_by": d.source} if d.binned else {"by": "value"}) for name, d in definitions.items()},
    }
    coverage = _coverage_change(old, new, [name for name, d in definitions.items() if not d.binned], config)
    if coverage is not None:
        facts["coverage"] = coverage
    comparison = Comparison(facts, slice_records, drift_records, mismatches, not_compared, items)
    facts["findings"] = {"worse": sum(1 for r in slice_records if r["status"] == "worse" and r["finding"]),
                         "better": sum(1 for r in slice_records if r["status"] == "better" and r["finding"]),
                         "new": sum(1 for r in slice_records if r["status"] == "new" and r["finding"]),
                         "gone": sum(1 for r in slice_records if r["status"] == "gone"),
                         "drift": sum(1 for r in drift_records if r["finding"])}
    return comparison


def _coverage_change(old: RunSide, new: RunSide, features: list[str], config: CompareConfig) -> dict | None:
    """Pairs of attribute values the old run covered and the new one misses (and the reverse), by
    :func:`clipengine.coverage.stage.measure_coverage` with the old run as ``against``; None without
    two features of categories both runs have."""
    from clipengine.config import CoverageConfig
    from clipengine.coverage.stage import measure_coverage

    names = [f for f in features if f in old.frame.columns and f in new.frame.columns]
    if len(names) < 2:
        return None
    settings = CoverageConfig(t=COVERAGE_T, max_levels=config.max_levels, limit=COVERAGE_LIMIT, progress=False)
    try:
        result = measure_coverage(new.frame, config=settings, features=names, against=old.frame,
                                  against_source="the baseline")
    except ClipengineError as error:  # e.g. a feature with too many values to count combinations of
        return {"t": COVERAGE_T, "skipped": str(error)}
    differences = result.differences(COVERAGE_LIMIT)
    return {"t": COVERAGE_T, "features": names, "per_t": differences["coverage"],
            "newly_missing": differences["other_not_this"], "newly_covered": differences["this_not_other"]}


def _changed_items(new_frame: pl.DataFrame, old_errors: np.ndarray, new_errors: np.ndarray, new_rows: np.ndarray):
    """The matched items whose error changed (``old_errors``/``new_errors``: ``(P,)`` of the pairs, in the
    new run's order) as a frame — key columns, both errors, ``change`` (newly failing: 0 → > 0; fixed:
    > 0 → 0; else changed) — and their counts with the first newly failing items' keys."""
    changed = old_errors != new_errors
    failing = (old_errors == 0) & (new_errors > 0)
    fixed = (old_errors > 0) & (new_errors == 0)
    keys = [c for c in artifacts.KEY_COLUMNS if c in new_frame.columns]
    items = new_frame[new_rows[changed]].select(keys).with_columns(
        pl.Series("old_error", old_errors[changed]), pl.Series("new_error", new_errors[changed]),
        pl.Series("change", np.where(failing[changed], "newly failing", np.where(fixed[changed], "fixed", "changed"))),
    )
    examples = items.filter(pl.col("change") == "newly failing").head(ITEM_EXAMPLES).select(keys).to_dicts()
    return items, {"newly_failing": int(failing.sum()), "fixed": int(fixed.sum()), "changed": int(changed.sum()),
                   "newly_failing_examples": examples}


def _run_facts(side: RunSide, errors: np.ndarray) -> dict:
    labelling = side.labelling
    return {"run": side.name, "items": int(side.frame.height), "error_mean": _num(errors.mean()) if errors.size else None,
            "model_id": labelling.get("model_id"), "schema": labelling.get("schema"),
            "schema_hash": labelling.get("schema_hash"), "reported_slices": len(side.slices),
            "candidates_evaluated": side.n_evaluated, "digest": side.digest}


def _family_facts(family: list[SliceDefinition], records: list[dict], skipped, change: dict) -> dict:
    return {"slices": len(family), "level_one": sum(m.level_one for m in family),
            "reported_old": sum(m.reported_old is not None for m in family),
            "reported_new": sum(m.reported_new is not None for m in family),
            "change_search": change,
            "tested": sum(r["p_value"] is not None for r in records),
            "features_without_level_one": skipped}


def selection_factor(member: SliceDefinition, old: RunSide, new: RunSide) -> int:
    """What a member's p-value is multiplied by for the way it came into the family: 1 for level-1 and
    change-search slices; else the number of candidates the search(es) that reported it evaluated."""
    if not member.chosen_by_errors_of_one_run:
        return 1
    factor = (old.n_evaluated if member.reported_old else 0) + (new.n_evaluated if member.reported_new else 0)
    return max(1, factor)


def change_search(old: RunSide, new: RunSide, old_rows: np.ndarray, new_rows: np.ndarray,
                  definitions: Mapping[str, FeatureDefinition], config: CompareConfig):
    """SliceLine over the items both runs hold, on how much each item's error changed
    (``|new − old|``, the new run's feature values, the family's bins): ``(records, frame, facts)``;
    no records when nothing changed or too few items are shared."""
    from clipengine.slices.find import find_slices

    change = np.abs(_errors(new.frame)[new_rows] - _errors(old.frame)[old_rows])
    facts = {"items": int(change.size), "changed": int(np.count_nonzero(change)), "slices": 0, "candidates": 0}
    features = list(definitions)
    if not features or change.size < config.min_shared or not np.any(change > 0):
        return [], None, facts
    frame = new.frame[new_rows].select(features).with_columns(pl.Series(CHANGE_COLUMN, change))
    bins = {name: list(d.edges) for name, d in definitions.items() if d.binned and d.edges}
    try:
        result = find_slices(frame, error=CHANGE_COLUMN, features=features, k=config.k, max_level=config.max_level,
                             bins=bins or DEFAULT_BINS, max_q=None, max_levels=config.max_levels)
    except ClipengineError as error:  # e.g. every feature single-valued among the shared items
        facts["skipped"] = str(error)
        return [], None, facts
    facts.update(slices=len(result), candidates=result.n_evaluated)
    return result.to_records(), frame, facts


def _compare_slices(family, old_masks: _Masks, new_masks: _Masks, old_errors, new_errors, old_rows, new_rows, *,
                    binary: bool, config: CompareConfig, old: RunSide, new: RunSide) -> list[dict]:
    count = len(family)
    sums = {name: np.zeros(count) for name in SliceSums.__dataclass_fields__}
    flipped_up, flipped_down = np.zeros(count, np.int64), np.zeros(count, np.int64)
    paired_old, paired_new = old_errors[old_rows], new_errors[new_rows]
    # the same items in the same order in both runs (a new model on the same data): no gathers
    aligned = (old_rows.size == old_errors.size == new_errors.size and np.array_equal(old_rows, new_rows)
               and np.array_equal(old_rows, np.arange(old_rows.size)))
    for i, member in enumerate(family):
        in_old, in_new = old_masks.of(member), new_masks.of(member)
        e1, e2 = old_errors[in_old], new_errors[in_new]
        both = in_old & in_new if aligned else in_old[old_rows] & in_new[new_rows]
        a, b = paired_old[both], paired_new[both]
        for name, value in (("n_old", e1.size), ("sum_old", e1.sum()), ("sq_old", np.dot(e1, e1)),
                            ("n_new", e2.size), ("sum_new", e2.sum()), ("sq_new", np.dot(e2, e2)),
                            ("n_matched", a.size), ("matched_old", a.sum()), ("matched_new", b.sum()),
                            ("matched_sq_old", np.dot(a, a)), ("matched_sq_new", np.dot(b, b)),
                            ("matched_cross", np.dot(a, b))):
            sums[name][i] = value
        flipped_up[i] = int(np.count_nonzero((a == 0) & (b > 0)))
        flipped_down[i] = int(np.count_nonzero((a > 0) & (b == 0)))
    s = SliceSums(**sums)
    in_both = (s.n_old > 0) & (s.n_new > 0)
    only_new = (s.n_old == 0) & (s.n_new > 0)
    diff = np.full(count, np.nan)
    low, high, p = diff.copy(), diff.copy(), diff.copy()
    tests: list[str | None] = [None] * count
    if in_both.any():
        picked = SliceSums(**{k: v[in_both] for k, v in sums.items()})
        result = compare_means(picked, binary=binary)
        diff[in_both], low[in_both], high[in_both], p[in_both] = result.diff, result.ci_low, result.ci_high, result.p_value
        for j, name in zip(np.flatnonzero(in_both), result.test):
            tests[j] = name
    if only_new.any():
        # a group the old run never had: is it weaker than the rest of the new run?
        n_total, e_total, q_total = new_errors.size, new_errors.sum(), np.dot(new_errors, new_errors)
        rest = SliceSums.unpaired(n_total - s.n_new[only_new], e_total - s.sum_new[only_new], q_total - s.sq_new[only_new],
                                  s.n_new[only_new], s.sum_new[only_new], s.sq_new[only_new])
        usable = rest.n_old > 0
        if usable.any():
            picked = SliceSums(**{k: v[usable] for k, v in rest.__dict__.items()})
            result = compare_means(picked, binary=binary)
            rows = np.flatnonzero(only_new)[usable]
            diff[rows], low[rows], high[rows], p[rows] = result.diff, result.ci_low, result.ci_high, result.p_value
            for j, name in zip(rows, result.test):
                tests[j] = f"{name} vs rest of new run"
    tested = np.isfinite(p)
    factors = np.array([selection_factor(member, old, new) for member in family], np.float64)
    q = np.full(count, np.nan)
    if tested.any():
        q[tested] = benjamini_hochberg(np.minimum(1.0, p[tested] * factors[tested]))
    old_low, old_high = slice_intervals(s.n_old, s.sum_old, s.sq_old, binary=binary)
    new_low, new_high = slice_intervals(s.n_new, s.sum_new, s.sq_new, binary=binary)
    records = []
    for i, member in enumerate(family):
        n_old, n_new = int(s.n_old[i]), int(s.n_new[i])
        if n_old == 0 and n_new == 0:
            continue
        status = _status(n_old, n_new, q[i], diff[i], config)
        significant = bool(np.isfinite(q[i]) and q[i] <= config.max_q and abs(diff[i]) >= config.min_diff)
        finding = status in ("worse", "better") or (status == "new" and significant and diff[i] > 0)
        record = {
            "predicates": dict(member.predicates),
            "bounds": {f: [_num(lo), _num(hi)] for f, (lo, hi) in member.bounds.items()},
            "status": status,
            "old_size": n_old,
            "new_size": n_new,
            "old_error_mean": _num(s.sum_old[i] / n_old) if n_old else None,
            "new_error_mean": _num(s.sum_new[i] / n_new) if n_new else None,
            "diff": _num(diff[i]),
            "ci_low": _num(low[i]),
            "ci_high": _num(high[i]),
            "p_value": _num(p[i]),
            "q_value": _num(q[i]),
            "test": tests[i],
            "finding": finding,
            "old_ci": [_num(old_low[i]), _num(old_high[i])] if n_old else None,
            "new_ci": [_num(new_low[i]), _num(new_high[i])] if n_new else None,
            "matched": int(s.n_matched[i]),
            "newly_failing": int(flipped_up[i]),
            "fixed": int(flipped_down[i]),
            "reported": {"old": member.reported_old, "new": member.reported_new},
            "change_search": member.found_by_change,
            "level_one": member.level_one,
            "selection": int(factors[i]),
        }
        if member.snapped:
            record["snapped"] = member.snapped
        records.append(record)
    order = {status: i for i, status in enumerate(STATUSES)}
    records.sort(key=lambda r: (order[r["status"]], not r["finding"],
                                r["q_value"] if r["q_value"] is not None else 2.0, -abs(r["diff"] or 0.0)))
    return records


def _status(n_old: int, n_new: int, q: float, diff: float, config: CompareConfig) -> str:
    if n_new == 0:
        return "gone"
    if n_old == 0:
        return "new"
    if math.isfinite(q) and q <= config.max_q and abs(diff) >= config.min_diff and diff != 0:
        return "worse" if diff > 0 else "better"
    return "unchanged"


def _drift_tables(family: list[SliceDefinition], level_keys: Mapping[str, list[tuple]],
                  old_masks: _Masks, new_masks: _Masks) -> list[tuple[str, list, np.ndarray, np.ndarray]]:
    """Per compared feature: its level-1 slices' labels (in level order) and their counts in both runs."""
    members = {m.key: m for m in family}
    tables = []
    for name, keys in level_keys.items():
        levels = [members[key] for key in keys]
        if not levels:
            continue
        old_counts = np.array([int(old_masks.of(m).sum()) for m in levels], np.int64)
        new_counts = np.array([int(new_masks.of(m).sum()) for m in levels], np.int64)
        tables.append((name, [m.predicates[name] for m in levels], old_counts, new_counts))
    return tables


def _drift_records(drifts: list[Drift], config: CompareConfig) -> list[dict]:
    records = []
    for drift in drifts:
        finding = drift.q_value <= config.max_q and drift.psi >= config.min_psi
        old_total, new_total = max(int(drift.old_counts.sum()), 1), max(int(drift.new_counts.sum()), 1)
        records.append({
            "attribute": drift.attribute,
            "status": "drifted" if finding else "stable",
            "p_value": _num(drift.p_value),
            "q_value": _num(drift.q_value),
            "psi": _num(drift.psi),
            "chi2": _num(drift.statistic),
            "dof": drift.dof,
            "finding": bool(finding),
            "levels": [{"level": level, "old_count": int(a), "new_count": int(b), "old_share": a / old_total,
                        "new_share": b / new_total}
                       for level, a, b in zip(drift.levels, drift.old_counts, drift.new_counts)],
        })
    records.sort(key=lambda r: (not r["finding"], r["q_value"] if r["q_value"] is not None else 2.0, -(r["psi"] or 0.0)))
    return records


def compare_runs(old_dir: str | Path, new_dir: str | Path, config: CompareConfig | None = None) -> Comparison:
    """Read two run directories and compare them (:func:`compare_sides`)."""
    return compare_sides(read_side(old_dir), read_side(new_dir), config)


def write_comparison(out_dir: str | Path, comparison: Comparison) -> tuple[Path, Path]:
    """``compare.json`` and ``compare_items.parquet`` in ``out_dir`` (:func:`clipengine.artifacts.write_comparison`)."""
    return artifacts.write_comparison(out_dir, comparison.to_dict(), comparison.items)
