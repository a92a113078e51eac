"""A slice's size and error rate in its TRUE-attribute group, from a small labelled sample.

A slice ``garment = Coat AND tone = light`` is defined on the labels a zero-shot model predicted. The
group a user asks about is the items that truly are coats (and light): the *true group*. When a
person has labelled a sample of the items (:mod:`clipengine.annotate.labels`), the true group's size
and error rate are estimated by prediction-powered inference (PPI; Angelopoulos et al., Science
2023): the predicted labels give an estimate on every item, the labelled items measure how far the
predictions are off, and the two together give an unbiased estimate with a valid interval whatever
the predictions' quality.

Which predicates are corrected: a predicate on a feature the labels file has a ``true_<feature>``
column for is evaluated with the person's label; every other predicate (a dataset column such as
``ink``, an attribute nobody labelled) is taken as exact — the true group is the predicted one on
that feature. A slice with no labelled feature is its own true group (its numbers are the exact ones).

The estimator. Every item falls into a *cell*: inside or outside the predicted slice × its error
stratum (0/1 errors: erroneous or not; other errors: quartiles). In each cell ``c`` the labelled items
give the weighted share of true members ``p_c`` and the share of the cell's error mass that belongs to
true members ``r_c`` (weights 1/inclusion probability, so a non-uniform sample such as ``--focus
uncertain`` is re-weighted; a labelled item without a true value for a feature the slice uses is left
out, i.e. taken as missing at random within its cell). With the cell counts ``N_c`` and error sums
``E_c`` over the estimation rows,

    true size  T = Σ_c N_c·p_c,    true errors  A = Σ_c E_c·r_c,    true error rate θ = A / T.

This is PPI with the prediction recalibrated per cell: PPI's estimate is (prediction summed over all
items) + (rectifier: mean of truth − prediction over the labelled items); predicting each item's
membership by its cell's labelled share makes the rectifier vanish in every cell, which is the
post-stratified estimator of survey sampling. With cells on predicted membership only it equals
PPI++ (Angelopoulos, Duchi & Zrnic 2023) with its power-tuning weight at the labelled sample's
regression slope; splitting cells by error also corrects label noise that is correlated with the
model's errors (a blurry image is both mislabelled and misclassified).

The interval (95 % unless asked): delta method on θ = A/T over the labelled items of each cell (the
with-replacement variance of a weighted mean), each cell's variance kept at least at the binomial
variance under Jeffreys' prior (a cell whose few labelled items all agree is not taken as certain),
plus the variance of the true group's own errors (θ(1 − θ)/T for 0/1 errors: the interval is for the
error rate of such items in general, like the uncorrected Wilson interval); for 0/1 errors a Wilson
interval at the effective sample size, otherwise a normal interval. A predicted-membership side
(inside or outside the slice) with no labelled item at all leaves the slice without an estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from clipengine.slices import stats

MIN_LABELLED_PER_CELL = 2  # fewer: the cell's error strata are pooled within its side of the slice
CONTINUOUS_ERROR_STRATA = 4


@dataclass(frozen=True)
class LabelledSample:
    """Labelled items of the table being sliced: ``rows`` (n,) int64 positions into the table;
    ``truth`` ``{feature: (n,) object array of true values, None where not labelled}``; ``inclusion``
    (n,) float64 in (0, 1], each item's probability of having been drawn into the sample."""

    rows: np.ndarray
    truth: dict[str, np.ndarray]
    inclusion: np.ndarray
    source: str = ""

    def __post_init__(self):
        n = self.rows.shape[0]
        if self.inclusion.shape != (n,) or any(v.shape != (n,) for v in self.truth.values()):
            raise ValueError("rows, inclusion and every truth column must have one entry per labelled item")

    @property
    def features(self) -> list[str]:
        return list(self.truth)


@dataclass(frozen=True)
class GroupEstimate:
    """One slice's true group: ``error_mean`` with its interval ``(ci_low, ci_high)`` over the estimation
    rows, ``size`` the estimated number of true members among all rows, ``labelled`` the labelled items
    used, ``corrected`` whether any predicate was on a labelled feature; ``reason`` says why there is no
    estimate (then the numbers are NaN)."""

    error_mean: float
    ci_low: float
    ci_high: float
    size: float
    labelled: int
    corrected: bool
    reason: str = ""


