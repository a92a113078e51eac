"""Fisher's exact test (two-sided) kernel against a plain enumeration of the hypergeometric and SciPy."""

import math

import numpy as np
import pytest
from scipy.stats import fisher_exact

from clipengine.kernels.fisher import fisher_exact_two_sided


def enumerated_p(x1: int, n1: int, x2: int, n2: int) -> float:
    """The definition: the probability of every table with these margins no likelier than the observed one."""
    total, errors = n1 + n2, x1 + x2
    low, high = max(0, n1 - (total - errors)), min(n1, errors)
    pmf = np.array([math.comb(errors, k) * math.comb(total - errors, n1 - k) for k in range(low, high + 1)], float)
    pmf /= math.comb(total, n1)
    observed = pmf[x1 - low]
    return float(min(1.0, pmf[pmf <= observed * (1 + 1e-7)].sum()))


def test_small_tables_match_the_enumeration_and_scipy():
    rng = np.random.default_rng(0)
    n1, n2 = rng.integers(0, 40, 2000), rng.integers(0, 40, 2000)
    x1 = (rng.random(2000) * (n1 + 1)).astype(int)
    x2 = (rng.random(2000) * (n2 + 1)).astype(int)
    got = fisher_exact_two_sided(x1, n1, x2, n2)
    want = np.array([enumerated_p(*t) if t[1] + t[3] else 1.0 for t in zip(x1, n1, x2, n2)])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-14)
    scipy = np.array([fisher_exact([[a, n - a], [b, m - b]])[1] for a, n, b, m in zip(x1[:300], n1[:300], x2[:300], n2[:300])])
    np.testing.assert_allclose(got[:300], scipy, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("table", [(10000, 100000, 12500, 120000), (500, 5000, 560, 5000), (15, 150, 45, 150),
                                   (0, 3000, 9, 3000), (150, 150, 0, 150), (3, 7, 3, 7)])
def test_large_and_extreme_tables_match_scipy(table):
    x1, n1, x2, n2 = table
    got = fisher_exact_two_sided(np.array([x1]), np.array([n1]), np.array([x2]), np.array([n2]))[0]
    want = fisher_exact([[x1, n1 - x1], [x2, n2 - x2]])[1]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_empty_samples_and_shapes():
    assert fisher_exact_two_sided(np.array([0]), np.array([0]), np.array([3]), np.array([10]))[0] == 1.0
    assert fisher_exact_two_sided(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0)).shape == (0,)
    with pytest.raises(ValueError, match="one length"):
        fisher_exact_two_sided(np.zeros(2), np.zeros(3), np.zeros(2), np.zeros(2))
