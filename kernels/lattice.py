"""Size of the slice lattice: how many slices have support ≥ σ, level by level (Numba).

A slice of level ``L`` is a conjunction of ``L`` predicates ``feature = value`` on distinct features.
The multiple-testing family of the lattice design (:mod:`clipengine.slices.find`) is every slice with
at least ``min_sup`` rows up to ``max_level`` predicates — whether or not SliceLine evaluated it — so
it is counted here, not evaluated.

Counting is a depth-first walk over feature-ordered prefixes (Eclat): a frequent slice's rows are
bucketed by the value of each later feature in one counting-sort pass, every bucket of at least
``min_sup`` rows is a frequent child, and children are walked on in turn. Support is anti-monotone
(a child never has more rows than its parent), so no infrequent prefix is ever extended. Work is the
sum over frequent slices below ``max_level`` of ``rows × later features``; memory is two row buffers
per level, each the size of the first-level slice being walked (one walk per thread).

Layout:

- ``codes``: ``(f, m)`` integer, feature-major — for each feature its per-row level ``0 .. domains[j]-1``.
- ``domains``: ``(f,)`` int64, levels per feature.
- ``allowed``: ``(Σ domains,)`` bool, levels that may appear in a slice (e.g. not a dropped null level),
  feature by feature in order.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange


@njit(cache=True)
def _walk(codes, offsets, allowed, seed_rows, first_feature, min_sup, max_level, max_domain, counts):
    """Count the frequent extensions of one frequent level-1 slice (rows ``seed_rows``, feature
    ``first_feature``) into ``counts[2 ..]``; depth-first with an explicit stack (one row buffer and one
    bucket buffer per level), as Numba's cache does not hold recursive functions."""
    nf = codes.shape[0]
    size = seed_rows.shape[0]
    rows = np.empty((max_level + 1, size), np.int32)  # rows[d, :n_rows[d]]: the current level-d prefix
    buckets = np.empty((max_level + 1, size), np.int32)  # its rows grouped by the value of feature_at[d]
    starts = np.zeros((max_level + 1, max_domain + 1), np.int64)
    n_rows = np.zeros(max_level + 1, np.int64)
    next_feature = np.zeros(max_level + 1, np.int64)  # the next later feature to extend level d with
    feature_at = np.full(max_level + 1, -1, np.int64)  # the feature whose buckets level d is walking, or -1
    value_at = np.zeros(max_level + 1, np.int64)  # the next bucket of that feature to descend into
    rows[1, :size] = seed_rows
    n_rows[1] = size
    next_feature[1] = first_feature + 1
    d = 1
    while d >= 1:
        j = feature_at[d]
        if j >= 0:  # descend into the next frequent bucket of feature j
            domain = offsets[j + 1] - offsets[j]
            v = value_at[d]
            while v < domain and not (starts[d, v + 1] - starts[d, v] >= min_sup and allowed[offsets[j] + v]):
                v += 1
            if v == domain:
                feature_at[d] = -1
                continue
            value_at[d] = v + 1
            n = starts[d, v + 1] - starts[d, v]
            rows[d + 1, :n] = buckets[d, starts[d, v]:starts[d, v + 1]]
            n_rows[d + 1] = n
            next_feature[d + 1] = j + 1
            feature_at[d + 1] = -1
            d += 1
            continue
        if next_feature[d] >= nf:
            d -= 1
            continue
        j = next_feature[d]
        next_feature[d] = j + 1
        domain = offsets[j + 1] - offsets[j]
        n = n_rows[d]
        starts[d, :domain + 1] = 0
        for t in range(n):
            starts[d, codes[j, rows[d, t]] + 1] += 1
        for v in range(domain):
            starts[d, v + 1] += starts[d, v]
        frequent = 0
        for v in range(domain):
            if starts[d, v + 1] - starts[d, v] >= min_sup and allowed[offsets[j] + v]:
                frequent += 1
        counts[d + 1] += frequent
        if frequent == 0 or d + 1 >= max_level:
            continue
        fill = starts[d, :domain].copy()
        for t in range(n):
            r = rows[d, t]
            v = codes[j, r]
            buckets[d, fill[v]] = r
            fill[v] += 1
        feature_at[d] = j
        value_at[d] = 0


