"""SliceLine kernel: SystemDS's golden top-10 (compat mode) and exhaustive enumeration (exact mode)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

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


# ---- blocked evaluation and the memory bound ---------------------------------------------------------

import functools  # noqa: E402
import operator  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from clipengine.kernels import sliceline as kernel  # noqa: E402

OUTPUT_FIELDS = ("top_slices", "top_stats", "top_sq", "top_index", "evaluated_size", "evaluated_error",
                 "evaluated_sq", "evaluated_level")


def _assert_same_output(a, b):
    for name in OUTPUT_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True), name
    assert a.levels == b.levels


def _skewed_problem(seed, m=4000, nf=7, binary=True):
    """Correlated, skewed features (one value dominates most of them) with a planted weak slice."""
    rng = np.random.default_rng(seed)
    domains = rng.integers(2, 6, nf)
    driver = rng.integers(0, 3, m)
    local = np.column_stack([np.where(rng.random(m) < 0.6, (driver + j) % d, rng.integers(0, d, m))
                             for j, d in enumerate(domains)])
    local[rng.random((m, nf)) < 0.3] = 0  # the most frequent value of every feature
    z = -1.8 + 1.2 * ((local[:, 0] == 1) & (local[:, 2] != 0)) + 0.5 * (driver == 2)
    p = 1 / (1 + np.exp(-z))
    errors = (rng.random(m) < p).astype(float) if binary else rng.exponential(p)
    return local, domains, errors


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("compat", [False, True])
def test_small_blocks_and_split_tables_give_the_same_output(monkeypatch, binary, compat):
    """Candidate blocks of 7, tables of a few slot columns, no level-2 pair table: every output
    array equals one-block evaluation, and both equal exhaustive enumeration (exact mode)."""
    local, domains, errors = _skewed_problem(3, m=1500, binary=binary)
    kwargs = dict(k=10, alpha=0.95, min_sup=10, max_level=4, compat=compat)
    codes, col_feature, _ = prepare_codes(local, domains)
    whole = slice_line(codes, errors, col_feature, **kwargs)
    assert whole.levels[2][1] > 5 * 40 and whole.levels[3][1] > 40  # levels 3 and 4 have several blocks below
    monkeypatch.setattr(kernel, "BLOCK_CANDIDATES", 40)
    monkeypatch.setattr(kernel, "TABLE_BYTES", 1)  # one feature's columns per table
    monkeypatch.setattr(kernel, "PAIR_TABLE_BYTES", 0)  # level 3 without subtractions
    blocked = slice_line(codes, errors, col_feature, **kwargs)
    _assert_same_output(whole, blocked)
    if not compat:
        _check_against_exhaustive(local, domains, errors, 10, 0.95, 10, 4)


def test_continuous_error_sums_are_row_order_sums():
    """Non-0/1 errors are summed row by row in row order (what a plain loop gives), not pairwise."""
    local, domains, errors = _skewed_problem(5, m=3000, binary=False)
    codes, col_feature, _ = prepare_codes(local, domains)
    out = slice_line(codes, errors, col_feature, k=10, alpha=0.99, min_sup=10, max_level=3)
    assert len(out.top_slices) == 10 and (out.top_slices[:, 1] >= 0).any()
    for columns, stats, sq in zip(out.top_slices, out.top_stats, out.top_sq):
        rows = errors[slice_mask(codes, col_feature, columns)]
        assert stats[1] == functools.reduce(operator.add, rows.tolist(), 0.0)
        assert sq == functools.reduce(operator.add, (rows * rows).tolist(), 0.0)
        assert stats[2] == rows.max()


def test_feature_major_entry_point_equals_global_codes():
    local, domains, errors = _skewed_problem(6)
    codes, col_feature, _ = prepare_codes(local, domains)
    via_global = slice_line(codes, errors, col_feature, k=5, min_sup=15, max_level=3)
    local_t = np.ascontiguousarray(local.T).astype(np.uint8)
    _assert_same_output(via_global, kernel.slice_line_local(local_t, domains, errors, k=5, min_sup=15, max_level=3))
    offsets = np.concatenate(([0], np.cumsum(domains)))
    for columns in via_global.top_slices:
        assert np.array_equal(kernel.slice_mask_local(local_t, offsets, columns),
                              slice_mask(codes, col_feature, columns))


def _wide_binary(m, nf, seed=0):
    """The issue's case: a table of a/b values (every feature binary), random 0/1 errors."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2, (nf, m)).astype(np.uint8), np.full(nf, 2), rng.integers(0, 2, m).astype(float)


