"""Exact one-sided hypergeometric tail probabilities (Numba): the exact test of a slice's error count.

With ``N`` rows of which ``K`` are errors, a slice of ``n`` rows holding ``x`` errors has
``P(X ≥ x)`` for ``X ~ Hypergeometric(N, K, n)``: Fisher's one-sided exact test of the slice
against the rest of the data. Millions of slices are tested at once, so the tail is summed in
compiled code from the far side of the mode with a term recurrence (no per-slice scipy call).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(cache=True)
def _log_choose(n, k):
    return math.lgamma(n + 1.0) - math.lgamma(k + 1.0) - math.lgamma(n - k + 1.0)


@njit(cache=True, parallel=True)
def _hypergeom_sf(x, n, K, N, out):
    lo_all = math.lgamma(N + 1.0)
    for i in prange(x.shape[0]):
        xi = x[i]
        ni = n[i]
        lo = max(0.0, ni + K - N)
        hi = min(ni, K)
        if xi <= lo:
            out[i] = 1.0
            continue
        if xi > hi:
            out[i] = 0.0
            continue
        mode = math.floor((ni + 1.0) * (K + 1.0) / (N + 2.0))
        log_total = lo_all - math.lgamma(ni + 1.0) - math.lgamma(N - ni + 1.0)
        if xi > mode:
            # upper tail from xi: terms decrease
            j = xi
            term = math.exp(_log_choose(K, j) + _log_choose(N - K, ni - j) - log_total)
            total = 0.0
            while j <= hi:
                total += term
                if term <= total * 1e-17:  # also stops when the first term underflows to 0
                    break
                term *= (K - j) * (ni - j) / ((j + 1.0) * (N - K - ni + j + 1.0))
                j += 1.0
            out[i] = min(total, 1.0)
        else:
            # 1 - lower tail below xi: terms decrease going down
            j = xi - 1.0
            term = math.exp(_log_choose(K, j) + _log_choose(N - K, ni - j) - log_total)
            total = 0.0
            while j >= lo:
                total += term
                if term <= total * 1e-17:
                    break
                term *= j * (N - K - ni + j) / ((K - j + 1.0) * (ni - j + 1.0))
                j -= 1.0
            out[i] = max(0.0, 1.0 - total)


def hypergeometric_sf(successes: np.ndarray, draws: np.ndarray, total_successes: int, population: int) -> np.ndarray:
    """P(X ≥ successes) for X ~ Hypergeometric(population, total_successes, draws), elementwise.

    ``successes``, ``draws``: ``(C,)`` (integers, any numeric dtype); returns ``(C,)`` float64.
    Sums the pmf from the far side of the mode with a term recurrence (exact to ~1e-15).
    """
    x = np.ascontiguousarray(np.rint(successes), dtype=np.float64)
    n = np.ascontiguousarray(draws, dtype=np.float64)
    out = np.empty(x.shape[0], np.float64)
    _hypergeom_sf(x, n, float(total_successes), float(population), out)
    return out
