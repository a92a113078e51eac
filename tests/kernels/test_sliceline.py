"""SliceLine kernel: SystemDS's golden top-10 (compat mode) and exhaustive enumeration (exact mode)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipengine.kernels.sliceline import (
    encode_recoded,
    prepare_codes,
    slice_line,
    slice_mask,
)

from tests.shared_data import SLICELINE_DATA

DATA = SLICELINE_DATA
FIXTURES = DATA / "systemds_fixtures.json"
needs_data = pytest.mark.skipif(not FIXTURES.exists(), reason=f"SliceLine reference data not found at {DATA}")


def exhaustive_top_k(local_codes, errors, *, k, alpha, min_sup, max_level):
    """Every slice up to ``max_level`` with size ≥ min_sup and score > 0, best first, cut at k:
    ``[(score, size, error_sum, {feature: code})]``."""
    m, nf = local_codes.shape
    eavg = errors.sum() / m
    found = []
    for level in range(1, min(max_level, nf) + 1):
        for feats in itertools.combinations(range(nf), level):
            keys, inverse = np.unique(local_codes[:, feats], axis=0, return_inverse=True)
            inverse = inverse.ravel()
            size = np.bincount(inverse, minlength=len(keys))
            err = np.bincount(inverse, weights=errors, minlength=len(keys))
            for key, ss, se in zip(keys, size, err):
                if ss < min_sup:
                    continue
                score = alpha * ((se / ss) / eavg - 1) - (1 - alpha) * (m / ss - 1)
                if score > 0:
                    found.append((score, int(ss), float(se), dict(zip(feats, key.tolist()))))
    found.sort(key=lambda item: -item[0])
    return found[:k]


def _fixtures():
    return json.loads(FIXTURES.read_text())


def salaries_inputs():
    """SystemDS's slicefinderPrep of Salaries (see the data README): codes and squared errors."""
    import polars as pl

    frame = pl.read_csv(DATA / "salaries.csv")

    def recode(series):
        seen: dict = {}
        return np.array([seen.setdefault(v, len(seen) + 1) for v in series.to_list()])

    def bin_width(series, bins):
        v = series.to_numpy().astype(float)
        return np.clip(np.ceil((v - v.min()) / (v.max() - v.min()) * bins), 1, bins)

    X = np.column_stack(
        [
            recode(frame["rank"]),
            recode(frame["discipline"]),
            bin_width(frame["yrs.since.phd"], 14),
            bin_width(frame["yrs.service"], 12),
            recode(frame["sex"]),
        ]
    ).astype(float)
    y = frame["salary"].to_numpy().astype(float)
    B = np.linalg.solve(X.T @ X + 1e-7 * np.eye(X.shape[1]), X.T @ y)
    return X.astype(np.int64), (y - X @ B) ** 2


@needs_data
@pytest.mark.parametrize("name", ["custom1", "custom2", "custom3"])
def test_compat_reproduces_systemds_golden_top10(name):
    fixture = _fixtures()[name]
    X = np.array(fixture["X"])
    codes, col_feature, _ = encode_recoded(X)
    out = slice_line(codes, np.array(fixture["e"], float), col_feature, k=10, alpha=0.95, min_sup=4,
                     max_level=X.shape[1], compat=True)
    np.testing.assert_allclose(out.top_stats, np.array(fixture["expected_top10"]), atol=1.5e-3)


@needs_data
def test_compat_reproduces_systemds_golden_top10_on_salaries():
    X, errors = salaries_inputs()
    codes, col_feature, _ = encode_recoded(X)
    out = slice_line(codes, errors, col_feature, k=10, alpha=0.95, min_sup=4, max_level=X.shape[1], compat=True)
    expected = np.array(_fixtures()["salaries_expected_top10"])
    np.testing.assert_allclose(out.top_stats[:, [0, 3]], expected[:, [0, 3]], atol=1.5e-3)
    np.testing.assert_allclose(out.top_stats[:, 1:3], expected[:, 1:3], rtol=1e-9)


@needs_data
@pytest.mark.parametrize("name", ["custom1", "custom2", "custom3"])
def test_exact_mode_equals_exhaustive_on_the_golden_inputs(name):
    fixture = _fixtures()[name]
    X = np.array(fixture["X"])
    errors = np.array(fixture["e"], float)
    _check_against_exhaustive(X - 1, X.max(axis=0), errors, 10, 0.95, 4, X.shape[1])


def test_compat_bound_with_column_count_misses_a_slice_exact_mode_finds():
    """With more one-hot columns than rows, SystemDS's bound (n = columns) over-prunes."""
    rng = np.random.default_rng(2)
    local = rng.integers(0, 4, (20, 8))
    errors = np.round(rng.random(20), 3)
    codes, col_feature, _ = prepare_codes(local, np.full(8, 4))
    compat = slice_line(codes, errors, col_feature, k=10, alpha=0.95, min_sup=4, max_level=8, compat=True)
    exact = slice_line(codes, errors, col_feature, k=10, alpha=0.95, min_sup=4, max_level=8)
    reference = exhaustive_top_k(local, errors, k=10, alpha=0.95, min_sup=4, max_level=8)
    np.testing.assert_allclose(exact.top_stats[:, 0], [r[0] for r in reference], rtol=1e-12)
    assert compat.top_stats[-1, 0] < exact.top_stats[-1, 0]


