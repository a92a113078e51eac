"""Drift statistics against SciPy and their definitions."""

import math

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from clipengine.compare.drift import chi_square_homogeneity, measure_drift, population_stability_index


def test_chi_square_matches_scipy_and_drops_empty_levels():
    rng = np.random.default_rng(0)
    for _ in range(50):
        k = int(rng.integers(2, 7))
        old, new = rng.integers(0, 200, k), rng.integers(0, 200, k)
        old[0] = new[0] = 0  # a level neither run has
        if (old + new)[1:].astype(bool).sum() < 2 or old.sum() == 0 or new.sum() == 0:
            continue
        statistic, dof, p = chi_square_homogeneity(old, new)
        table = np.vstack([old, new])[:, (old + new) > 0]
        want = chi2_contingency(table, correction=False)
        assert statistic == pytest.approx(want.statistic) and dof == want.dof and p == pytest.approx(want.pvalue)
    assert chi_square_homogeneity([5, 0], [7, 0]) == (0.0, 0, 1.0)
    assert chi_square_homogeneity([0, 0], [3, 4]) == (0.0, 0, 1.0)


def test_psi_by_its_definition():
    old, new = np.array([50, 30, 20]), np.array([20, 30, 50])
    o, n = (old + 0.5) / (old.sum() + 1.5), (new + 0.5) / (new.sum() + 1.5)
    assert population_stability_index(old, new) == pytest.approx(float(np.sum((n - o) * np.log(n / o))))
    assert population_stability_index(old, old * 3) == pytest.approx(0.0, abs=1e-3)
    assert math.isfinite(population_stability_index([100, 0], [0, 100]))  # one level per run: still finite


def test_measure_drift_adds_q_values():
    drifts = measure_drift([("a", ["x", "y"], np.array([500, 500]), np.array([650, 350])),
                            ("b", ["x", "y"], np.array([500, 500]), np.array([505, 495]))])
    assert drifts[0].p_value < 1e-6 < drifts[1].p_value
    assert drifts[0].q_value == pytest.approx(2 * drifts[0].p_value)  # the smaller of two: × 2 / 1
    assert drifts[1].q_value == pytest.approx(drifts[1].p_value)
