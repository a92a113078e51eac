"""Statistics a user can trust for slices: intervals, one-sided tests, Benjamini–Hochberg.

All functions are vectorized over slices (arrays in, arrays out); no Python loop over
candidates. 0/1 errors get a Wilson interval for the error rate and an exact one-sided
hypergeometric test (Fisher's exact test of slice vs the rest of the data); continuous
errors get a t interval for the mean and a one-sided Welch test against the rest.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

DEFAULT_CONFIDENCE = 0.95

# scipy.special's distribution functions are what scipy.stats's ``norm`` and ``t`` evaluate (ndtri,
# stdtrit, stdtr); importing scipy.stats as well would dominate the start-up of `clipengine slices`.


def _normal_quantile(q: float) -> float:
    """``scipy.stats.norm.ppf(q)`` to within a few units in the last place, without importing scipy
    (Wichura's AS 241, as the standard library has it): intervals at any confidence stay cheap to start."""
    return NormalDist().inv_cdf(q)


def _t_ppf(q: float, df: np.ndarray) -> np.ndarray:
    """``scipy.stats.t.ppf(q, df)``: NaN where df ≤ 0 or is NaN."""
    from scipy.special import stdtrit

    df = np.asarray(df, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(df > 0, stdtrit(np.where(df > 0, df, 1.0), q), np.nan)


def _t_sf(x: np.ndarray, df: np.ndarray) -> np.ndarray:
    """``scipy.stats.t.sf(x, df)``: NaN where df ≤ 0, x or df is NaN."""
    from scipy.special import stdtr

    x = np.asarray(x, dtype=np.float64)
    df = np.asarray(df, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(df > 0, stdtr(np.where(df > 0, df, 1.0), -x), np.nan)


def wilson_interval(successes: np.ndarray, n: np.ndarray, confidence: float = DEFAULT_CONFIDENCE):
    """Wilson score interval of a binomial proportion: ``(low, high)``, each ``(S,)`` float64."""
    successes = np.asarray(successes, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    z = _normal_quantile(0.5 + confidence / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = successes / n
        denom = 1 + z * z / n
        center = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(np.maximum(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    return np.clip(center - half, 0.0, 1.0), np.clip(center + half, 0.0, 1.0)


def mean_t_interval(total: np.ndarray, total_sq: np.ndarray, n: np.ndarray, confidence: float = DEFAULT_CONFIDENCE):
    """t interval of a mean from sums: ``(low, high)``; NaN where n < 2."""
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / n
        var = np.maximum((total_sq - n * mean * mean) / (n - 1), 0.0)
        half = _t_ppf(0.5 + confidence / 2, n - 1) * np.sqrt(var / n)
    half = np.where(n >= 2, half, np.nan)
    return mean - half, mean + half


def hypergeometric_p(successes, n, total_successes: float, n_rows: int) -> np.ndarray:
    """One-sided exact p-value P(X ≥ successes), X ~ Hypergeometric(n_rows, total_successes, n):
    is the slice's error count larger than a random subset of its size would give?"""
    from clipengine.kernels.hypergeom import hypergeometric_sf

    p = hypergeometric_sf(np.asarray(successes), np.asarray(n), int(round(total_successes)), int(n_rows))
    return np.clip(np.nan_to_num(p, nan=1.0, copy=False), 0.0, 1.0, out=p)


def welch_p(total, total_sq, n, grand_total: float, grand_sq: float, n_rows: int) -> np.ndarray:
    """One-sided Welch t-test p-value: is the slice's mean error above the rest's?"""
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
        p = _t_sf(stat, df)
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


def benjamini_hochberg_at(p_values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``benjamini_hochberg(p_values)[index]``, the same numbers, with one sorted copy of the
    p-values in memory instead of five ``(C,)`` arrays (the family can hold millions of candidates)."""
    p = np.asarray(p_values, dtype=np.float64)
    n = p.size
    index = np.asarray(index, dtype=np.int64)
    if index.size == 0:
        return np.zeros(0)
    ranked = np.sort(p)
    # tied p-values share the q-value of the last of them
    last = np.searchsorted(ranked, p[index], side="right") - 1
    step = 1 << 20
    for start in range(0, n, step):
        stop = min(n, start + step)
        ranked[start:stop] = ranked[start:stop] * n / np.arange(start + 1, stop + 1)
    backwards = ranked[::-1]
    np.minimum.accumulate(backwards, out=backwards)
    return np.minimum(ranked[last], 1.0)


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


# ---- the multiple-testing family and selection-adjusted intervals -----------------------------------


def normal_quantile(confidence: float) -> float:
    """The two-sided normal critical value of ``confidence`` (1.96 for 0.95)."""
    return _normal_quantile(0.5 + confidence / 2)


def wilson_interval_effective(mean: float, variance: float, confidence: float = DEFAULT_CONFIDENCE, *,
                              inward: float = 0.0) -> tuple[float, float]:
    """Wilson score interval of a proportion estimated as ``mean`` with ``variance`` from a complex
    sample: the Wilson interval at the effective sample size ``p̃·(1 − p̃)/variance`` (Kish), ``p̃`` being
    ``mean`` moved at least ``inward`` away from 0 and 1 (so that an estimate of exactly 0 or 1 keeps
    a finite size). ``(low, high)``; NaN when the mean or variance is not finite."""
    if not (np.isfinite(mean) and np.isfinite(variance)):
        return float("nan"), float("nan")
    p = min(max(float(mean), 0.0), 1.0)
    if variance <= 0:
        return p, p
    z = normal_quantile(confidence)
    tilted = min(max(p, inward), 1.0 - inward)
    n = max(tilted * (1 - tilted), 1e-12) / variance
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(center - half, 0.0)), float(min(center + half, 1.0))


def family_q_values(family_p: np.ndarray, query_p: np.ndarray, family_size: int) -> np.ndarray:
    """Benjamini–Hochberg q-values of ``query_p`` (each one of ``family_p``) in a family of
    ``family_size`` ≥ len(family_p) hypotheses whose other members have p = 1 (not evaluated):
    ``q(p) = min over family p-values t ≥ p of t·family_size / #{family p ≤ t}``, capped at 1."""
    p = np.sort(np.asarray(family_p, dtype=np.float64))
    query = np.asarray(query_p, dtype=np.float64)
    size = max(int(family_size), p.size)
    if p.size == 0:
        return np.ones(query.shape)
    ranked = p * size / np.arange(1, p.size + 1)
    suffix_min = np.minimum.accumulate(ranked[::-1])[::-1]
    position = np.searchsorted(p, query, side="right") - 1
    q = np.where(position >= 0, suffix_min[np.clip(position, 0, None)], 1.0)
    return np.minimum(q, 1.0)


def fcr_confidence(confidence: float, selected: int, family_size: int) -> float:
    """The marginal confidence that gives selected intervals a false coverage rate ≤ 1 − ``confidence``
    when ``selected`` parameters are picked out of ``family_size`` by any rule (Benjamini & Yekutieli,
    JASA 2005): ``1 − selected·(1 − confidence)/family_size``."""
    if family_size <= 0 or selected <= 0:
        return confidence
    return 1.0 - min(selected, family_size) * (1.0 - confidence) / family_size
