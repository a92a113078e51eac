"""Drift of the data between two runs: per attribute, its label distribution in the old run vs the new.

For each compared attribute (zero-shot label or dataset feature, numeric ones in the old run's
bins) the counts per level form a 2 × k table. Pearson's χ² test of homogeneity gives a p-value
(Benjamini–Hochberg q-values over the attributes), and the population stability index

    PSI = Σ_levels (p_new − p_old) · ln(p_new / p_old)

measures how far the distribution moved (0: not at all; by a common convention below 0.1 is
small, 0.1–0.25 moderate, above 0.25 large). Shares are Jeffreys-smoothed (each count + 1/2), so a
level present in one run only gives a finite PSI. When the two runs share items the samples are
not independent and the χ² test is conservative (shared items carry the same label in both).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipengine.slices.stats import benjamini_hochberg

SMOOTHING = 0.5  # Jeffreys: half an item added to every level of both runs


@dataclass
class Drift:
    """One attribute's drift: ``levels`` (labels), ``old_counts``/``new_counts`` ``(k,)``, the χ² test and PSI."""

    attribute: str
    levels: list
    old_counts: np.ndarray
    new_counts: np.ndarray
    statistic: float
    dof: int
    p_value: float
    psi: float
    q_value: float = 1.0


def chi_square_homogeneity(old_counts, new_counts) -> tuple[float, int, float]:
    """Pearson's χ² test that two samples come from one distribution over ``k`` levels:
    ``(statistic, degrees of freedom, p-value)``; levels empty in both are left out, and
    fewer than two levels (or an empty sample) give ``(0, 0, 1)``."""
    from scipy.stats import chi2

    table = np.vstack([np.asarray(old_counts, np.float64), np.asarray(new_counts, np.float64)])
    table = table[:, table.sum(axis=0) > 0]
    rows = table.sum(axis=1)
    if table.shape[1] < 2 or np.any(rows == 0):
        return 0.0, 0, 1.0
    expected = np.outer(rows, table.sum(axis=0)) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    dof = table.shape[1] - 1
    return statistic, dof, float(chi2.sf(statistic, dof))


def population_stability_index(old_counts, new_counts, smoothing: float = SMOOTHING) -> float:
    """PSI of two count vectors over the same ``k`` levels, shares smoothed by ``smoothing`` items per level."""
    old = np.asarray(old_counts, np.float64) + smoothing
    new = np.asarray(new_counts, np.float64) + smoothing
    old /= old.sum()
    new /= new.sum()
    return float(np.sum((new - old) * np.log(new / old)))


def measure_drift(tables: list[tuple[str, list, np.ndarray, np.ndarray]]) -> list[Drift]:
    """Drift of each ``(attribute, level labels, old counts, new counts)``, with BH q-values over them."""
    drifts = []
    for name, levels, old_counts, new_counts in tables:
        statistic, dof, p = chi_square_homogeneity(old_counts, new_counts)
        drifts.append(Drift(name, list(levels), np.asarray(old_counts, np.int64), np.asarray(new_counts, np.int64),
                            statistic, dof, p, population_stability_index(old_counts, new_counts)))
    q = benjamini_hochberg(np.array([d.p_value for d in drifts]))
    for drift, value in zip(drifts, q):
        drift.q_value = float(value)
    return drifts
