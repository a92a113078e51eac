"""Plain sentences about a slices.json: which multiple-testing family, which labels corrected it.

Shared by ``summary.md`` (:mod:`clipengine.run.summary`) and the report (:mod:`clipengine.report`),
so that both say the same thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "–"


def family_text(summary: dict) -> str | None:
    """One sentence on the family and where the error rates come from, from slices.json's run-level part."""
    family = summary.get("family") if isinstance(summary.get("family"), dict) else {}
    confidence = summary.get("confidence")
    if family.get("design") == "split":
        return (f"SliceLine searched {_count(family.get('search_rows'))} items drawn at random; each slice it found "
                f"was tested and its error rate estimated on the {_count(family.get('test_rows'))} held-out items "
                f"(so the rates are not inflated by the search), Benjamini–Hochberg over those "
                f"{_count(family.get('size'))} slices.")
    if family.get("design") == "lattice":
        level = f"{100 * confidence:.2f} %" if isinstance(confidence, (int, float)) else "an adjusted"
        return (f"Tested on every item; Benjamini–Hochberg over all {_count(family.get('size'))} slices with enough "
                "items (those the search pruned count as not significant). The error rates are those of the slices "
                f"the search picked as worst, so their intervals are at the {level} level (false coverage rate of "
                "the listed slices 5 %).")
    return None


def labels_text(summary: dict) -> str | None:
    """One sentence on the labels file that corrected the slices, or None."""
    labels = summary.get("labels") if isinstance(summary.get("labels"), dict) else None
    if not labels:
        return None
    features = ", ".join(str(f) for f in labels.get("features") or []) or "none of the sliced features"
    return (f"True-group error rates from {_count(labels.get('labelled_items'))} labelled items "
            f"({Path(str(labels.get('source') or 'labels')).name}): predicates on {features} are checked against "
            "the person's labels, every other predicate is taken as exact. A slice is not confirmed when its true "
            "group's interval does not lie above the overall error rate.")