def _check_against_exhaustive(local, domains, errors, k, alpha, min_sup, max_level):
    codes, col_feature, offsets = prepare_codes(local, domains)
    out = slice_line(codes, errors, col_feature, k=k, alpha=alpha, min_sup=min_sup, max_level=max_level)
    reference = exhaustive_top_k(local, errors, k=k, alpha=alpha, min_sup=min_sup, max_level=max_level)
    np.testing.assert_allclose(out.top_stats[:, 0], [r[0] for r in reference], rtol=1e-9, atol=1e-12)
    for columns, stats, sq, index in zip(out.top_slices, out.top_stats, out.top_sq, out.top_index):
        mask = slice_mask(codes, col_feature, columns)
        assert stats[3] == mask.sum()
        assert stats[1] == pytest.approx(errors[mask].sum())
        assert stats[2] == pytest.approx(errors[mask].max())
        assert sq == pytest.approx((errors[mask] ** 2).sum())
        assert out.evaluated_size[index] == mask.sum()
        assert out.evaluated_error[index] == pytest.approx(errors[mask].sum())
        used = columns[columns >= 0]
        assert len(set(col_feature[used].tolist())) == used.size  # one predicate per feature


@st.composite
def problems(draw):
    m = draw(st.integers(8, 80))
    nf = draw(st.integers(1, 5))
    domains = np.array(draw(st.lists(st.integers(1, 4), min_size=nf, max_size=nf)))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    local = np.column_stack([rng.integers(0, d, m) for d in domains])
    kind = draw(st.sampled_from(["binary", "sparse", "continuous"]))
    if kind == "binary":
        errors = (rng.random(m) < rng.uniform(0.05, 0.6)).astype(float)
    elif kind == "sparse":
        errors = rng.random(m) * (rng.random(m) < 0.4)
    else:
        errors = rng.exponential(size=m)
    if errors.sum() == 0:
        errors[0] = 1.0
    k = draw(st.integers(1, 12))
    alpha = draw(st.sampled_from([0.5, 0.8, 0.95, 0.99]))
    min_sup = draw(st.integers(1, 8))
    max_level = draw(st.integers(1, 5))
    return local, domains, errors, k, alpha, min_sup, max_level


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_exact_mode_equals_exhaustive_enumeration(problem):
    _check_against_exhaustive(*problem)


def test_exact_identities_beyond_float_precision():
    """20 features × 12 levels: a product of domain sizes passes 2^53, slices stay distinct."""
    rng = np.random.default_rng(7)
    m, nf = 6000, 20
    domains = np.full(nf, 12)
    local = rng.integers(0, 12, size=(m, nf))
    local[:300, 17:20] = [3, 5, 7]
    planted = (local[:, 17] == 3) & (local[:, 18] == 5) & (local[:, 19] == 7)
    errors = (rng.random(m) < np.where(planted, 0.9, 0.05)).astype(float)
    assert float(np.prod(domains.astype(float) + 1)) > 2**53
    codes, col_feature, offsets = prepare_codes(local, domains)
    out = slice_line(codes, errors, col_feature, k=5, alpha=0.95, min_sup=30, max_level=3)
    best = out.top_slices[0]
    assert sorted(best[best >= 0].tolist()) == [offsets[17] + 3, offsets[18] + 5, offsets[19] + 7]
    assert np.array_equal(slice_mask(codes, col_feature, best), planted)


def test_allowed_columns_are_never_seeded():
    rng = np.random.default_rng(3)
    local = rng.integers(0, 3, size=(500, 3))
    errors = (local[:, 0] == 2).astype(float)
    codes, col_feature, offsets = prepare_codes(local, np.array([3, 3, 3]))
    allowed = np.ones(col_feature.size, bool)
    allowed[offsets[0] + 2] = False
    out = slice_line(codes, errors, col_feature, k=10, alpha=0.95, min_sup=5, max_level=3, allowed=allowed)
    assert not np.any(out.top_slices == offsets[0] + 2)


def test_blocked_evaluation_matches_exhaustive_on_a_wider_problem():
    rng = np.random.default_rng(11)
    m, nf = 3000, 6
    domains = rng.integers(2, 6, nf)
    local = np.column_stack([rng.integers(0, d, m) for d in domains])
    z = -1.5 + 0.8 * (local[:, 0] == 1) + 0.7 * (local[:, 3] == 0) + 0.6 * (local[:, 5] == 1)
    errors = (rng.random(m) < 1 / (1 + np.exp(-z))).astype(float)
    _check_against_exhaustive(local, domains, errors, 10, 0.95, 10, 4)
