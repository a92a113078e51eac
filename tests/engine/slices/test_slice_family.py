"""The multiple-testing family: q-values that do not depend on k, held-out tests and estimates (split),
the counted lattice (lattice), and false alarms / power on many datasets (slow)."""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from clipengine.bench.slice_stats import null_frame, planted_frame
from clipengine.errors import ClipengineError
from clipengine.slices.find import find_slices


def _planted(m=4000, seed=0):
    rng = np.random.default_rng(seed)
    frame = pl.DataFrame({"a": rng.integers(0, 3, m).astype(str), "b": rng.integers(0, 4, m).astype(str),
                          "c": rng.integers(0, 2, m).astype(str)})
    inside = ((frame["a"] == "0") & (frame["b"] == "1")).to_numpy()
    return frame.with_columns(error=pl.Series((rng.random(m) < np.where(inside, 0.45, 0.1)).astype(np.int64)))


@pytest.mark.parametrize("family", ["split", "lattice"])
def test_a_slice_keeps_its_q_value_whatever_k(family):
    frame = _planted()
    seen: dict[str, set[float]] = {}
    for k in (1, 3, 10, 50):
        result = find_slices(frame, error="error", k=k, min_sup=20, family=family, max_q=1.0)
        assert len(result) == min(k, result.n_family if family == "split" else len(result))
        for i in range(len(result)):
            seen.setdefault(result.describe(i), set()).add(float(result.q_value[i]))
    assert len(seen) > 3 and all(len(q) == 1 for q in seen.values())


def test_split_tests_and_estimates_every_found_slice_on_the_held_out_rows():
    frame = _planted(seed=1)
    result = find_slices(frame, error="error", min_sup=20, k=50, max_q=1.0)
    assert result.params["family"] == "split" and len(result) == result.n_family > 3
    m = frame.height
    test = np.zeros(m, bool)  # the documented split: round(test_fraction · m) rows drawn with split_seed
    test[np.random.default_rng(0).permutation(m)[: round(0.5 * m)]] = True
    errors = frame["error"].to_numpy()
    p = []
    for i in range(len(result)):
        mask = result.row_mask(i)
        inside = errors[mask & test]
        assert result.test_size[i] == inside.size and result.size[i] == mask.sum()
        assert result.error_mean_[i] == pytest.approx(inside.mean())
        assert result.search_error_mean[i] == pytest.approx(errors[mask & ~test].mean())
        low, high = sps.binomtest(int(inside.sum()), inside.size).proportion_ci(method="wilson")
        assert (result.ci_low[i], result.ci_high[i]) == pytest.approx((low, high), abs=1e-12)
        rest = errors[~mask & test]
        table = [[inside.sum(), inside.size - inside.sum()], [rest.sum(), rest.size - rest.sum()]]
        p.append(sps.fisher_exact(table, alternative="greater").pvalue)
    np.testing.assert_allclose(result.p_value, p, rtol=1e-9)
    np.testing.assert_allclose(result.q_value, sps.false_discovery_control(p), rtol=1e-9)


def _lattice(frame, min_sup, max_level):
    """Every slice with ≥ min_sup rows and ≤ max_level predicates: its one-sided Fisher p-value."""
    errors = frame["error"].to_numpy()
    features = [c for c in frame.columns if c != "error"]
    p = {}
    for level in range(1, max_level + 1):
        for names in itertools.combinations(features, level):
            for values in itertools.product(*(sorted(frame[n].unique().to_list()) for n in names)):
                mask = np.ones(frame.height, bool)
                for name, value in zip(names, values):
                    mask &= (frame[name] == value).to_numpy()
                if mask.sum() < min_sup:
                    continue
                inside, rest = errors[mask], errors[~mask]
                table = [[inside.sum(), inside.size - inside.sum()], [rest.sum(), rest.size - rest.sum()]]
                p[frozenset(zip(names, values))] = sps.fisher_exact(table, alternative="greater").pvalue
    return p


