"""Two-run differences of slice error means: tests and intervals against published values, SciPy and
their own definitions, and their error rates by simulation."""

import numpy as np
import pytest
from scipy import stats

from clipengine.compare.difference import (
    TEST_FISHER,
    TEST_MCNEMAR,
    TEST_OVERLAP,
    TEST_PAIRED_T,
    TEST_WELCH,
    SliceSums,
    compare_means,
    mcnemar_mid_p,
    newcombe_paired_interval,
    newcombe_unpaired_interval,
    overlap_t,
)


def test_mcnemar_mid_p_by_its_definition_and_the_published_example():
    # Fagerland, Lydersen & Laake (2013), supplementary: 1 vs 7 discordant pairs → exact 0.0703, mid-p 0.039
    assert mcnemar_mid_p([7], [1])[0] == pytest.approx(0.0390625)
    rng = np.random.default_rng(1)
    up, down = rng.integers(0, 60, 500), rng.integers(0, 60, 500)
    got = mcnemar_mid_p(up, down)
    for u, d, p in zip(up, down, got):
        n, k = u + d, min(u, d)
        if n == 0:
            assert p == 1.0
            continue
        point = stats.binom.pmf(k, n, 0.5)
        exact = stats.binomtest(k, n, 0.5).pvalue
        want = 1 - point / 2 if u == d else exact - point  # exact two-sided less the observed split
        assert p == pytest.approx(want, rel=1e-9, abs=1e-15)
        assert p <= exact + 1e-15


def test_newcombe_unpaired_interval_matches_newcombe_1998():
    # Newcombe (Stat. Med. 1998, 17:873), method 10, his Table II: (a) 56/70 − 48/80, (d) 5/56 − 0/29,
    # (e) 0/10 − 0/20; here the difference is new − old, so the old sample is his second one
    low, high = newcombe_unpaired_interval([48, 0, 0], [80, 29, 20], [56, 5, 0], [70, 56, 10])
    np.testing.assert_allclose(low, [0.0524, -0.0381, -0.1611], atol=5e-5)
    np.testing.assert_allclose(high, [0.3339, 0.1926, 0.2775], atol=5e-5)


def test_newcombe_paired_interval_matches_the_contingencytables_package():
    # Fagerland, Lydersen & Laake's R package contingencytables (tests/testthat/test-ch8.R): the paired
    # table [[59, 6], [16, 80]] gives -0.0621 (-0.1186 to -0.0046); rows are the new run here
    low, high = newcombe_paired_interval([59], [6], [16], [80])
    assert (low[0], high[0]) == pytest.approx((-0.1186, -0.0046), abs=5e-5)


def test_newcombe_paired_interval_without_correlation_is_the_unpaired_one():
    # ad − bc within [0, n/2]: the corrected correlation is 0 and the interval that of independent samples
    both, up, down, neither = np.array([4.0]), np.array([16.0]), np.array([6.0]), np.array([25.0])
    assert 0 <= both * neither - up * down <= (both + up + down + neither) / 2
    n = both + up + down + neither
    paired = newcombe_paired_interval(both, up, down, neither)
    unpaired = newcombe_unpaired_interval(both + down, n, both + up, n)
    np.testing.assert_allclose(paired, unpaired, rtol=1e-12)


def test_newcombe_paired_interval_covers_the_difference_and_uses_the_pairing():
    rng = np.random.default_rng(2)
    n, reps = 60, 3000
    # correlated outcomes: p(old) = 0.2, p(new) = 0.3, with a shared item effect
    shared = rng.random((reps, n)) < 0.15
    old = shared | (rng.random((reps, n)) < 0.06)
    new = shared | (rng.random((reps, n)) < 0.18)
    true = (1 - 0.85 * 0.82) - (1 - 0.85 * 0.94)
    both = (old & new).sum(1)
    up = (~old & new).sum(1)
    down = (old & ~new).sum(1)
    low, high = newcombe_paired_interval(both, up, down, n - both - up - down)
    coverage = np.mean((low <= true) & (true <= high))
    assert 0.93 <= coverage <= 0.975, coverage
    # positively correlated runs: narrower than treating the two runs as independent samples
    low_u, high_u = newcombe_unpaired_interval(both + down, np.full(reps, n), both + up, np.full(reps, n))
    assert np.median((high - low) / (high_u - low_u)) < 0.9


def _sums(old: np.ndarray, new: np.ndarray, matched_old: np.ndarray, matched_new: np.ndarray) -> SliceSums:
    arrays = [np.array([v], float) for v in (old.size, old.sum(), old @ old, new.size, new.sum(), new @ new,
                                              matched_old.size, matched_old.sum(), matched_new.sum(),
                                              matched_old @ matched_old, matched_new @ matched_new,
                                              matched_old @ matched_new)]
    return SliceSums(*arrays)


