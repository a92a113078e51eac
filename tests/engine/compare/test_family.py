"""The compared family's definitions: level-1 slices partition the rows; reported slices are read
into the family's bins or said to be not comparable."""

import numpy as np
import polars as pl

from clipengine.compare.family import FeatureDefinition, from_record, level_one, slice_key
from clipengine.slices.coding import predicate_mask

OLD_BINS = FeatureDefinition("h", (10.0, 20.0), ("[0.0, 10.0]", "(10.0, 20.0]", "(20.0, 99.0]"), "old")


def _partition(frame: pl.DataFrame, members) -> np.ndarray:
    return np.sum([predicate_mask(frame, m.predicates, m.bounds) for m in members], axis=0)


def test_level_one_by_value_covers_every_row_once():
    old = pl.DataFrame({"x": [1.0, float("inf"), 2.0, None]})
    new = pl.DataFrame({"x": [3.0, float("-inf"), float("nan"), 1.0]})
    members = level_one(FeatureDefinition("x"), [old, new], max_levels=10)
    assert [m.predicates["x"] for m in members] == [1.0, 2.0, 3.0, "-inf", "inf", None]
    for frame in (old, new):
        assert _partition(frame, members).tolist() == [1, 1, 1, 1]
    assert level_one(FeatureDefinition("x"), [old, new], max_levels=4) == "6 values > max_levels 4"


def test_level_one_in_bins_keeps_the_old_bins_and_the_special_levels():
    old = pl.DataFrame({"h": [5.0, 15.0, 25.0, 12.0]})
    new = pl.DataFrame({"h": [150.0, 15.0, float("inf"), None, -3.0]})  # beyond the old range, inf, null
    members = level_one(OLD_BINS, [old, new], max_levels=10)
    assert [(m.predicates["h"], m.bounds.get("h")) for m in members] == [
        ("[0.0, 10.0]", (None, 10.0)), ("(10.0, 20.0]", (10.0, 20.0)), ("(20.0, 99.0]", (20.0, None)),
        ("inf", None), (None, None)]
    for frame in (old, new):
        assert _partition(frame, members).tolist() == [1] * frame.height
    # a bin no item of either run falls in is no slice
    finer = FeatureDefinition("h", (10.0, 20.0, 22.0), ("a", "b", "c", "d"), "old")
    assert [m.predicates["h"] for m in level_one(finer, [old, new], max_levels=10)] == ["a", "b", "d", "inf", None]


def test_reported_slices_are_read_into_the_family_bins():
    frame = pl.DataFrame({"h": [11.0, 12.0, 13.0, 19.0, 25.0], "c": ["a", "a", "b", "a", "a"]})
    definitions = {"h": OLD_BINS, "c": FeatureDefinition("c")}
    same = from_record({"predicates": {"h": "(10.0, 20.0]", "c": "a"}, "bounds": {"h": [10.0, 20.0]}}, definitions, frame)
    assert same.bounds == {"h": (10.0, 20.0)} and same.snapped == {}
    # a new run's own bin (11, 30]: most of its items lie in the old bin (10, 20]
    moved = from_record({"predicates": {"h": "(11.0, 30.0]", "c": "a"}, "bounds": {"h": [11.0, 30.0]}}, definitions, frame)
    assert moved.key == same.key and moved.snapped == {"h": [11.0, 30.0]}
    assert from_record({"predicates": {"z": 1}}, definitions, frame) == "feature z not compared"
    assert from_record({"predicates": {"c": "a"}, "bounds": {"c": [0, 1]}}, definitions, frame) == "c is binned in one run only"
    assert slice_key({"c": "a", "h": "x"}, {"h": (10.0, 20.0)}) == slice_key({"h": "y", "c": "a"}, {"h": [10.0, 20.0000000000001]})
