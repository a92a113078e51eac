"""The coverage kernels against brute force: every combination counted row by row in plain Python."""

import itertools
from collections import Counter

import numpy as np
import pytest

from clipengine.kernels.coverage import (
    count_combinations,
    excluded_combinations,
    expected_shares,
    flagged_below,
    plan_combinations,
    sum_combinations,
    value_offsets,
)


def brute_counts(codes, domains, t, weights=None, values=None):
    """{(set, values): count or weighted sum} by walking every row of every t-feature set."""
    f, m = codes.shape
    out = {}
    for features in itertools.combinations(range(f), t):
        tally = Counter()
        for r in range(m):
            row = tuple(int(codes[j, r]) for j in features)
            if min(row) < 0:
                continue
            weight = 1.0 if weights is None else float(np.prod([float(weights[j, r]) for j in features]))
            tally[row] += weight * (1.0 if values is None else float(values[r]))
        for combination in itertools.product(*(range(int(domains[j])) for j in features)):
            out[(features, combination)] = tally.get(combination, 0)
    return out


def flat(plan, table):
    """The brute-force table in the kernel's flat order."""
    out = np.zeros(plan.n_combinations)
    for s, features in enumerate(plan.sets.tolist()):
        for local, combination in enumerate(itertools.product(*(range(int(plan.domains[j])) for j in features))):
            out[plan.set_offsets[s] + local] = table[(tuple(features), combination)]
    return out


def random_table(seed, m, domains, unknown=(), planted=()):
    """Codes (f, m) int16 with -1 in the `unknown` features' rows now and then, and each planted
    combination ((features), (values)) removed by moving its last feature to another value."""
    rng = np.random.default_rng(seed)
    domains = np.asarray(domains, np.int64)
    codes = np.stack([rng.integers(0, d, m) for d in domains]).astype(np.int16)
    for features, values in planted:
        hit = np.all([codes[j] == v for j, v in zip(features, values)], axis=0)
        last = features[-1]
        codes[last, hit] = (values[-1] + 1) % domains[last]
    for j in unknown:
        codes[j, rng.random(m) < 0.15] = -1
    return codes, domains