def test_overlap_t_is_the_paired_t_and_welch_at_its_ends():
    rng = np.random.default_rng(3)
    old = rng.gamma(2.0, 0.3, 40)
    new = old + rng.normal(0.05, 0.2, 40)
    diff, low, high, p = overlap_t(_sums(old, new, old, new))
    reference = stats.ttest_rel(new, old)
    assert p[0] == pytest.approx(reference.pvalue, rel=1e-9)
    interval = reference.confidence_interval()
    assert (low[0], high[0]) == pytest.approx((interval.low, interval.high), rel=1e-9)
    other = rng.gamma(2.0, 0.35, 55)
    diff, low, high, p = overlap_t(_sums(old, other, old[:0], other[:0]))
    reference = stats.ttest_ind(other, old, equal_var=False)
    assert diff[0] == pytest.approx(other.mean() - old.mean())
    assert p[0] == pytest.approx(reference.pvalue, rel=1e-9)
    interval = reference.confidence_interval()
    assert (low[0], high[0]) == pytest.approx((interval.low, interval.high), rel=1e-9)


def test_overlap_t_keeps_its_level_with_partly_shared_items():
    """Half the items in both runs (strongly correlated errors), the rest in one run only: under no
    change, p < 0.05 about 5 % of the time; an independent-samples test would ignore the pairing."""
    rng = np.random.default_rng(4)
    reps, rejected, widths = 2000, 0, []
    for _ in range(reps):
        item = rng.normal(0, 1, 60)
        old_shared, new_shared = item[:30] + rng.normal(0, 0.3, 30), item[:30] + rng.normal(0, 0.3, 30)
        old = np.concatenate([old_shared, item[30:45] + rng.normal(0, 0.3, 15)])
        new = np.concatenate([new_shared, item[45:] + rng.normal(0, 0.3, 15)])
        _, low, high, p = overlap_t(_sums(old, new, old_shared, new_shared))
        rejected += p[0] < 0.05
        widths.append(high[0] - low[0])
    assert 0.035 <= rejected / reps <= 0.065, rejected / reps
    welch = stats.ttest_ind(new, old, equal_var=False).confidence_interval()
    assert np.median(widths) < welch.high - welch.low  # the pairing is used


def test_compare_means_picks_the_test_by_overlap():
    ones = np.ones(8)
    errors = np.array([1, 0, 0, 1, 0, 0, 0, 0], float)
    flipped = np.array([1, 1, 1, 1, 1, 0, 1, 0], float)
    paired = _sums(errors, flipped, errors, flipped)
    disjoint = _sums(errors, flipped, errors[:0], flipped[:0])
    partial = _sums(errors, flipped, errors[:5], flipped[:5])
    stacked = SliceSums(*[np.concatenate([getattr(s, f) for s in (paired, disjoint, partial)])
                          for f in SliceSums.__dataclass_fields__])
    result = compare_means(stacked, binary=True)
    assert result.test == [TEST_MCNEMAR, TEST_FISHER, TEST_OVERLAP]
    np.testing.assert_allclose(result.diff, [0.5, 0.5, 0.5])
    assert result.p_value[0] == pytest.approx(mcnemar_mid_p([4], [0])[0])
    assert result.p_value[1] == pytest.approx(stats.fisher_exact([[2, 6], [6, 2]])[1])
    assert all(low < 0.5 < high for low, high in zip(result.ci_low, result.ci_high))
    continuous = compare_means(stacked, binary=False)
    assert continuous.test == [TEST_PAIRED_T, TEST_WELCH, TEST_OVERLAP]
    assert continuous.p_value[0] == pytest.approx(stats.ttest_rel(flipped, errors).pvalue)
    with pytest.raises(ValueError, match="items in both runs"):
        compare_means(_sums(ones[:0], ones, ones[:0], ones[:0]), binary=True)


def test_no_spread_and_too_few_items():
    same = np.full(5, 0.4)
    diff, low, high, p = overlap_t(_sums(same, same + 0.1, same[:0], same[:0]))
    assert p[0] == 0.0 and low[0] == pytest.approx(0.1) and high[0] == pytest.approx(0.1)
    diff, low, high, p = overlap_t(_sums(same, same, same[:0], same[:0]))
    assert p[0] == 1.0
    diff, low, high, p = overlap_t(_sums(same[:1], same[:1] + 1, same[:0], same[:0]))
    assert p[0] == 1.0 and np.isnan(low[0])
