"""Decision thresholds for binary attributes: fitted on labelled rows (``clipengine eval
--calibrate``), saved as ``thresholds.json``, applied when labelling (``clipengine annotate
--thresholds``).

A binary attribute is labelled positive where P(positive) ≥ its threshold instead of by argmax
(threshold 0.5); the threshold is chosen for balanced accuracy, which helps rare attributes that
zero-shot scores tilt toward the common class.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from clipengine.artifacts import MARGIN_SUFFIX, PROB_SUFFIX
from clipengine.errors import ClipengineError
from clipengine.markdown import escape


@dataclass(frozen=True)
class ThresholdResult:
    """A binary attribute's threshold on P(positive), fitted on one split and measured on the other.

    ``default_*``: the zero-shot argmax (threshold 0.5); ``calibrated_*``: the fitted threshold;
    both on the held-out rows. Balanced accuracy = (recall of positives + recall of negatives) / 2.
    """

    attribute: str
    positive: str
    threshold: float
    n_fit: int
    n_test: int
    default_accuracy: float
    calibrated_accuracy: float
    default_balanced_accuracy: float
    calibrated_balanced_accuracy: float
    default_f1: float
    calibrated_f1: float


def positive_probability(frame: pl.DataFrame, name: str, positive: str) -> np.ndarray:
    """(n,) float64 P(positive class) per row of binary attribute ``name``: its prob if ``positive``
    won, else 1 − prob."""
    won = (frame[name] == positive).to_numpy()
    prob = frame[f"{name}{PROB_SUFFIX}"].to_numpy().astype(np.float64)
    return np.where(won, prob, 1.0 - prob)


def fit_threshold(p_positive: np.ndarray, is_positive: np.ndarray) -> float:
    """The threshold t (predict positive when p ≥ t) with the best balanced accuracy; ties → nearest 0.5."""
    order = np.argsort(-p_positive, kind="stable")
    p, y = p_positive[order], is_positive[order].astype(np.int64)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        return 0.5
    tp = np.cumsum(y)  # predicting the first j+1 rows positive
    fp = np.cumsum(1 - y)
    last_of_run = np.append(p[1:] != p[:-1], True)  # cut only between distinct values
    balanced = (tp / n_pos + (n_neg - fp) / n_neg) / 2.0
    candidates = np.flatnonzero(last_of_run)
    nxt = np.append(p[1:], -np.inf)
    thresholds = np.where(np.isfinite(nxt[candidates]), (p[candidates] + nxt[candidates]) / 2.0, p[candidates])
    scores = np.append(balanced[candidates], 0.5)  # and "never positive" (threshold above every p)
    thresholds = np.append(thresholds, np.nextafter(p[0], np.inf))
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    return float(thresholds[best[np.argmin(np.abs(thresholds[best] - 0.5))]])


def binary_scores(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    tp = float(np.sum(predicted & truth))
    fp = float(np.sum(predicted & ~truth))
    fn = float(np.sum(~predicted & truth))
    tn = float(np.sum(~predicted & ~truth))
    accuracy = (tp + tn) / max(1.0, tp + tn + fp + fn)
    tpr = tp / (tp + fn) if tp + fn else math.nan
    tnr = tn / (tn + fp) if tn + fp else math.nan
    balanced = float(np.nanmean([tpr, tnr])) if np.isfinite([tpr, tnr]).any() else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
    return accuracy, balanced, f1


def thresholds_markdown(results: list[ThresholdResult], strategy: str = "") -> str:
    what = f" ({strategy})" if strategy else ""
    lines = [f"## Threshold calibration{what}", "",
             "Binary attributes: threshold on P(positive) fitted for balanced accuracy on one split, "
             "measured on the held-out split (argmax = threshold 0.5).", "",
             "| attribute | threshold | fit / test rows | accuracy argmax → calibrated | balanced accuracy | F1 (positive) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {escape(r.attribute)} | {r.threshold:.3f} | {r.n_fit} / {r.n_test} | {_fmt(r.default_accuracy)} → "
                     f"{_fmt(r.calibrated_accuracy)} | {_fmt(r.default_balanced_accuracy)} → "
                     f"{_fmt(r.calibrated_balanced_accuracy)} | {_fmt(r.default_f1)} → {_fmt(r.calibrated_f1)} |")
    if not results:
        lines.append("| (no binary attribute with enough ground truth) | | | | | |")
    return "\n".join(lines) + "\n"


def apply_thresholds(frame: pl.DataFrame, thresholds: dict[str, float], schema) -> pl.DataFrame:
    """Relabel binary attributes: positive where P(positive) ≥ its threshold (probs/margins follow)."""
    attributes = {a.name: a for a in schema.attributes}
    out = frame
    for name, threshold in thresholds.items():
        attribute = attributes.get(name)
        if attribute is None or attribute.kind != "binary":
            raise ClipengineError(f"threshold for {name!r}: not a binary attribute of the schema")
        other = next(c for c in attribute.class_names if c != attribute.positive)
        p = positive_probability(frame, name, attribute.positive)
        positive = p >= threshold
        prob = np.where(positive, p, 1.0 - p).astype(np.float32)
        out = out.with_columns(
            pl.Series(name, np.where(positive, attribute.positive, other).tolist(), dtype=pl.String),
            pl.Series(f"{name}{PROB_SUFFIX}", prob),
            pl.Series(f"{name}{MARGIN_SUFFIX}", (2.0 * prob - 1.0).astype(np.float32)),
        )
    return out


def read_thresholds(path: str | os.PathLike, schema) -> dict[str, float]:
    """{attribute: threshold} from a ``thresholds.json`` written by ``clipengine eval --calibrate``:
    the entry of ``schema``'s own strategy, or the only entry."""
    path = Path(path)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClipengineError(f"{path}: thresholds file not found") from None
    except ValueError as error:
        raise ClipengineError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(saved, dict) or not saved:
        raise ClipengineError(f"{path}: expected {{strategy: [{{attribute, threshold, ...}}]}}")
    own = schema.strategy_name
    if own in saved:
        entries = saved[own]
    elif len(saved) == 1:
        entries = next(iter(saved.values()))
    else:
        raise ClipengineError(f"{path}: no thresholds for strategy {own!r} (has {', '.join(saved)})")
    try:
        return {str(e["attribute"]): float(e["threshold"]) for e in entries}
    except (TypeError, KeyError, ValueError):
        raise ClipengineError(f"{path}: each entry needs 'attribute' and 'threshold'") from None


def _fmt(value) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.3f}"