def error_strata(errors: np.ndarray, binary: bool) -> tuple[np.ndarray, int]:
    """``(strata (N,) int64, count)``: 0/1 for 0/1 errors, else quartile bins of ``errors``."""
    if binary:
        return errors.astype(np.int64), 2
    edges = np.unique(np.quantile(errors, np.linspace(0, 1, CONTINUOUS_ERROR_STRATA + 1)[1:-1]))
    return np.searchsorted(edges, errors, side="left").astype(np.int64), edges.size + 1


def estimate_group(
    predicted: np.ndarray,
    errors: np.ndarray,
    strata: np.ndarray,
    n_strata: int,
    estimate_rows: np.ndarray | None,
    labelled_rows: np.ndarray,
    labelled_member: np.ndarray,
    weights: np.ndarray,
    *,
    binary: bool,
    confidence: float = stats.DEFAULT_CONFIDENCE,
) -> GroupEstimate:
    """The true group of one slice (see the module docstring).

    ``predicted`` (N,) bool: predicted membership of every row; ``errors`` (N,) float64; ``strata``
    (N,) int64 error strata in ``0 .. n_strata-1``; ``estimate_rows`` (N,) bool, the rows the error rate
    is estimated on (None: all); ``labelled_rows`` (n,) int64 positions of the labelled items usable for
    this slice; ``labelled_member`` (n,) bool their true membership; ``weights`` (n,) their 1/inclusion.
    """
    n_cells = 2 * n_strata
    cell = predicted.astype(np.int64) * n_strata + strata
    rows_all = np.bincount(cell, minlength=n_cells).astype(np.float64)
    if estimate_rows is None:
        rows_est, errors_est = rows_all, np.bincount(cell, weights=errors, minlength=n_cells)
    else:
        rows_est = np.bincount(cell[estimate_rows], minlength=n_cells).astype(np.float64)
        errors_est = np.bincount(cell[estimate_rows], weights=errors[estimate_rows], minlength=n_cells)
    lab_cell = cell[labelled_rows]
    lab_errors = errors[labelled_rows]
    member = labelled_member.astype(np.float64)
    count = np.bincount(lab_cell, minlength=n_cells)

    # cells: per side of the slice, its error strata, or the side pooled when a stratum with rows has too
    # few labelled items
    groups: list[tuple[np.ndarray, np.ndarray]] = []  # (cells of the group, labelled items of the group)
    for side in (0, 1):
        cells = np.arange(side * n_strata, (side + 1) * n_strata)
        populated = cells[rows_all[cells] > 0]
        if populated.size == 0:
            continue
        on_side = np.isin(lab_cell, cells)
        if not on_side.any():
            where = "inside" if side else "outside"
            return _missing(f"no labelled item {where} the predicted slice", labelled_rows.size)
        if np.all(count[populated] >= MIN_LABELLED_PER_CELL):
            groups += [(np.array([c]), lab_cell == c) for c in populated]
        else:
            groups.append((populated, on_side))

    size_all = size_est = true_errors = 0.0
    parts = []
    for cells, items in groups:
        w = weights[items]
        m = member[items]
        e = lab_errors[items]
        total_w = w.sum()
        share = float(np.dot(w, m) / total_w)
        mass = float(np.dot(w, e))
        error_share = float(np.dot(w, m * e) / mass) if mass > 0 else share
        n_rows, e_sum = rows_est[cells].sum(), errors_est[cells].sum()
        size_all += rows_all[cells].sum() * share
        size_est += n_rows * share
        true_errors += e_sum * error_share
        parts.append((n_rows, e_sum, share, error_share, w, m, e, mass / total_w))
    if not size_est > 0:
        return GroupEstimate(float("nan"), float("nan"), float("nan"), size_all, labelled_rows.size, True,
                             "no labelled item is in the true group")
    theta = true_errors / size_est

    variance = 0.0
    for n_rows, e_sum, share, error_share, w, m, e, mean_e in parts:
        a = w / w.sum()
        # linearized θ̂ − θ: the error-share term (a ratio of weighted means, or the member share when no
        # labelled item of the cell has an error) minus θ times the member-share term
        if mean_e > 0:
            influence = e_sum * e * (m - error_share) / mean_e
        else:
            influence = e_sum * (m - share)
        influence = (influence - theta * n_rows * (m - share)) / size_est
        k = a.size
        empirical = float(np.sum(a * a * (influence - np.dot(a, influence)) ** 2)) * (k / (k - 1) if k > 1 else 0.0)
        n_eff = 1.0 / float(np.sum(a * a))
        jeffreys = (n_eff * share + 0.5) / (n_eff + 1)
        floor = (n_rows * (e_sum / n_rows - theta) / size_est) ** 2 * jeffreys * (1 - jeffreys) / n_eff \
            if n_rows > 0 else 0.0
        variance += max(empirical, floor)
    if binary:
        spread = theta * (1 - theta)
    else:
        in_group = np.concatenate([w * m for *_, w, m, _, _ in parts])
        errs = np.concatenate([e for *_, e, _ in parts])
        spread = float(np.dot(in_group, (errs - theta) ** 2) / in_group.sum()) if in_group.sum() > 0 else 0.0
    variance += spread / size_est
    if binary:
        low, high = stats.wilson_interval_effective(theta, variance, confidence, inward=0.5 / size_est)
    else:
        half = stats.normal_quantile(confidence) * np.sqrt(variance)
        low, high = max(theta - half, 0.0), theta + half
    return GroupEstimate(float(theta), low, high, float(size_all), int(labelled_rows.size), True)