def test_refusal_names_what_fits_and_it_fits():
    local_t, domains, errors = _wide_binary(500, 120)
    kwargs = dict(k=10, alpha=0.95, min_sup=5, max_level=3)
    unlimited = kernel.slice_line_local(local_t, domains, errors, **kwargs)
    assert unlimited.levels[2][1] > 2_000_000  # level 3: ≈ 8·C(120, 3) candidates
    limit = 60_000_000
    with pytest.raises(kernel.SliceLineMemoryError) as info:
        kernel.slice_line_local(local_t, domains, errors, memory_limit=limit, **kwargs)
    error = info.value
    message = str(error)
    assert "\n" not in message and "level 3" in message and f"{unlimited.levels[2][1]} candidates" in message
    assert error.level == 3 and error.candidates == unlimited.levels[2][1]
    assert error.needed > limit and error.needed == kernel.memory_estimate(
        500, 120, 240, threads=kernel.numba.get_num_threads(), largest_domain=2, level=3,
        block=kernel.BLOCK_CANDIDATES, parents=unlimited.levels[1][2], evaluated=unlimited.evaluated_size.size)
    assert error.fits["max_level"] == 2 and error.fits["min_sup"] > 5
    assert f"min_sup ≥ {error.fits['min_sup']}" in message and "max_level 2" in message
    for option in ({"max_level": 2}, {"min_sup": error.fits["min_sup"]}):
        kernel.slice_line_local(local_t, domains, errors, memory_limit=limit, **{**kwargs, **option})


def test_data_that_cannot_fit_is_refused_before_the_search():
    local_t, domains, errors = _wide_binary(20_000, 40)
    needed = kernel.memory_estimate(20_000, 40, 80, threads=kernel.numba.get_num_threads(), largest_domain=2)
    with pytest.raises(kernel.SliceLineMemoryError) as info:
        kernel.slice_line_local(local_t, domains, errors, min_sup=200, memory_limit=needed - 1)
    assert info.value.level == 0 and 1 <= info.value.fits["features"] < 40
    assert "before any candidate" in str(info.value)


_PEAK_SCRIPT = """
import json, sys
from pathlib import Path

import numpy as np
from clipengine.kernels import sliceline as kernel


def status(key):  # bytes
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key))


m, nf, limit = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) or None
rng = np.random.default_rng(0)
local_t = rng.integers(0, 2, (nf, m)).astype(np.uint8)
errors = rng.integers(0, 2, m).astype(float)
kernel.slice_line_local(local_t[:, :100], np.full(nf, 2), errors[:100], min_sup=5, max_level=3)  # load kernels
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # peak RSS := RSS now, so the peak below is this call's
report = {"base": status("VmRSS:")}
try:
    out = kernel.slice_line_local(local_t, np.full(nf, 2), errors, min_sup=5, max_level=3, memory_limit=limit)
    report.update(levels=out.levels, evaluated=int(out.evaluated_size.size))
except kernel.SliceLineMemoryError as error:
    report.update(refused=str(error), needed=error.needed)
report["peak"] = status("VmHWM:")
report["threads"] = kernel.numba.get_num_threads()
print(json.dumps(report))
"""

needs_proc = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak RSS reset")


def _peak(m, nf, limit=0.0):
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(m), str(nf), str(limit)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@needs_proc
def test_peak_memory_of_a_wide_table_stays_within_the_estimate():
    """500 rows × 120 a/b features (2.2M level-3 candidates): the peak stays within the formula."""
    report = _peak(500, 120)
    n_cand = [level[1] for level in report["levels"]]
    assert n_cand[2] > 2_000_000
    estimate = kernel.memory_estimate(500, 120, 240, threads=report["threads"], largest_domain=2, level=3,
                                      block=min(n_cand[2], kernel.BLOCK_CANDIDATES), parents=report["levels"][1][2],
                                      evaluated=report["evaluated"])
    grown = report["peak"] - report["base"]
    assert report["evaluated"] * kernel.BYTES_PER_EVALUATED < grown <= estimate, (grown, estimate)


@needs_proc
@pytest.mark.slow
def test_the_issues_500_by_500_table_runs_within_or_is_refused_under_its_limit():
    """issue 14's 500 × 500 a/b table (it took 24 GB and was killed): under a 2 GB limit it is refused
    before level 3 (165M candidates) is allocated, and the process stays under the limit."""
    report = _peak(500, 500, 2e9)
    assert "level 3" in report["refused"] and report["needed"] > 2e9
    assert report["peak"] < 1e9  # level 2 and the count of level 3 only
