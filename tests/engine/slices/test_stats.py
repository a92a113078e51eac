"""Slice statistics against SciPy's own tests and intervals."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from clipengine.slices import stats


def test_wilson_interval_matches_scipy():
    for successes, n in [(0, 10), (3, 10), (10, 10), (57, 400), (1, 1)]:
        low, high = stats.wilson_interval(np.array([successes]), np.array([n]))
        ref = sps.binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert low[0] == pytest.approx(ref.low, abs=1e-12)
        assert high[0] == pytest.approx(ref.high, abs=1e-12)


def test_normal_quantile_is_scipys():
    for confidence in (0.95, 0.9, 0.99, 0.5, 0.9999):
        assert stats.normal_quantile(confidence) == pytest.approx(float(sps.norm.ppf(0.5 + confidence / 2)), rel=1e-14)


def test_wilson_interval_of_the_default_confidence_needs_no_scipy():
    import subprocess
    import sys

    code = ("import sys, numpy as np; from clipengine.slices.stats import wilson_interval; "
            "wilson_interval(np.array([3.0]), np.array([10.0])); print('scipy.stats' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_hypergeometric_p_is_fishers_one_sided_exact_test():
    n_rows, total = 1000, 120
    for successes, size in [(5, 30), (20, 80), (0, 50), (60, 200), (120, 400)]:
        table = [[successes, size - successes], [total - successes, n_rows - size - (total - successes)]]
        ref = sps.fisher_exact(table, alternative="greater").pvalue
        got = stats.hypergeometric_p(np.array([successes]), np.array([size]), total, n_rows)[0]
        assert got == pytest.approx(ref, rel=1e-9, abs=1e-300)


def test_welch_p_matches_scipy_ttest_from_sums():
    rng = np.random.default_rng(0)
    data = rng.exponential(size=500)
    for size, shift in [(40, 0.5), (100, 0.0), (300, -0.2)]:
        x = data.copy()
        x[:size] += shift
        x = np.abs(x)
        ref = sps.ttest_ind(x[:size], x[size:], equal_var=False, alternative="greater").pvalue
        got = stats.welch_p(np.array([x[:size].sum()]), np.array([(x[:size] ** 2).sum()]), np.array([size]),
                            x.sum(), (x**2).sum(), x.size)[0]
        assert got == pytest.approx(ref, rel=1e-7)


def test_welch_p_without_spread():
    p = stats.welch_p(np.array([5.0, 0.0]), np.array([5.0, 0.0]), np.array([5, 5]), 5.0, 5.0, 10)
    assert p.tolist() == [0.0, 1.0]


def test_mean_t_interval_matches_scipy():
    x = np.array([0.1, 0.5, 0.2, 0.9, 0.4, 0.3])
    low, high = stats.mean_t_interval(np.array([x.sum()]), np.array([(x**2).sum()]), np.array([x.size]))
    ref = sps.t.interval(0.95, x.size - 1, loc=x.mean(), scale=sps.sem(x))
    assert (low[0], high[0]) == pytest.approx(ref, rel=1e-10)
    low, high = stats.mean_t_interval(np.array([1.0]), np.array([1.0]), np.array([1]))
    assert np.isnan(low[0]) and np.isnan(high[0])


def test_benjamini_hochberg_matches_scipy():
    rng = np.random.default_rng(1)
    p = np.concatenate([rng.random(200), rng.random(20) * 1e-4, [1.0, 0.0]])
    np.testing.assert_allclose(stats.benjamini_hochberg(p), sps.false_discovery_control(p), rtol=1e-12)
    assert stats.benjamini_hochberg(np.array([])).size == 0


def test_hypergeometric_p_on_large_populations_matches_scipy():
    rng = np.random.default_rng(4)
    for population, total in [(32_561, 2_800), (2_500_000, 400_000), (2_500_000, 30)]:
        draws = rng.integers(1, population + 1, 300)
        successes = np.array([rng.integers(max(0, n + total - population), min(n, total) + 1) for n in draws])
        ref = sps.hypergeom.sf(successes - 1, population, total, draws)
        got = stats.hypergeometric_p(successes, draws, total, population)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12)


def test_family_q_values_are_bh_with_the_unevaluated_members_at_p_one():
    rng = np.random.default_rng(3)
    evaluated = np.concatenate([rng.random(60), rng.random(8) * 1e-4, [0.02, 0.02]])
    family = 500
    padded = np.concatenate([evaluated, np.ones(family - evaluated.size)])
    expected = sps.false_discovery_control(padded)[: evaluated.size]
    np.testing.assert_allclose(stats.family_q_values(evaluated, evaluated, family), expected, rtol=1e-12)
    some = evaluated[[3, 61, 68]]
    np.testing.assert_allclose(stats.family_q_values(evaluated, some, family), expected[[3, 61, 68]], rtol=1e-12)
    # a family no larger than what was evaluated is plain BH
    np.testing.assert_allclose(stats.family_q_values(evaluated, evaluated, 1), stats.benjamini_hochberg(evaluated))


def test_wilson_interval_at_the_effective_size_is_wilsons_for_a_simple_sample():
    for successes, n in [(3, 10), (57, 400), (0, 25), (25, 25)]:
        p = successes / n
        ref = sps.binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
        if 0 < p < 1:
            low, high = stats.wilson_interval_effective(p, p * (1 - p) / n)
            assert (low, high) == pytest.approx((ref.low, ref.high), abs=1e-12)
        else:  # the size comes from p moved half an observation inwards
            tilted = 0.5 / n
            low, high = stats.wilson_interval_effective(p, tilted * (1 - tilted) / n, inward=tilted)
            assert (low, high) == pytest.approx((ref.low, ref.high), abs=1e-12)


def test_fcr_confidence():
    assert stats.fcr_confidence(0.95, 10, 1000) == pytest.approx(1 - 10 * 0.05 / 1000)
    assert stats.fcr_confidence(0.95, 0, 1000) == 0.95
    assert stats.fcr_confidence(0.95, 20, 10) == pytest.approx(0.95)


def test_benjamini_hochberg_at_equals_the_full_adjustment_with_ties():
    rng = np.random.default_rng(4)
    for n in (1, 7, 50_000):
        # 20 % signal, the rest null; many ties, exact zeros and ones
        p = np.round(np.where(rng.random(n) < 0.2, rng.random(n) ** 4, rng.random(n)), 4)
        p[rng.integers(0, n, max(1, n // 100))] = 0.0
        p[rng.integers(0, n, max(1, n // 100))] = 1.0
        index = rng.integers(0, n, 40)
        q = stats.benjamini_hochberg(p)[index]
        assert np.array_equal(stats.benjamini_hochberg_at(p, index), q)
    # the step-up's running minimum changes these q-values (p·n/rank alone would not give them)
    rank = np.searchsorted(np.sort(p), p[index], side="right")
    assert not np.array_equal(np.minimum(p[index] * n / rank, 1.0), q)


def test_t_distribution_without_scipy_stats_is_bit_identical_to_it():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 4, 2000), [np.inf, -np.inf, np.nan, 0.0, 60.0, -60.0]])
    df = np.concatenate([rng.exponential(30, 2000), [0.0, -1.0, np.nan, np.inf, 1e-3, 2.0]])
    assert np.array_equal(stats._t_sf(x, df), sps.t.sf(x, df), equal_nan=True)
    for q in (0.9, 0.975, 0.995):
        assert np.array_equal(stats._t_ppf(q, df), sps.t.ppf(q, df), equal_nan=True)


def test_normal_quantile_is_scipys_at_every_level():
    for q in (0.975, 0.95, 0.995, 0.5, 0.6, 1 - 1e-9):
        assert stats._normal_quantile(q) == pytest.approx(sps.norm.ppf(q), rel=1e-14, abs=1e-15)
