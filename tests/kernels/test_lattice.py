"""The lattice count against exhaustive enumeration of every conjunction."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from clipengine.kernels.lattice import count_lattice


def brute_force(codes, domains, min_sup, max_level, allowed):
    offsets = np.concatenate(([0], np.cumsum(domains)))
    counts = np.zeros(max_level, np.int64)
    for level in range(1, max_level + 1):
        for features in itertools.combinations(range(codes.shape[0]), level):
            for values in itertools.product(*(range(domains[j]) for j in features)):
                if not all(allowed[offsets[j] + v] for j, v in zip(features, values)):
                    continue
                rows = np.ones(codes.shape[1], bool)
                for j, v in zip(features, values):
                    rows &= codes[j] == v
                counts[level - 1] += rows.sum() >= min_sup
    return counts


@pytest.mark.parametrize("seed", range(6))
def test_count_lattice_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    nf = int(rng.integers(2, 6))
    domains = rng.integers(1, 5, nf)
    m = int(rng.integers(20, 300))
    # skewed levels, so that support varies widely across slices
    codes = np.stack([np.minimum(rng.geometric(0.5, m) - 1, d - 1) for d in domains]).astype(np.int16)
    allowed = rng.random(int(domains.sum())) < 0.85
    for min_sup in (1, 3, m // 10 + 1):
        for max_level in (1, 2, nf):
            got = count_lattice(codes, domains, min_sup=min_sup, max_level=max_level, allowed=allowed)
            np.testing.assert_array_equal(got, brute_force(codes, domains, min_sup, max_level, allowed))


def test_unlimited_level_and_default_allowed():
    codes = np.array([[0, 0, 1, 1, 1], [0, 1, 0, 1, 1], [1, 1, 1, 0, 0]], dtype=np.int64)
    domains = np.array([2, 2, 2])
    expected = brute_force(codes, domains, 2, 3, np.ones(6, bool))
    np.testing.assert_array_equal(count_lattice(codes, domains, min_sup=2, max_level=0), expected)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        count_lattice(np.zeros((2, 3), np.int64), np.array([1]), min_sup=1, max_level=2)
    with pytest.raises(ValueError):
        count_lattice(np.zeros((2, 3), np.int64), np.array([1, 1]), min_sup=1, max_level=2, allowed=np.ones(3, bool))


def test_the_callers_parallel_chunk_size_is_restored():
    import numba

    codes = np.array([[0, 0, 1, 1, 1], [0, 1, 0, 1, 1], [1, 1, 1, 0, 0]], dtype=np.int16)
    previous = numba.get_parallel_chunksize()
    numba.set_parallel_chunksize(7)
    try:
        count_lattice(codes, np.array([2, 2, 2]), min_sup=1, max_level=3)
        assert numba.get_parallel_chunksize() == 7
    finally:
        numba.set_parallel_chunksize(previous)
