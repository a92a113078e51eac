"""The true-group estimator: a hand computation, ppi-python, and coverage under known label noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clipengine.slices.corrected import error_strata, estimate_group


def _wilson(p, n, z=1.959963984540054):
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return center - half, center + half


def _tiny():
    # 20 rows: predicted slice = rows 0-9; errors at rows 0-3 (inside) and 10-11 (outside)
    predicted = np.zeros(20, bool)
    predicted[:10] = True
    errors = np.zeros(20)
    errors[[0, 1, 2, 3, 10, 11]] = 1.0
    # two labelled items per cell: (inside, error) rows 0, 1; (inside, no error) 4, 5;
    # (outside, error) 10, 11; (outside, no error) 12, 13
    rows = np.array([0, 1, 4, 5, 10, 11, 12, 13])
    member = np.array([1, 0, 1, 1, 1, 0, 0, 0], bool)
    return predicted, errors, rows, member


def test_estimate_matches_a_hand_computation():
    predicted, errors, rows, member = _tiny()
    strata, n_strata = error_strata(errors, True)
    got = estimate_group(predicted, errors, strata, n_strata, None, rows, member, np.full(8, 2.5), binary=True)
    # cell shares 1/2, 1, 1/2, 0 → true size 4·½ + 6·1 + 2·½ + 8·0 = 9, true errors 4·½ + 2·½ = 3
    assert got.size == pytest.approx(9.0)
    assert got.error_mean == pytest.approx(1 / 3)
    # per cell max(empirical, Jeffreys floor) of the linearized θ̂: 16/729, 5/1458 (floor), 4/729,
    # 40/6561 (floor); plus θ(1 − θ)/T = 2/81 → 809/13122
    variance = 16 / 729 + 5 / 1458 + 4 / 729 + 40 / 6561 + 2 / 81
    assert variance == pytest.approx(809 / 13122)
    low, high = _wilson(1 / 3, (2 / 9) / variance)
    assert (got.ci_low, got.ci_high) == pytest.approx((low, high), rel=1e-12)
    assert got.labelled == 8 and got.corrected and not got.reason


def test_weights_are_inverse_inclusion_probabilities():
    predicted, errors, rows, member = _tiny()
    strata, n_strata = error_strata(errors, True)
    weights = np.array([3.0, 1.0, 1, 1, 1, 1, 1, 1])  # row 0 (a true member) drawn with a third of the chance
    got = estimate_group(predicted, errors, strata, n_strata, None, rows, member, weights, binary=True)
    # (inside, error) share 3/4: size 3 + 6 + 1 = 10, errors 3 + 1 = 4
    assert (got.size, got.error_mean) == pytest.approx((10.0, 0.4))
    scaled = estimate_group(predicted, errors, strata, n_strata, None, rows, member, weights * 7, binary=True)
    assert (scaled.error_mean, scaled.ci_low, scaled.ci_high) == pytest.approx((got.error_mean, got.ci_low,
                                                                                 got.ci_high), rel=1e-12)


def test_estimation_rows_change_the_counts_not_the_shares():
    predicted, errors, rows, member = _tiny()
    strata, n_strata = error_strata(errors, True)
    held_out = np.zeros(20, bool)
    held_out[[0, 1, 4, 5, 6, 7, 12, 13, 14, 15]] = True  # cells: 2 (in, error), 4 (in), 0 (out, error), 4 (out)
    got = estimate_group(predicted, errors, strata, n_strata, held_out, rows, member, np.ones(8), binary=True)
    # held-out true size 2·½ + 4·1 + 0 + 4·0 = 5, errors 2·½ = 1; the size is over every row
    assert got.error_mean == pytest.approx(1 / 5)
    assert got.size == pytest.approx(9.0)


def test_a_side_without_labelled_items_gives_no_estimate():
    predicted, errors, rows, member = _tiny()
    strata, n_strata = error_strata(errors, True)
    outside = rows >= 10
    got = estimate_group(predicted, errors, strata, n_strata, None, rows[outside], member[outside],
                         np.ones(outside.sum()), binary=True)
    assert math.isnan(got.error_mean) and "inside the predicted slice" in got.reason


def test_sparse_strata_are_pooled_within_their_side():
    predicted, errors, rows, member = _tiny()
    strata, n_strata = error_strata(errors, True)
    keep = rows != 11  # (outside, error) keeps one labelled item: the outside side is pooled
    got = estimate_group(predicted, errors, strata, n_strata, None, rows[keep], member[keep], np.ones(7),
                         binary=True)
    # outside pooled: labelled 10 (member, error), 12, 13 → share 1/3 over 10 rows; error share 1 (the one
    # labelled error is a member) over 2 errors
    assert got.size == pytest.approx(2 + 6 + 10 / 3)
    assert got.error_mean == pytest.approx((2 + 2) / (2 + 6 + 10 / 3))


def test_size_share_is_ppi_plus_plus_at_the_regression_slope():
    """With cells on predicted membership only, the share of true members is PPI++'s estimate
    (ppi-python) with its power-tuning weight at the labelled sample's (weighted) regression slope."""
    ppi = pytest.importorskip("ppi_py")
    rng = np.random.default_rng(3)
    n_rows, n = 5000, 400
    truth = rng.random(n_rows) < 0.2
    predicted = np.where(rng.random(n_rows) < 0.7, truth, rng.random(n_rows) < 0.3)
    errors = (rng.random(n_rows) < np.where(truth, 0.3, 0.1)).astype(float)
    rows = rng.choice(n_rows, n, replace=False)
    one_stratum = np.zeros(n_rows, np.int64)
    for weights in (np.ones(n), rng.uniform(0.5, 3.0, n)):
        got = estimate_group(predicted, errors, one_stratum, 1, None, rows, truth[rows], weights, binary=True)
        share_in = np.average(truth[rows][predicted[rows]], weights=weights[predicted[rows]])
        share_out = np.average(truth[rows][~predicted[rows]], weights=weights[~predicted[rows]])
        reference = ppi.ppi_mean_pointestimate(truth[rows].astype(float), predicted[rows].astype(float),
                                               predicted.astype(float), lam=share_in - share_out, w=weights)
        assert got.size / n_rows == pytest.approx(float(np.squeeze(reference)), rel=1e-12)


