"""Feature coding: numeric bin bounds stored with the slices select exactly the rows the search
counted, non-finite values get levels of their own, and edges recode another table the same way."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from clipengine.slices.coding import code_features, code_with_edges, predicate_mask
from clipengine.slices.find import find_slices


def _table(seed: int = 0, n: int = 3000) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    height = rng.gamma(2.0, 120.0, n).round(3)
    age = rng.integers(0, 90, n)  # integers: quantile edges fall on values that rows have
    color = rng.choice(["red", "green", "blue"], n)
    error = ((height > 300) & (color == "red")) | ((age <= 12) & (color == "blue")) | (rng.random(n) < 0.05)
    return pl.DataFrame({"height": height, "age": age, "color": color, "score": rng.normal(size=n),
                         "error": error.astype(int)})


def test_stored_bounds_select_the_rows_sliceline_counted():
    frame = _table()
    result = find_slices(frame, error="error", k=10, min_sup=30, max_q=1.0)
    records = result.to_records()
    assert any("age" in r["bounds"] for r in records) and any("height" in r["bounds"] for r in records)
    for i, record in enumerate(records):
        mask = predicate_mask(frame, record["predicates"], record["bounds"])
        np.testing.assert_array_equal(mask, result.row_mask(i))
        assert mask.sum() == record["size"]


def test_bounds_are_exact_where_printed_labels_round():
    # values that differ only beyond the 6 significant digits of the labels
    values = np.array([1.0000001, 1.0000002, 1.0000003, 1.0000004] * 50)
    frame = pl.DataFrame({"x": values, "error": ([1, 1, 0, 0] * 50)})
    result = find_slices(frame, error="error", k=1, min_sup=10, bins={"x": [1.00000015, 1.00000025]}, max_q=1.0)
    record = result.to_records()[0]
    assert predicate_mask(frame, record["predicates"], record["bounds"]).sum() == record["size"]


def test_infinite_values_are_levels_of_their_own_not_part_of_a_bin():
    values = np.concatenate([np.linspace(0, 100, 200), [np.inf] * 20, [-np.inf] * 20, [np.nan] * 5])
    used, coded, _ = code_features(pl.DataFrame({"x": values}), ["x"], bins=4)
    labels = coded[0].labels
    assert labels[0] == "-inf" and "inf" in labels and labels[-1] is None
    finite_labels = [label for label, bound in zip(labels, coded[0].bounds) if bound is not None]
    assert all("inf" not in str(label) and "nan" not in str(label) for label in finite_labels)
    codes = coded[0].codes
    assert set(codes[values == np.inf]) == {labels.index("inf")}
    assert set(codes[values == -np.inf]) == {0}


def test_edges_recode_another_table_like_the_first():
    first = _table(1)
    used, coded, _ = code_features(first, ["height"], bins=6)
    height = coded[0]
    again = code_with_edges(first["height"].to_numpy(), np.asarray(height.edges), height.bin_labels)
    assert [again.labels[c] for c in again.codes] == [height.labels[c] for c in height.codes]
    other = _table(2)["height"].to_numpy()  # another run: the same bins by the same edges
    recoded = code_with_edges(other, np.asarray(height.edges), height.bin_labels)
    for code, value in zip(recoded.codes, other):
        low, high = recoded.bounds[code]
        assert low < value <= high


@pytest.mark.parametrize("value, expected", [("inf", 1), ("-inf", 1), (None, 1), (2.0, 1)])
def test_one_value_levels_match_by_value(value, expected):
    frame = pl.DataFrame({"x": [float("inf"), float("-inf"), None, 2.0]})
    assert predicate_mask(frame, {"x": value}).sum() == expected
