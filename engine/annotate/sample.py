"""Drawing a labelling sample from a run's items, with inclusion probabilities known by design.

Two designs, both recorded in ``sample.json`` with the seed, so a draw can be checked and repeated:

- **uniform** (the default): a simple random sample without replacement of ``n`` of the ``N``
  items; every item's inclusion probability is ``n / N``.
- **stratified on the margin** (``focus="uncertain"``): the items are split into the
  ``FOCUS_SHARE`` of items whose smallest margin over the sheet's attributes is lowest (ties broken by
  item order) and the rest; ``FOCUS_FRACTION`` of the ``n`` are drawn from the low-margin stratum and
  the others from the rest, each stratum by simple random sampling without replacement (a stratum
  too small to give its share is taken whole and the other gives the remainder). An item's inclusion
  probability is its stratum's ``n_h / N_h``. Low-margin items are over-represented (more to learn
  from), and weighting each labelled item by ``1 / inclusion_prob`` (Horvitz–Thompson) keeps
  estimates over the whole run unbiased.

The sheet (``labels.csv``) lists the drawn items in draw order with their inclusion probability,
the model's label of each attribute and one empty ``true_<attr>`` column per attribute
(:mod:`clipengine.annotate.labels` reads it back). The CSV is written by :func:`sheet_csv`, whose
quoting the labelling page repeats byte for byte.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

import numpy as np
import polars as pl

from clipengine.artifacts import MARGIN_SUFFIX, TRUTH_PREFIX, item_keys
from clipengine.errors import ClipengineError

UNIFORM = "uniform"
STRATIFIED = "stratified"
FOCUS_CHOICES = ("uncertain",)
FOCUS_SHARE = 0.2  # the low-margin stratum: this share of the run's items
FOCUS_FRACTION = 0.5  # of the sample, drawn from the low-margin stratum
SAMPLE_FORMAT = 1


@dataclass(frozen=True)
class Draw:
    """A drawn sample: ``rows`` (n,) int64 item positions in draw order, ``inclusion`` (n,) float64
    their inclusion probabilities, and ``design`` (what ``sample.json`` records)."""

    rows: np.ndarray
    inclusion: np.ndarray
    design: dict


def new_seed() -> int:
    """A fresh seed for a draw the user did not seed (recorded, so the draw can be repeated)."""
    return secrets.randbelow(2**31)


def draw_sample(population: int, n: int, seed: int, *, margins: np.ndarray | None = None) -> Draw:
    """Draw ``n`` of ``population`` items with ``seed``: uniformly, or, given ``margins`` ((N,) float,
    each item's smallest margin), stratified on the margin as the module says."""
    if population < 1:
        raise ClipengineError("the run has no items to sample")
    if n < 1:
        raise ClipengineError(f"--n {n}: draw at least one item")
    n = min(n, population)
    rng = np.random.default_rng(seed)
    if margins is None:
        rows = rng.choice(population, size=n, replace=False).astype(np.int64)
        probability = n / population
        design = {"design": UNIFORM, "strata": [{"name": "all items", "size": population, "drawn": n,
                                                 "inclusion_prob": probability}]}
        return Draw(rows, np.full(n, probability), design)
    if margins.shape != (population,):
        raise ValueError(f"margins must be ({population},), got {margins.shape}")
    order = np.argsort(margins, kind="stable")
    low_size = max(1, int(np.ceil(FOCUS_SHARE * population)))
    low, rest = np.sort(order[:low_size]), np.sort(order[low_size:])
    want_low = int(round(FOCUS_FRACTION * n))
    drawn_low = min(want_low, len(low))
    drawn_rest = min(n - drawn_low, len(rest))
    drawn_low = min(len(low), n - drawn_rest)
    picked, probabilities, strata = [], [], []
    cutoff = float(margins[order[low_size - 1]])
    for name, members, drawn in (("low margin", low, drawn_low), ("other", rest, drawn_rest)):
        if len(members) == 0:
            continue
        chosen = rng.choice(members, size=drawn, replace=False) if drawn else np.empty(0, np.int64)
        probability = drawn / len(members)
        picked.append(chosen)
        probabilities.append(np.full(drawn, probability))
        strata.append({"name": name, "size": int(len(members)), "drawn": int(drawn), "inclusion_prob": probability})
    rows = np.concatenate(picked).astype(np.int64)
    inclusion = np.concatenate(probabilities)
    shuffle = rng.permutation(len(rows))  # one list, strata mixed: the person labelling cannot tell them apart
    design = {"design": STRATIFIED, "focus": "uncertain", "focus_share": FOCUS_SHARE,
              "focus_fraction": FOCUS_FRACTION, "margin_cutoff": cutoff, "strata": strata}
    return Draw(rows[shuffle], inclusion[shuffle], design)


def smallest_margins(metadata, attributes: list[str]) -> np.ndarray:
    """(N,) float64: each item's smallest ``<attr>_margin`` over ``attributes`` (a metadata frame)."""
    columns = [f"{a}{MARGIN_SUFFIX}" for a in attributes]
    missing = [c for c in columns if c not in metadata.columns]
    if missing:
        raise ClipengineError(f"--focus uncertain needs the margins of the labels; the metadata has no {missing[0]!r}")
    return metadata.select(columns).to_numpy().astype(np.float64).min(axis=1)


# ---- the sheet -----------------------------------------------------------------------------------
def sheet_header(attributes: list[str], *, has_box: bool) -> list[str]:
    """``path`` [, ``box``], ``inclusion_prob``, the predicted ``<attr>`` then ``true_<attr>`` columns."""
    from clipengine.annotate.labels import INCLUSION_COLUMN

    return ["path", *(["box"] if has_box else []), INCLUSION_COLUMN, *attributes,
            *(TRUTH_PREFIX + a for a in attributes)]


def sheet_rows(items, metadata, draw: Draw, attributes: list[str]) -> list[list[str]]:
    """The sheet's rows as text: the drawn items (``items``: the run's items; ``metadata``: its
    labels, same rows) with their inclusion probability, predicted labels and empty truth cells."""
    has_box = "box" in items.columns
    paths = items.get_column("path").cast(pl.String).to_list()
    boxes = items.get_column("box").to_list() if has_box else None
    predicted = {a: metadata.get_column(a).cast(pl.String).to_list() for a in attributes}
    rows = []
    for row, probability in zip(draw.rows.tolist(), draw.inclusion.tolist()):
        box = [json.dumps([float(v) for v in boxes[row]])] if has_box and boxes[row] is not None else (
            [""] if has_box else [])
        rows.append([paths[row], *box, repr(float(probability)),
                     *(predicted[a][row] or "" for a in attributes), *("" for _ in attributes)])
    return rows


def csv_field(text: str) -> str:
    """One CSV field: quoted (quotes doubled) when it holds a comma, a quote or a line break."""
    if any(ch in text for ch in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def sheet_csv(header: list[str], rows: list[list[str]]) -> str:
    """The sheet as CSV text (``\\n`` line ends); the labelling page writes its download the same way."""
    return "".join(",".join(csv_field(field) for field in line) + "\n" for line in [header, *rows])


def sample_record(draw: Draw, *, seed: int, population: int, items, attributes: list[str], run: str,
                  model_id: str, schema: dict) -> dict:
    """``sample.json``: the draw with everything needed to check or repeat it."""
    keys = item_keys(items)
    return {
        "format": SAMPLE_FORMAT,
        "run": run,
        "model_id": model_id,
        "schema": schema,
        "seed": int(seed),
        "population": int(population),
        "n": int(len(draw.rows)),
        **draw.design,
        "attributes": list(attributes),
        "items": [{"row": int(r), "key": keys[r], "inclusion_prob": float(p)}
                  for r, p in zip(draw.rows.tolist(), draw.inclusion.tolist())],
    }
