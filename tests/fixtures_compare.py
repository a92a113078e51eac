"""Two runs to compare, made here: item tables with labelled attributes, errors drawn per item, and
run directories written through the engine's own writers (metadata with its labelling record,
errors, slices found by the real SliceLine)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

ATTRIBUTES = {
    "scene": (["urban", "rural", "indoor"], [0.4, 0.35, 0.25]),
    "tone": (["bright", "dark"], [0.6, 0.4]),
    "weather": (["clear", "rain", "fog", "snow"], [0.5, 0.25, 0.15, 0.10]),
    "time": (["day", "night"], [0.8, 0.2]),
}
FEATURES = [*ATTRIBUTES, "box_height"]  # box_height: a dataset feature, numeric, binned
PLANTED = {"weather": "fog", "time": "night"}  # 0.15 × 0.2 = 3 % of the items
SCHEMA_CONTENT = {"format": 1, "attributes": [
    {"name": name, "kind": "exclusive" if len(values) > 2 else "binary", "positive": None if len(values) > 2 else values[0],
     "strategy": "mean", "top_m": 3, "classes": [{"name": v, "prompts": [f"a photo, {v}"]} for v in values]}
    for name, (values, _) in ATTRIBUTES.items()]}


def make_items(rng: np.random.Generator, n: int, *, prefix: str = "img", weights: dict | None = None) -> pl.DataFrame:
    """``n`` items: ``path``, the four attributes (drawn with their shares, or ``weights[attribute]``
    instead) and ``box_height`` (gamma-distributed pixels)."""
    columns: dict[str, object] = {"path": [f"{prefix}{i:06d}.png" for i in range(n)]}
    for name, (values, shares) in ATTRIBUTES.items():
        columns[name] = rng.choice(values, size=n, p=(weights or {}).get(name, shares))
    columns["box_height"] = rng.gamma(3.0, 40.0, n)
    return pl.DataFrame(columns)


def in_slice(items: pl.DataFrame, predicates: dict) -> np.ndarray:
    mask = np.ones(items.height, bool)
    for name, value in predicates.items():
        mask &= (items.get_column(name) == value).to_numpy()
    return mask


def planted_errors(rng: np.random.Generator, items: pl.DataFrame, *, base: float = 0.1, planted: float = 0.3):
    """``(old, new)`` 0/1 errors that differ only inside :data:`PLANTED`: error rate ``base`` everywhere in
    the old run; in the new run the planted slice's errors are drawn again at ``planted``,
    independently of the old ones (so some of its items also turn correct)."""
    old = (rng.random(items.height) < base).astype(np.float64)
    new = old.copy()
    inside = in_slice(items, PLANTED)
    new[inside] = rng.random(int(inside.sum())) < planted
    return old, new


def weak_slice_rates(items: pl.DataFrame) -> np.ndarray:
    """Per-item error probability: 0.1, and 0.25 for rural dark scenes (a weak slice both runs share)."""
    rates = np.full(items.height, 0.1)
    rates[in_slice(items, {"scene": "rural", "tone": "dark"})] = 0.25
    return rates


def run_side(name: str, items: pl.DataFrame, errors: np.ndarray, *, model_id: str = "tiny-clip-test"):
    """A :class:`~clipengine.compare.stage.RunSide` as a run directory would give it: slices by SliceLine
    (level ≤ 3, k 10, min_sup 1 %) over the items with ``errors``."""
    from clipengine.compare.stage import RunSide
    from clipengine.slices.find import find_slices

    frame = items.with_columns(pl.Series("error", errors))
    result = find_slices(frame, error="error", features=FEATURES, k=10, max_level=3, min_sup=0.01)
    labelling = {"model_id": model_id, "schema": "weather", "schema_hash": "0" * 20,
                 "attributes": {a["name"]: {k: v for k, v in a.items() if k != "name"} for a in SCHEMA_CONTENT["attributes"]},
                 "thresholds": {}}
    return RunSide(name, frame, list(ATTRIBUTES), result.to_records(), result.summary(), labelling)


def write_run_dir(run_dir: Path, items: pl.DataFrame, errors: np.ndarray, *, model_id: str = "tiny-clip-test",
                  schema_content: dict | None = None) -> Path:
    """A run directory with ``metadata.parquet`` (attributes + probabilities + the labelling record),
    ``errors.parquet`` (``path``, ``error``, ``box_height``) and ``slices.json``/``.parquet``."""
    from clipengine import artifacts
    from clipengine.slices.find import find_slices, write_slices

    run_dir.mkdir(parents=True, exist_ok=True)
    labels = items.select("path", *ATTRIBUTES).with_columns(
        [pl.lit(0.9, dtype=pl.Float32).alias(f"{a}_prob") for a in ATTRIBUTES]
        + [pl.lit(0.5, dtype=pl.Float32).alias(f"{a}_margin") for a in ATTRIBUTES])
    record = {artifacts.META_MODEL_ID: model_id, artifacts.META_SCHEMA: "weather",
              artifacts.META_SCHEMA_HASH: "0" * 20, artifacts.META_STRATEGY: json.dumps({a: "mean" for a in ATTRIBUTES}),
              artifacts.META_LOGIT_SCALE: "100.0",
              artifacts.META_SCHEMA_CONTENT: json.dumps(schema_content or SCHEMA_CONTENT)}
    artifacts.write_metadata(run_dir / artifacts.METADATA, labels, record)
    artifacts.write_errors(run_dir, items.select("path", pl.Series("error", errors), "box_height"))
    frame, _, extra = artifacts.read_joined(run_dir)
    result = find_slices(frame, error="error", features=artifacts.joined_features(ATTRIBUTES, extra), k=10,
                         max_level=3, min_sup=0.01, progress=False)
    write_slices(result, run_dir)
    return run_dir