CASES = {
    # name: (seed, rows, domains, features with unknown rows, planted missing combinations)
    "binary": (1, 700, [2, 2, 2, 2, 2, 2], (), [((0, 1, 2), (1, 1, 1))]),
    "mixed": (2, 1500, [3, 2, 5, 4, 2, 6], (1, 4),
              [((0, 2), (2, 4)), ((1, 3, 5), (0, 2, 5)), ((0, 2, 3, 5), (1, 1, 1, 1))]),
    "wide-and-single": (3, 900, [10, 1, 9, 3, 2], (0, 3), [((0, 2), (9, 8)), ((0, 2, 3, 4), (2, 3, 1, 0))]),
    "all-unknown-values": (4, 400, [4, 3, 3, 5, 2], (0, 1, 2, 3, 4), [((2, 3, 4), (0, 0, 0))]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_counts_match_brute_force_t1_to_t4(name):
    seed, m, domains, unknown, planted = CASES[name]
    codes, domains = random_table(seed, m, domains, unknown, planted)
    # small blocks and chunks: several blocks per chunk and several chunks, a partial last block
    levels = count_combinations(codes, domains, 4, block_rows=512, chunk_rows=1024, threads=2)
    assert [plan.t for plan, _ in levels] == [1, 2, 3, 4]
    for plan, counts in levels:
        expected = flat(plan, brute_counts(codes, domains, plan.t))
        np.testing.assert_array_equal(counts, expected, err_msg=f"t = {plan.t}")
        assert counts.dtype == np.int64
    for features, values in planted:  # each planted hole is there, and is counted as 0
        plan, counts = levels[len(features) - 1]
        s = [tuple(x) for x in plan.sets.tolist()].index(tuple(features))
        local = np.ravel_multi_index(values, domains[list(features)])
        assert counts[plan.set_offsets[s] + local] == 0


def test_counts_do_not_depend_on_blocks_chunks_or_threads():
    codes, domains = random_table(5, 5000, [3, 4, 2, 6, 5, 2, 3], unknown=(2,))
    reference = count_combinations(codes, domains, 3, block_rows=512, chunk_rows=512, threads=1)
    for block_rows, chunk_rows, threads in ((None, 1 << 18, 2), (4096, 4096, 2), (1024, 3072, 1)):
        other = count_combinations(codes, domains, 3, block_rows=block_rows, chunk_rows=chunk_rows, threads=threads)
        for (_, a), (_, b) in zip(reference, other):
            np.testing.assert_array_equal(a, b)


def test_count_reports_progress_per_chunk_and_restores_threads():
    import numba

    codes, domains = random_table(6, 3000, [2, 3, 2])
    seen = []
    before = numba.get_num_threads()
    count_combinations(codes, domains, 2, block_rows=512, chunk_rows=1024, threads=1, on_rows=seen.append)
    assert sum(seen) == 3000 and len(seen) == 3
    assert numba.get_num_threads() == before


@pytest.mark.parametrize("t", [1, 2, 3])
def test_weighted_sums_match_brute_force(t):
    codes, domains = random_table(7, 800, [3, 2, 4, 10, 2], unknown=(1, 3))
    rng = np.random.default_rng(8)
    weights = rng.random(codes.shape).astype(np.float32)
    values = np.stack([np.ones(codes.shape[1]), rng.random(codes.shape[1])])
    plan, sums = sum_combinations(codes, domains, t, values=values, weights=weights, block_rows=512, chunk_rows=1024)
    for r in range(2):
        expected = flat(plan, brute_counts(codes, domains, t, weights=weights, values=values[r]))
        np.testing.assert_allclose(sums[r], expected, rtol=1e-9, atol=1e-9)
    _, unweighted = sum_combinations(codes, domains, t, values=values[:1])
    np.testing.assert_array_equal(unweighted[0], count_combinations(codes, domains, t)[-1][1])


def test_expected_shares_are_products_of_marginal_shares():
    domains = np.array([3, 2, 4])
    rng = np.random.default_rng(9)
    shares = rng.random(int(domains.sum()))
    offsets = value_offsets(domains)
    plan = plan_combinations(domains, 2)
    out = expected_shares(plan, shares)
    for s, (a, b) in enumerate(plan.sets.tolist()):
        for local, (u, v) in enumerate(itertools.product(range(domains[a]), range(domains[b]))):
            assert out[plan.set_offsets[s] + local] == pytest.approx(shares[offsets[a] + u] * shares[offsets[b] + v])


def test_excluded_combinations_contain_a_rule():
    domains = np.array([4, 2, 2, 3])
    offsets = value_offsets(domains)
    # rule 0: f0 = 3 AND f2 = 1; rule 1: f1 in {0, 1} AND f3 = 2 AND f0 = 0 (three features)
    rules = [{0: {3}, 2: {1}}, {1: {0, 1}, 3: {2}, 0: {0}}]
    rule_features = np.full((2, 3), -1, np.int32)
    rule_values = np.zeros((2, int(offsets[-1])), bool)
    for r, rule in enumerate(rules):
        for k, (feature, allowed) in enumerate(rule.items()):
            rule_features[r, k] = feature
            for v in allowed:
                rule_values[r, offsets[feature] + v] = True
    for t in (1, 2, 3, 4):
        plan = plan_combinations(domains, t)
        out = excluded_combinations(plan, rule_features, rule_values)
        for s, features in enumerate(plan.sets.tolist()):
            for local, combination in enumerate(itertools.product(*(range(domains[j]) for j in features))):
                given = dict(zip(features, combination))
                hit = any(all(f in given and given[f] in allowed for f, allowed in rule.items()) for rule in rules)
                assert out[plan.set_offsets[s] + local] == hit, (features, combination)


def test_flagged_below_finds_a_flagged_sub_combination():
    domains = np.array([2, 3, 2, 2])
    rng = np.random.default_rng(10)
    for t in (2, 3, 4):
        plan, lower = plan_combinations(domains, t), plan_combinations(domains, t - 1)
        lower_flag = rng.random(lower.n_combinations) < 0.2
        index = np.arange(plan.n_combinations)
        out = flagged_below(plan, lower, index, lower_flag)
        lower_index = {}
        for s, features in enumerate(lower.sets.tolist()):
            for local, combination in enumerate(itertools.product(*(range(domains[j]) for j in features))):
                lower_index[(tuple(features), combination)] = lower.set_offsets[s] + local
        for s, features in enumerate(plan.sets.tolist()):
            for local, combination in enumerate(itertools.product(*(range(domains[j]) for j in features))):
                subs = [(tuple(np.delete(features, j)), tuple(np.delete(combination, j))) for j in range(t)]
                expected = any(lower_flag[lower_index[sub]] for sub in subs)
                assert out[plan.set_offsets[s] + local] == expected


def test_plan_decodes_its_own_layout():
    domains = np.array([3, 1, 4, 2])
    plan = plan_combinations(domains, 3)
    index = np.arange(plan.n_combinations)
    sets, values = plan.decode(index)
    rebuilt = plan.set_offsets[sets] + [np.ravel_multi_index(v, domains[plan.sets[s]]) for s, v in zip(sets, values)]
    np.testing.assert_array_equal(rebuilt, index)
    assert plan.n_sets == 4 and plan.group_sets.tolist() == [0, 2, 3, 4]


def test_bad_inputs_raise():
    codes = np.zeros((3, 10), np.int16)
    with pytest.raises(ValueError, match="int16"):
        count_combinations(codes.astype(np.int32), [1, 1, 1], 2)
    with pytest.raises(ValueError, match="domains"):
        count_combinations(codes, [1, 1], 2)
    with pytest.raises(ValueError, match="t must be"):
        count_combinations(codes, [1, 1, 1], 4)
    with pytest.raises(ValueError, match="multiple of 512"):
        count_combinations(codes, [1, 1, 1], 2, block_rows=100)
