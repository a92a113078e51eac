"""How good each attribute's labels are, measured on a labelled sample, with 95 % intervals.

For every attribute a labels file labels, and for each labeller — ``zero_shot`` (the schema's text
classifier) and, where annotate adapted the attribute, ``adapted`` (the served classifier, judged
only on items it was not fitted on: the out-of-fold labels recorded by annotate) — per class:
precision P(true = c | labelled c), recall P(labelled c | true = c) and F1, and per attribute the
accuracy, each with a 95 % interval.

Estimates weight each labelled item by its inverse inclusion probability (Horvitz–Thompson; a
uniform sample weighs all alike). A proportion's interval is Wilson's score interval at the Kish
effective sample size ``(Σw)² / Σw²`` (which is n for a uniform sample, where the interval is exactly
Wilson's). A class the sample never saw labelled has precision interval [0, 1].

An attribute is **reliable** when, for the labeller that served it, every class it assigns to some
item of the run has a precision interval starting at ``min_precision`` or above; otherwise it is
marked unreliable, with the class and interval that made it so.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from clipengine import artifacts
from clipengine.config import DEFAULT_MIN_PRECISION
from clipengine.errors import ClipengineError

CONFIDENCE = 0.95
ALL_CLASSES = "(all)"
ZERO_SHOT = "zero_shot"
ADAPTED = "adapted"
LABELLERS = (ZERO_SHOT, ADAPTED)
METRICS = ("precision", "recall", "accuracy")


def weighted_wilson(hits: np.ndarray, weights: np.ndarray, confidence: float = CONFIDENCE
                    ) -> tuple[float, float, float]:
    """``(estimate, low, high)`` of the weighted share of ``hits`` (n,) bool: Σw·hit / Σw with Wilson's
    interval at the Kish effective size; (nan, 0, 1) for no item."""
    hits = np.asarray(hits, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    total = weights.sum()
    if hits.size == 0 or total <= 0:
        return math.nan, 0.0, 1.0
    p = float(np.sum(weights * hits) / total)
    n = float(total * total / np.sum(weights * weights))
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if p <= 0 else max(0.0, centre - half)
    high = 1.0 if p >= 1 else min(1.0, centre + half)
    return p, low, high


@dataclass
class AttributeReliability:
    """One attribute's labelled items: ``truth`` and each labeller's ``predictions`` (n,) class indices."""

    attribute: str
    classes: tuple[str, ...]
    truth: np.ndarray
    weights: np.ndarray
    predictions: dict[str, np.ndarray]  # labeller -> (n,) int64
    served: str  # zero-shot, prototype, gda or tip
    assigned: np.ndarray  # (C,) bool: classes the served labeller gives some item of the run
    adaptation: dict = field(default_factory=dict)
    min_precision: float = DEFAULT_MIN_PRECISION

    @property
    def n(self) -> int:
        return int(len(self.truth))

    @property
    def served_labeller(self) -> str:
        return ADAPTED if ADAPTED in self.predictions else ZERO_SHOT

    def accuracy(self, labeller: str) -> tuple[float, float, float]:
        return weighted_wilson(self.predictions[labeller] == self.truth, self.weights)

    def precision(self, labeller: str, c: int) -> tuple[float, float, float]:
        chosen = self.predictions[labeller] == c
        return weighted_wilson(self.truth[chosen] == c, self.weights[chosen])

    def recall(self, labeller: str, c: int) -> tuple[float, float, float]:
        actual = self.truth == c
        return weighted_wilson(self.predictions[labeller][actual] == c, self.weights[actual])

    def share(self, c: int) -> float:
        return float(self.weights[self.truth == c].sum() / self.weights.sum())

    def judgement(self) -> tuple[bool, str]:
        """(reliable, why) for the served labeller."""
        labeller = self.served_labeller
        poor = []
        for c, name in enumerate(self.classes):
            if not self.assigned[c]:
                continue
            estimate, low, high = self.precision(labeller, c)
            if low < self.min_precision:
                shown = "not measured (no labelled item got it)" if math.isnan(estimate) else \
                    f"{estimate:.2f} ({low:.2f}–{high:.2f})"
                poor.append(f"precision of {name!r} {shown}")
        if poor:
            return False, "; ".join(poor) + f": 95 % interval starts below {self.min_precision:g}"
        return True, f"every assigned class's precision interval starts at {self.min_precision:g} or above"


@dataclass
class ReliabilityReport:
    """Reliability of every labelled attribute (schema order)."""

    attributes: list[AttributeReliability]
    labels_file: str
    n_items: int
    min_precision: float = DEFAULT_MIN_PRECISION

    def get(self, attribute: str) -> AttributeReliability:
        for item in self.attributes:
            if item.attribute == attribute:
                return item
        raise KeyError(attribute)

    def to_polars(self) -> pl.DataFrame:
        """One ``(all)`` row per attribute (accuracy, reliable, why) and one row per class (precision,
        recall, F1), each metric with ``_low``/``_high`` per labeller."""
        rows = []
        for item in self.attributes:
            reliable, why = item.judgement()
            overall = {"attribute": item.attribute, "class": ALL_CLASSES, "labelled": item.n, "share": 1.0,
                       "served": item.served, "reliable": "yes" if reliable else "no", "reason": why,
                       "cv_accuracy": item.adaptation.get("cv_accuracy")}
            for labeller in LABELLERS:
                if labeller in item.predictions:
                    estimate, low, high = item.accuracy(labeller)
                    overall.update(_metric(labeller, "accuracy", estimate, low, high))
                    overall[f"{labeller}_predicted"] = item.n
            rows.append(overall)
            for c, name in enumerate(item.classes):
                row = {"attribute": item.attribute, "class": name, "labelled": int((item.truth == c).sum()),
                       "share": item.share(c), "served": item.served, "reliable": None, "reason": None,
                       "cv_accuracy": None}
                for labeller in LABELLERS:
                    if labeller not in item.predictions:
                        continue
                    precision = item.precision(labeller, c)
                    recall = item.recall(labeller, c)
                    row.update(_metric(labeller, "precision", *precision))
                    row.update(_metric(labeller, "recall", *recall))
                    row[f"{labeller}_predicted"] = int((item.predictions[labeller] == c).sum())
                    p, r = precision[0], recall[0]
                    row[f"{labeller}_f1"] = None if math.isnan(p) or math.isnan(r) else (
                        0.0 if p + r == 0 else 2 * p * r / (p + r))
                    if labeller == item.served_labeller and item.assigned[c]:
                        row["reliable"] = "yes" if precision[1] >= self.min_precision else "no"
                rows.append(row)
        schema = {"attribute": pl.String, "class": pl.String, "labelled": pl.Int64, "share": pl.Float64,
                  "served": pl.String, "reliable": pl.String, "reason": pl.String, "cv_accuracy": pl.Float64}
        for labeller in LABELLERS:
            schema[f"{labeller}_predicted"] = pl.Int64
            for metric in METRICS:
                schema.update({f"{labeller}_{metric}": pl.Float64, f"{labeller}_{metric}_low": pl.Float64,
                               f"{labeller}_{metric}_high": pl.Float64})
            schema[f"{labeller}_f1"] = pl.Float64
        return pl.DataFrame([{k: _clean(row.get(k)) for k in schema} for row in rows], schema=schema, orient="row")

    def to_markdown(self) -> str:
        lines = ["# Label reliability (from a labelled sample)", "",
                 f"{self.n_items} labelled items from {self.labels_file}; 95 % intervals (Wilson, weighted by "
                 f"inverse inclusion probabilities); adapted labels judged on items they were not fitted on. "
                 f"An attribute is reliable when every class it assigns has a precision interval starting at "
                 f"{self.min_precision:g} or above.", "",
                 "| attribute | labels | served | accuracy (95 % interval) | zero-shot accuracy | reliable |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for item in self.attributes:
            reliable, _ = item.judgement()
            served = item.accuracy(item.served_labeller)
            zero = item.accuracy(ZERO_SHOT) if ZERO_SHOT in item.predictions else None
            lines.append(f"| {item.attribute} | {item.n} | {item.served} | {_interval(*served)} | "
                         f"{_interval(*zero) if zero else '–'} | {'yes' if reliable else '**no**'} |")
        for item in self.attributes:
            reliable, why = item.judgement()
            lines += ["", f"## {item.attribute}", "", f"served: {item.served}"
                      + (f" ({item.adaptation.get('reason')})" if item.adaptation.get("reason") else "") + "; "
                      + ("reliable" if reliable else "**unreliable**") + f": {why}.", ""]
            labellers = [lab for lab in LABELLERS if lab in item.predictions]
            lines.append("| class | labelled | " + " | ".join(f"{lab} precision | {lab} recall" for lab in labellers)
                         + " |")
            lines.append("|" + " --- |" * (2 + 2 * len(labellers)))
            for c, name in enumerate(item.classes):
                cells = [f"{_interval(*item.precision(lab, c))} | {_interval(*item.recall(lab, c))}"
                         for lab in labellers]
                lines.append(f"| {name} | {int((item.truth == c).sum())} | " + " | ".join(cells) + " |")
        return "\n".join(lines).rstrip() + "\n"


def _metric(labeller: str, metric: str, estimate: float, low: float, high: float) -> dict:
    return {f"{labeller}_{metric}": estimate, f"{labeller}_{metric}_low": low, f"{labeller}_{metric}_high": high}


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _interval(estimate: float, low: float, high: float) -> str:
    if math.isnan(estimate):
        return "–"
    return f"{estimate:.3f} ({low:.3f}–{high:.3f})"


# ---- from a metadata file and a labels file ------------------------------------------------------
def evaluate_labels(metadata_path: str | os.PathLike, labels_path: str | os.PathLike, *,
                    min_precision: float = DEFAULT_MIN_PRECISION) -> ReliabilityReport:
    """Measure ``metadata_path``'s labels (``metadata.parquet``) on the labelled sample ``labels_path``.

    Per labelled item and attribute, the label each labeller gave it without having seen it: the
    out-of-fold labels annotate recorded for the items it adapted on, else the file's own label
    (which must be the model's: ``<attr>_source`` not ``human``)."""
    import json

    from clipengine.annotate.labels import read_labels

    metadata_path = Path(metadata_path)
    metadata = artifacts.read_parquet_file(metadata_path)
    meta = artifacts.read_parquet_metadata(metadata_path)
    if artifacts.META_SCHEMA_CONTENT not in meta:
        raise ClipengineError(f"{metadata_path}: records no schema; write it with `clipengine annotate`")
    schema = json.loads(meta[artifacts.META_SCHEMA_CONTENT])
    classes = {a["name"]: tuple(c["name"] for c in a["classes"]) for a in schema["attributes"]}
    labels = read_labels(labels_path, artifacts.key_columns(metadata), classes)
    adaptation, _, checks = artifacts.read_adaptation(metadata_path)
    checks = checks or {}
    out = []
    for name, names in classes.items():
        if name not in labels.truth:
            continue
        labelled = labels.labelled(name)
        if not labelled.any():
            continue
        index = {c: i for i, c in enumerate(names)}
        rows = labels.rows[labelled]
        truth = np.asarray([index[v] for v in labels.truth[name][labelled]], np.int64)
        weights = labels.weights()[labelled]
        column = metadata.get_column(name).to_list()
        source = metadata.get_column(name + artifacts.SOURCE_SUFFIX).to_list() \
            if name + artifacts.SOURCE_SUFFIX in metadata.columns else None
        record = adaptation.get(name, {})
        adapted = record.get("method") not in (None, "zero-shot")
        check = checks.get(name, {})
        at = {int(r): i for i, r in enumerate(check.get("rows", []))}
        served, zero_shot = [], []
        for row in rows.tolist():
            if row in at:
                served.append(index[check["served"][at[row]]])
                zero_shot.append(index[check["zero_shot"][at[row]]])
                continue
            if source is not None and source[row] == artifacts.SOURCE_HUMAN:
                key = artifacts.item_keys(metadata[row:row + 1])[0].split("\t")[0]
                raise ClipengineError(f"{metadata_path}: the labelled item {key!r} holds a person's label for {name!r} "
                                      "but no model label was recorded for it; annotate again with these labels")
            served.append(index[column[row]])
            zero_shot.append(None if adapted else index[column[row]])
        predictions = {ADAPTED if adapted else ZERO_SHOT: np.asarray(served, np.int64)}
        if adapted and all(z is not None for z in zero_shot):
            predictions[ZERO_SHOT] = np.asarray(zero_shot, np.int64)
        model_rows = [v for v, s in zip(column, source or [artifacts.SOURCE_MODEL] * len(column))
                      if s != artifacts.SOURCE_HUMAN]
        assigned = np.asarray([c in set(model_rows) for c in names]) | np.isin(np.arange(len(names)),
                                                                               predictions[ADAPTED if adapted else
                                                                                           ZERO_SHOT])
        out.append(AttributeReliability(
            attribute=name, classes=names, truth=truth, weights=weights, predictions=predictions,
            served=record.get("method", "zero-shot"), assigned=assigned, adaptation=record,
            min_precision=min_precision))
    if not out:
        raise ClipengineError(f"{labels_path}: labels none of the attributes of {metadata_path}")
    return ReliabilityReport(out, str(labels_path), int(len(labels.rows)), min_precision)