def test_lattice_family_is_every_slice_with_enough_rows_pruned_ones_counting_with_p_one():
    frame = _planted(m=1500, seed=2)
    lattice = _lattice(frame, 20, 3)
    full_q = dict(zip(lattice, sps.false_discovery_control(list(lattice.values()))))
    for k in (2, 10):
        result = find_slices(frame, error="error", k=k, min_sup=20, max_level=3, family="lattice", max_q=1.0,
                             family_size=1)
        assert result.n_family == len(lattice)
        assert result.confidence == pytest.approx(1 - len(result) * 0.05 / len(lattice))
        for i, predicates in enumerate(result.predicates):
            key = frozenset(predicates.items())
            assert result.p_value[i] == pytest.approx(lattice[key], rel=1e-9)
            # a pruned slice counts with p = 1: never less conservative than BH over the whole lattice, never
            # more than Bonferroni
            assert full_q[key] - 1e-12 <= result.q_value[i] <= min(1.0, lattice[key] * len(lattice)) + 1e-12


def test_split_error_rates_are_not_inflated_by_the_search():
    """On null data the search picks the slice that looks worst; its error rate on the rows it was found
    on is biased upwards, the held-out one is not."""
    held_out, searched = [], []
    for seed in range(40):
        frame = null_frame(np.random.default_rng(500 + seed), 3000, n_features=5)
        result = find_slices(frame, error="error", k=1, min_sup=0.05, max_q=1.0)
        if len(result):
            held_out.append(result.error_mean_[0] - 0.1)
            searched.append(result.search_error_mean[0] - 0.1)
    held_out, searched = np.array(held_out), np.array(searched)
    se = held_out.std(ddof=1) / np.sqrt(held_out.size)
    assert held_out.size >= 30
    assert abs(held_out.mean()) < 3 * se
    assert searched.mean() > 3 * searched.std(ddof=1) / np.sqrt(searched.size)


def test_compat_searches_every_row_unless_told_otherwise():
    frame = _planted(m=1000, seed=3)
    assert find_slices(frame, error="error", compat="systemds").params["family"] == "lattice"
    assert find_slices(frame, error="error", compat="systemds", family="split").params["family"] == "split"


@pytest.mark.parametrize("kwargs, message", [
    ({"family": "bonferroni"}, "family must be one of split, lattice"),
    ({"family_size": 0}, "family_size must be an integer ≥ 1"),
    ({"test_fraction": 1.0}, "test_fraction must be in (0, 1)"),
])
def test_bad_family_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ClipengineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        find_slices(_planted(m=200), error="error", **kwargs)


def test_a_table_too_small_to_split_says_what_to_do():
    frame = pl.DataFrame({"a": ["x", "y", "x"], "error": [1, 0, 1]})
    with pytest.raises(ClipengineError, match="cannot be split .* use family lattice"):
        find_slices(frame, error="error", min_sup=1, test_fraction=0.1)


# ---- many datasets ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_null_datasets_give_a_significant_slice_in_at_most_5_percent():
    """200 null datasets: the share with any q ≤ 0.05 slice, for every k and min_sup (default family)."""
    alarms = {(k, s): 0 for k in (5, 10, 50) for s in (0.01, 0.05)}
    datasets = 200
    for seed in range(datasets):
        frame = null_frame(np.random.default_rng(10_000 + seed), 5000)
        for (k, min_sup) in alarms:
            result = find_slices(frame, error="error", k=k, min_sup=min_sup)
            alarms[k, min_sup] += bool(np.any(result.q_value <= 0.05))
    assert all(count / datasets <= 0.05 for count in alarms.values()), alarms


@pytest.mark.slow
@pytest.mark.parametrize("level", [2, 3])
def test_planted_slices_are_found_at_100k_rows(level):
    """Support 2 %, error 0.1 → 0.4: the planted slice itself reported with q ≤ 0.05 in ≥ 80 % of datasets."""
    datasets, found = 40, 0
    for seed in range(datasets):
        frame, planted, _ = planted_frame(np.random.default_rng(20_000 + 100 * level + seed), 100_000, level)
        result = find_slices(frame, error="error")
        found += any(p == planted and q <= 0.05 for p, q in zip(result.predicates, result.q_value))
    assert found / datasets >= 0.8, found


def test_an_adjusted_interval_level_is_never_printed_as_100_percent():
    """The lattice family's false-coverage-rate level can be 0.99999: the header says 99.999 %, not 100 %."""
    from clipengine.cli.slices import percent_below_100

    assert [percent_below_100(x) for x in (0.95, 0.975, 0.999987, 0.99996, 1.0)] == ["95", "97.5", "99.999", "99.996", "100"]
