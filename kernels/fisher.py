"""Fisher's exact test, two-sided, for many 2×2 tables at once (Numba).

Table ``i`` is ``[[x1, n1 - x1], [x2, n2 - x2]]``: ``x1`` errors among ``n1`` items of one
sample and ``x2`` among ``n2`` of another. Given the margins, ``X1 ~ Hypergeometric(N = n1 + n2,
K = x1 + x2, n1)``; the two-sided p-value sums the probabilities of every table no more likely
than the observed one (the "minimum likelihood" rule, as R's ``fisher.test`` and SciPy's
``fisher_exact``, with the same relative tolerance of 1e-7 for ties). Each table has its own
margins, so the tails are summed per table in compiled code: from the point where a tail starts,
outward, with the term recurrence (terms shrink away from the mode), until they no longer change
the sum.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from clipengine.kernels.hypergeom import _log_choose

TIE_TOLERANCE = 1e-7  # relative: tables within this of the observed probability count as as likely


@njit(cache=True)
def _log_pmf(k, K, N, n, log_total):
    return _log_choose(K, k) + _log_choose(N - K, n - k) - log_total


@njit(cache=True)
def _tail_down(start, lo, K, N, n, log_total):
    """P(X ≤ start), summed from ``start`` down (below the mode, terms shrink going down)."""
    j = start
    term = math.exp(_log_pmf(j, K, N, n, log_total))
    total = 0.0
    while j >= lo:
        total += term
        if term <= total * 1e-17:
            break
        term *= j * (N - K - n + j) / ((K - j + 1.0) * (n - j + 1.0))
        j -= 1.0
    return total


@njit(cache=True)
def _tail_up(start, hi, K, N, n, log_total):
    """P(X ≥ start), summed from ``start`` up (above the mode, terms shrink going up)."""
    j = start
    term = math.exp(_log_pmf(j, K, N, n, log_total))
    total = 0.0
    while j <= hi:
        total += term
        if term <= total * 1e-17:
            break
        term *= (K - j) * (n - j) / ((j + 1.0) * (N - K - n + j + 1.0))
        j += 1.0
    return total


@njit(cache=True)
def _fisher_one(x1, n1, x2, n2):
    N = n1 + n2
    K = x1 + x2
    n = n1
    lo = max(0.0, n - (N - K))
    hi = min(n, K)
    if hi <= lo:
        return 1.0
    log_total = _log_choose(N, n)
    mode = math.floor((n + 1.0) * (K + 1.0) / (N + 2.0))
    mode = min(max(mode, lo), hi)
    limit = _log_pmf(x1, K, N, n, log_total) + math.log1p(TIE_TOLERANCE)
    if _log_pmf(mode, K, N, n, log_total) <= limit:
        return 1.0  # the observed table is as likely as the most likely one
    if x1 < mode:
        # lower tail up to x1, and on the other side every k ≥ b whose pmf ≤ the observed one;
        # pmf decreases from the mode up, so b is found by bisection in (mode, hi]
        low_part = _tail_down(x1, lo, K, N, n, log_total)
        a, b = mode, hi + 1.0  # pmf(a) > limit; b: first point at or below the limit (hi + 1: none)
        while b - a > 1.0:
            mid = math.floor((a + b) / 2.0)
            if _log_pmf(mid, K, N, n, log_total) <= limit:
                b = mid
            else:
                a = mid
        high_part = _tail_up(b, hi, K, N, n, log_total) if b <= hi else 0.0
    else:
        high_part = _tail_up(x1, hi, K, N, n, log_total)
        a, b = mode, lo - 1.0  # pmf(a) > limit; b: last point at or below the limit (lo - 1: none)
        while a - b > 1.0:
            mid = math.ceil((a + b) / 2.0)
            if _log_pmf(mid, K, N, n, log_total) <= limit:
                b = mid
            else:
                a = mid
        low_part = _tail_down(b, lo, K, N, n, log_total) if b >= lo else 0.0
    return min(1.0, low_part + high_part)


@njit(cache=True, parallel=True)
def _fisher_two_sided(x1, n1, x2, n2, out):
    for i in prange(x1.shape[0]):
        out[i] = _fisher_one(x1[i], n1[i], x2[i], n2[i])


def fisher_exact_two_sided(x1: np.ndarray, n1: np.ndarray, x2: np.ndarray, n2: np.ndarray) -> np.ndarray:
    """Two-sided p-values of Fisher's exact test, elementwise.

    ``x1``, ``n1``, ``x2``, ``n2``: ``(C,)`` counts (any numeric dtype, rounded to integers;
    ``0 ≤ x ≤ n``); returns ``(C,)`` float64 in ``[0, 1]`` (1 where a sample is empty).
    """
    arrays = [np.ascontiguousarray(np.rint(np.asarray(a, dtype=np.float64))) for a in (x1, n1, x2, n2)]
    size = arrays[0].shape[0]
    if any(a.shape != (size,) for a in arrays):
        raise ValueError("fisher_exact_two_sided: x1, n1, x2, n2 must be (C,) arrays of one length")
    out = np.empty(size, np.float64)
    _fisher_two_sided(*arrays, out)
    return out
