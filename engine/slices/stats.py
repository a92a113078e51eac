"""Statistics a user can trust for slices: intervals, one-sided tests, Benjamini–Hochberg.

All functions are vectorized over slices (arrays in, arrays out); no Python loop over
candidates. 0/1 errors get a Wilson interval for the error rate and an exact one-sided
hypergeometric test (Fisher's exact test of slice vs the rest of the data); continuous
errors get a t interval for the mean and a one-sided Welch test against the rest.
"""

from __future__ import annotations

import numpy as np

DEFAULT_CONFIDENCE = 0.95
# scipy.stats.norm.ppf(0.975) to the last bit: the default interval without importing scipy.stats
# (a second of start-up in a command that needs nothing else from it)
_Z_DEFAULT = 1.959963984540054


def normal_quantile(confidence: float) -> float:
    """The two-sided normal quantile ``z`` of ``confidence`` (``norm.ppf(0.5 + confidence / 2)``)."""
    if confidence == DEFAULT_CONFIDENCE:
        return _Z_DEFAULT
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


def wilson_interval(successes: np.ndarray, n: np.ndarray, confidence: float = DEFAULT_CONFIDENCE):
    """Wilson score interval of a binomial proportion: ``(low, high)``, each ``(S,)`` float64."""
    successes = np.asarray(successes, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    z = normal_quantile(confidence)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = successes / n
        denom = 1 + z * z / n
        center = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(np.maximum(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    return np.clip(center - half, 0.0, 1.0), np.clip(center + half, 0.0, 1.0)


def mean_t_interval(total: np.ndarray, total_sq: np.ndarray, n: np.ndarray, confidence: float = DEFAULT_CONFIDENCE):
    """t interval of a mean from sums: ``(low, high)``; NaN where n < 2."""
    from scipy.stats import t

    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / n
        var = np.maximum((total_sq - n * mean * mean) / (n - 1), 0.0)
        half = t.ppf(0.5 + confidence / 2, n - 1) * np.sqrt(var / n)
    half = np.where(n >= 2, half, np.nan)
    return mean - half, mean + half


def hypergeometric_p(successes, n, total_successes: float, n_rows: int) -> np.ndarray:
    """One-sided exact p-value P(X ≥ successes), X ~ Hypergeometric(n_rows, total_successes, n):
    is the slice's error count larger than a random subset of its size would give?"""
    from clipengine.kernels.hypergeom import hypergeometric_sf

    p = hypergeometric_sf(np.asarray(successes), np.asarray(n), int(round(total_successes)), int(n_rows))
    return np.clip(np.nan_to_num(p, nan=1.0), 0.0, 1.0)


def welch_p(total, total_sq, n, grand_total: float, grand_sq: float, n_rows: int) -> np.ndarray:
    """One-sided Welch t-test p-value: is the slice's mean error above the rest's?"""
    from scipy.stats import t

    n1 = np.asarray(n, dtype=np.float64)
    n2 = n_rows - n1
    s1 = np.asarray(total, dtype=np.float64)
    q1 = np.asarray(total_sq, dtype=np.float64)
    s2 = grand_total - s1
    q2 = grand_sq - q1
    with np.errstate(invalid="ignore", divide="ignore"):
        m1 = s1 / n1
        m2 = s2 / n2
        v1 = np.maximum((q1 - n1 * m1 * m1) / (n1 - 1), 0.0) / n1
        v2 = np.maximum((q2 - n2 * m2 * m2) / (n2 - 1), 0.0) / n2
        se = np.sqrt(v1 + v2)
        stat = (m1 - m2) / se
        df = (v1 + v2) ** 2 / (v1 * v1 / (n1 - 1) + v2 * v2 / (n2 - 1))
        p = t.sf(stat, df)
    # no spread at all: the difference is certain
    p = np.where(se == 0, np.where(m1 > m2, 0.0, 1.0), p)
    p = np.where((n1 < 2) | (n2 < 2), 1.0, p)
    return np.clip(np.nan_to_num(p, nan=1.0), 0.0, 1.0)


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values), ``(C,)`` float64, same order as input."""
    p = np.asarray(p_values, dtype=np.float64)
    n = p.size
    if n == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    ranked = p[order] * n / np.arange(1, n + 1)
    q_sorted = np.minimum.accumulate(ranked[::-1])[::-1]
    q = np.empty(n)
    q[order] = np.minimum(q_sorted, 1.0)
    return q


def slice_p_values(size, error_sum, error_sq, *, binary: bool, n_rows: int, total_error: float, total_sq: float):
    """One-sided p-values of slices against the rest of the data, ``(C,)`` float64."""
    if binary:
        return hypergeometric_p(error_sum, size, total_error, n_rows)
    return welch_p(error_sum, error_sq, size, total_error, total_sq, n_rows)


def slice_intervals(size, error_sum, error_sq, *, binary: bool, confidence: float = DEFAULT_CONFIDENCE):
    """Interval of each slice's mean error: Wilson for 0/1 errors, t otherwise."""
    if binary:
        return wilson_interval(error_sum, size, confidence)
    return mean_t_interval(error_sum, error_sq, size, confidence)