def test_rate_interval_agrees_with_ppi_python_bootstrap():
    """The true group's error rate and 95 % interval against ppi-python's prediction-powered bootstrap
    (Zrnic 2024, power-tuned) of the same ratio, on a sample large enough for both to be normal."""
    ppi = pytest.importorskip("ppi_py")
    rng = np.random.default_rng(7)
    n_rows, n = 20_000, 3000
    truth = rng.random(n_rows) < 0.15
    predicted = np.where(rng.random(n_rows) < 0.8, truth, rng.random(n_rows) < 0.15)
    errors = (rng.random(n_rows) < np.where(truth, 0.35, 0.1)).astype(float)
    rows = rng.choice(n_rows, n, replace=False)
    strata, n_strata = error_strata(errors, True)
    got = estimate_group(predicted, errors, strata, n_strata, None, rows, truth[rows], np.ones(n), binary=True)

    def ratio(y):
        return y[:, 0].mean() / y[:, 1].mean()

    both = np.column_stack([truth * errors, truth.astype(float)])
    guess = np.column_stack([predicted * errors, predicted.astype(float)])
    np.random.seed(0)  # ppboot draws from NumPy's global generator
    low, high = ppi.ppboot(ratio, both[rows], guess[rows], guess, n_resamples=1000, alpha=0.05)
    width = high - low
    assert got.error_mean == pytest.approx((low + high) / 2, abs=0.1 * width)
    assert (got.ci_high - got.ci_low) == pytest.approx(width, rel=0.25)
    assert abs(got.error_mean - errors[truth].mean()) < (got.ci_high - got.ci_low) / 2


def _noisy_population(rng, n_rows, flip, correlated):
    truth = rng.random(n_rows) < 0.2
    errors = (rng.random(n_rows) < np.where(truth, 0.35, 0.1)).astype(float)
    # a label flips with probability `flip`; correlated: three times as often on the model's errors
    rate = np.where(errors > 0, min(3 * flip, 0.95), flip / 2) if correlated else np.full(n_rows, flip)
    predicted = np.where(rng.random(n_rows) < rate, ~truth, truth)
    return truth, predicted, errors


@pytest.mark.parametrize("flip, correlated", [(0.2, False), (0.3, True)])
def test_corrected_intervals_cover_where_uncorrected_ones_do_not(flip, correlated):
    from clipengine.slices.stats import wilson_interval

    rng = np.random.default_rng(11)
    truth, predicted, errors = _noisy_population(rng, 4000, flip, correlated)
    target = errors[truth].mean()
    strata, n_strata = error_strata(errors, True)
    covered, reps = 0, 200
    for _ in range(reps):
        rows = rng.choice(truth.size, 300, replace=False)
        got = estimate_group(predicted, errors, strata, n_strata, None, rows, truth[rows], np.ones(300), binary=True)
        covered += got.ci_low <= target <= got.ci_high
    low, high = wilson_interval(np.array([errors[predicted].sum()]), np.array([predicted.sum()]))
    assert covered / reps >= 0.9
    assert not low[0] <= target <= high[0]  # the predicted slice's own interval misses the true group's rate


def test_continuous_errors_are_corrected_too():
    """Non-negative errors (e.g. a loss): error strata are quartiles, the interval a normal one."""
    rng = np.random.default_rng(5)
    n_rows = 4000
    truth = rng.random(n_rows) < 0.2
    errors = rng.exponential(np.where(truth, 0.6, 0.2))
    rate = np.where(errors > np.quantile(errors, 0.75), 0.5, 0.1)  # big losses are mislabelled more often
    predicted = np.where(rng.random(n_rows) < rate, ~truth, truth)
    strata, n_strata = error_strata(errors, False)
    assert n_strata == 4
    target = errors[truth].mean()
    covered, estimates = 0, []
    for _ in range(200):
        rows = rng.choice(n_rows, 400, replace=False)
        got = estimate_group(predicted, errors, strata, n_strata, None, rows, truth[rows], np.ones(400), binary=False)
        covered += got.ci_low <= target <= got.ci_high
        estimates.append(got.error_mean)
    assert covered / 200 >= 0.9
    assert abs(np.mean(estimates) - target) < 0.1 * target
    assert abs(errors[predicted].mean() - target) > 0.2 * target  # what the predicted slice alone says