def _missing(reason: str, labelled: int) -> GroupEstimate:
    return GroupEstimate(float("nan"), float("nan"), float("nan"), float("nan"), labelled, True, reason)


def true_membership(sample_frame, predicates: Mapping[str, Any], bounds: Mapping[str, Any],
                    labelled_features: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(usable, member)``, each (n,) bool over the labelled items: whether every labelled feature the
    slice uses has a true value, and whether the item truly satisfies the slice. ``sample_frame``: the
    labelled items' rows of the sliced table with each labelled feature's column replaced by its true
    values (:func:`sample_frame`)."""
    import polars as pl

    from clipengine.slices.coding import predicate_mask

    usable = np.ones(sample_frame.height, dtype=bool)
    for feature in predicates:
        if feature in labelled_features:
            usable &= sample_frame.get_column(feature).is_not_null().to_numpy()
    member = predicate_mask(sample_frame.with_columns(pl.col(f).fill_null("") for f in predicates
                                                      if f in labelled_features), predicates, bounds)
    return usable, member & usable


def sample_frame(frame, sample: LabelledSample):
    """The labelled items' rows of ``frame`` with each labelled feature's column holding the true values
    (as text, None where not labelled)."""
    import polars as pl

    rows = frame[sample.rows.tolist()]
    columns = []
    for feature, values in sample.truth.items():
        if feature in rows.columns:
            columns.append(pl.Series(feature, [None if v is None else str(v) for v in values], dtype=pl.String))
    return rows.with_columns(columns) if columns else rows


def read_sample(path, frame, classes: Mapping[str, tuple[str, ...]] | None = None) -> LabelledSample:
    """A labels file (:func:`clipengine.annotate.labels.read_labels`) as a sample of ``frame``'s rows,
    matched on its item key columns (``path`` [, ``box``]). ``classes``: each attribute's class names
    (a run's schema); None takes them from ``frame``'s own columns and the file's true values (a table
    has no schema)."""
    from clipengine.annotate.labels import read_labels
    from clipengine.artifacts import KEY_COLUMNS
    from clipengine.errors import ClipengineError

    if "path" not in frame.columns:
        raise ClipengineError(f"{path}: the table has no 'path' column to match the labelled items with")
    items = frame.select([c for c in KEY_COLUMNS if c in frame.columns])
    if classes is None:
        classes = _table_classes(path, frame)
    labels = read_labels(path, items, dict(classes))
    return LabelledSample(rows=labels.rows, truth=labels.truth, inclusion=labels.inclusion, source=str(path))


def _table_classes(path, frame) -> dict[str, tuple[str, ...]]:
    """Class names of each labelled feature of a plain table: its values in the table and in the file."""
    import polars as pl

    from clipengine.artifacts import TRUTH_PREFIX
    from clipengine.tables import read_table

    table = read_table(path, what="labels")
    classes = {}
    for column in table.columns:
        feature = column[len(TRUTH_PREFIX):]
        if not column.startswith(TRUTH_PREFIX) or feature not in frame.columns:
            continue
        values = set(frame.get_column(feature).drop_nulls().cast(pl.String).to_list())
        values |= {v.strip() for v in table.get_column(column).cast(pl.String).drop_nulls().to_list() if v.strip()}
        classes[feature] = tuple(sorted(values))
    return classes


def schema_classes(schema_content: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """``{attribute: class names}`` of a schema's canonical content (``metadata.parquet``'s record)."""
    return {a["name"]: tuple(c["name"] for c in a["classes"]) for a in schema_content.get("attributes", [])}
