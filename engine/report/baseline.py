"""The report's "since the baseline" section, from ``compare.json`` and ``compare_items.parquet``.

Slices that got worse or better (both runs' rates with their intervals, the change with its
interval, q-value), new weak slices, drifted attributes, what was not compared and why, and
example items that turned from correct into errors, as thumbnails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clipengine.report.rundir import RunData, finite_or_none

EXAMPLES = 12  # items that turned into errors shown as thumbnails
LEVEL_SHIFTS = 3  # levels listed per drifted attribute (largest share changes)


@dataclass
class ChangeRow:
    """One compared slice as shown."""

    predicates: list[tuple[str, str]]
    status: str
    old_size: int
    new_size: int
    old_rate: float | None
    new_rate: float | None
    old_ci: tuple[float | None, float | None]
    new_ci: tuple[float | None, float | None]
    diff: float | None
    ci_low: float | None
    ci_high: float | None
    q_value: float | None
    newly_failing: int
    fixed: int
    found: str  # where the slice came from, in words


@dataclass
class DriftRow:
    attribute: str
    psi: float | None
    q_value: float | None
    drifted: bool
    shifts: list[tuple[str, float, float]] = field(default_factory=list)  # (level, old share, new share)


def _label(value: Any) -> str:
    return "null" if value is None else str(value)


def _found(record: dict) -> str:
    reported = record.get("reported") or {}
    parts = []
    if reported.get("old"):
        parts.append(f"baseline's #{reported['old']}")
    if reported.get("new"):
        parts.append(f"this run's #{reported['new']}")
    if record.get("change_search"):
        parts.append("change search")
    if record.get("level_one"):
        parts.append("attribute value")
    return ", ".join(parts)


def _pair(values) -> tuple[float | None, float | None]:
    if not isinstance(values, (list, tuple)) or len(values) != 2:
        return None, None
    return finite_or_none(values[0]), finite_or_none(values[1])


def change_rows(records: list[dict], statuses: tuple[str, ...]) -> list[ChangeRow]:
    rows = []
    for record in records:
        if record.get("status") not in statuses or not record.get("finding"):
            continue
        predicates = record.get("predicates") if isinstance(record.get("predicates"), dict) else {}
        rows.append(ChangeRow(
            predicates=[(str(k), _label(v)) for k, v in predicates.items()],
            status=str(record.get("status")),
            old_size=int(record.get("old_size") or 0),
            new_size=int(record.get("new_size") or 0),
            old_rate=finite_or_none(record.get("old_error_mean")),
            new_rate=finite_or_none(record.get("new_error_mean")),
            old_ci=_pair(record.get("old_ci")),
            new_ci=_pair(record.get("new_ci")),
            diff=finite_or_none(record.get("diff")),
            ci_low=finite_or_none(record.get("ci_low")),
            ci_high=finite_or_none(record.get("ci_high")),
            q_value=finite_or_none(record.get("q_value")),
            newly_failing=int(record.get("newly_failing") or 0),
            fixed=int(record.get("fixed") or 0),
            found=_found(record),
        ))
    return rows


def drift_rows(records: list[dict]) -> list[DriftRow]:
    rows = []
    for record in records:
        levels = [level for level in record.get("levels") or [] if isinstance(level, dict)]
        shifts = sorted(((_label(level.get("level")), float(level.get("old_share") or 0.0),
                          float(level.get("new_share") or 0.0)) for level in levels),
                        key=lambda s: -abs(s[2] - s[1]))[:LEVEL_SHIFTS]
        rows.append(DriftRow(str(record.get("attribute")), finite_or_none(record.get("psi")),
                             finite_or_none(record.get("q_value")), bool(record.get("finding")), shifts))
    return rows


def newly_failing_rows(run: RunData, worse_records: list[dict], limit: int = EXAMPLES) -> list[int]:
    """Rows of ``run.frame`` that turned from correct into errors, those inside more worse slices first."""
    import numpy as np
    import polars as pl

    from clipengine.slices.coding import predicate_mask

    items = run.comparison_items
    if items is None or items.height == 0 or "change" not in items.columns:
        return []
    failing = items.filter(pl.col("change") == "newly failing")
    if failing.height == 0:
        return []
    frame = run.frame
    with_box = "box" in failing.columns

    def keys(table):
        key = pl.col("path").cast(pl.String)
        if with_box:
            box = pl.col("box").cast(pl.List(pl.Float64)).list.eval(pl.element().cast(pl.String)).list.join(",")
            key = pl.concat_str([key, pl.lit("\x1f"), box.fill_null("")])
        return table.select(key.alias("__key"))

    wanted = set(keys(failing).get_column("__key").to_list())
    in_frame = keys(frame).get_column("__key").is_in(list(wanted)).to_numpy()
    rows = np.flatnonzero(in_frame)
    if rows.size == 0:
        return []
    weight = np.zeros(frame.height, np.int64)
    for record in worse_records:
        predicates = record.get("predicates") if isinstance(record.get("predicates"), dict) else {}
        bounds = record.get("bounds") if isinstance(record.get("bounds"), dict) else {}
        try:
            weight += predicate_mask(frame, predicates, bounds)
        except KeyError:  # a feature the page's table lacks: that slice adds no weight
            continue
    order = rows[np.argsort(-weight[rows], kind="stable")]
    return [int(r) for r in order[:limit]]


def baseline_section(run: RunData, thumbs) -> dict[str, Any] | None:
    """The section's context for the template, or None when the run has no (current) comparison."""
    from clipengine.report.charts import change_chart

    document = run.comparison
    if document is None:
        return None
    records = [r for r in document.get("slices") or [] if isinstance(r, dict)]
    binary = bool(document.get("binary_errors", True))
    worse = change_rows(records, ("worse",))
    better = change_rows(records, ("better",))
    new = change_rows(records, ("new",))
    drift = drift_rows([r for r in document.get("drift") or [] if isinstance(r, dict)])
    chart = None
    changed = worse + better
    if changed:
        chart = change_chart(
            [" & ".join(f"{f} = {v}" for f, v in row.predicates) for row in changed],
            [(row.old_rate, *row.old_ci) for row in changed],
            [(row.new_rate, *row.new_ci) for row in changed],
            [row.status == "worse" for row in changed],
            xlabel="error rate (95 % interval)" if binary else "mean error (95 % interval)",
            salt="baseline",
        )
    worse_records = [r for r in records if r.get("status") == "worse" and r.get("finding")]
    examples = [thumbs.example(row, inside=True) for row in newly_failing_rows(run, worse_records)]
    old = document.get("old") if isinstance(document.get("old"), dict) else {}
    new_run = document.get("new") if isinstance(document.get("new"), dict) else {}
    items = document.get("items") if isinstance(document.get("items"), dict) else {}
    settings = document.get("settings") if isinstance(document.get("settings"), dict) else {}
    family = document.get("family") if isinstance(document.get("family"), dict) else {}
    return {
        "baseline": str(old.get("run") or "?"),
        "old_items": old.get("items"),
        "new_items": new_run.get("items"),
        "old_rate": finite_or_none(old.get("error_mean")),
        "new_rate": finite_or_none(new_run.get("error_mean")),
        "binary": binary,
        "item_counts": items,
        "settings": settings,
        "compared": family.get("tested"),
        "worse": worse,
        "better": better,
        "new": new,
        "gone": sum(1 for r in records if r.get("status") == "gone"),
        "drift": drift,
        "drifted": [row for row in drift if row.drifted],
        "chart": chart,
        "mismatches": [m for m in document.get("mismatches") or [] if isinstance(m, dict)],
        "not_compared": len(document.get("not_compared") or []),
        "examples": examples,
    }