@njit(cache=True, parallel=True)
def _count(codes, offsets, allowed, min_sup, max_level):
    nf, m = codes.shape
    n_cols = offsets[nf]
    support = np.zeros(n_cols, np.int64)
    for j in range(nf):
        for r in range(m):
            support[offsets[j] + codes[j, r]] += 1
    max_domain = 0
    for j in range(nf):
        max_domain = max(max_domain, offsets[j + 1] - offsets[j])
    seeds = np.empty(n_cols, np.int64)
    n_seeds = 0
    for c in range(n_cols):
        if support[c] >= min_sup and allowed[c]:
            seeds[n_seeds] = c
            n_seeds += 1
    per_seed = np.zeros((n_seeds, max_level + 1), np.int64)
    feature_of = np.empty(n_cols, np.int64)
    for j in range(nf):
        for c in range(offsets[j], offsets[j + 1]):
            feature_of[c] = j
    for s in prange(n_seeds):
        c = seeds[s]
        per_seed[s, 1] = 1
        if max_level < 2:
            continue
        j = feature_of[c]
        v = c - offsets[j]
        rows = np.empty(support[c], np.int32)
        k = 0
        for r in range(m):
            if codes[j, r] == v:
                rows[k] = r
                k += 1
        _walk(codes, offsets, allowed, rows, j, min_sup, max_level, max_domain, per_seed[s])
    return per_seed.sum(axis=0)[1:]


def count_lattice(codes: np.ndarray, domains: np.ndarray, *, min_sup: int, max_level: int,
                  allowed: np.ndarray | None = None) -> np.ndarray:
    """``(max_level,)`` int64: the number of slices of each level ``1 .. max_level`` with ≥ ``min_sup`` rows.

    ``codes``: ``(f, m)`` integer per-feature levels (feature-major); ``domains``: ``(f,)`` levels per
    feature; ``allowed``: optional ``(Σ domains,)`` bool, levels that may appear in a slice;
    ``max_level`` ≤ 0 means every level up to ``f``.

    >>> codes = np.array([[0, 0, 1, 1], [0, 1, 0, 1]])
    >>> count_lattice(codes, np.array([2, 2]), min_sup=1, max_level=2).tolist()
    [4, 4]
    """
    codes = np.ascontiguousarray(codes)
    if codes.ndim != 2:
        raise ValueError("codes must be (features, rows)")
    if codes.dtype.kind not in "iu":
        raise ValueError("codes must be integers")
    domains = np.asarray(domains, dtype=np.int64)
    nf = codes.shape[0]
    if domains.shape != (nf,):
        raise ValueError("domains must hold one level count per feature")
    max_level = nf if max_level <= 0 else min(int(max_level), nf)
    offsets = np.zeros(nf + 1, np.int64)
    np.cumsum(domains, out=offsets[1:])
    allowed = np.ones(int(offsets[-1]), bool) if allowed is None else np.ascontiguousarray(allowed, dtype=bool)
    if allowed.shape != (int(offsets[-1]),):
        raise ValueError("allowed must hold one flag per level of every feature")
    if nf == 0 or max_level == 0:
        return np.zeros(max(max_level, 0), np.int64)
    # a seed of an early feature has more later features to walk: most of the work is in the first
    # seeds, so they are handed to the threads one at a time, not in one contiguous block per thread
    previous_chunk = numba.get_parallel_chunksize()
    numba.set_parallel_chunksize(1)
    try:
        return _count(codes, offsets, allowed, int(max(min_sup, 1)), int(max_level))
    finally:
        numba.set_parallel_chunksize(previous_chunk)
