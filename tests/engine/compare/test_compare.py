"""Comparing two runs: planted regressions found, no false alarms between runs of one error
distribution, one definition for both runs, new/gone, mismatches stated, item-level changes, drift.

The statistical claims are checked over many seeds on the comparison itself (``compare_sides``)
with runs made here: the slices each run reports are found by the real SliceLine, as a run
directory's ``slices.json`` would hold them. The long loops are marked slow.
"""

import numpy as np
import polars as pl
import pytest

from clipengine.compare.stage import compare_runs, compare_sides
from clipengine.config import CompareConfig

from tests.fixtures_compare import (
    ATTRIBUTES,
    PLANTED,
    SCHEMA_CONTENT,
    in_slice,
    make_items,
    planted_errors,
    run_side,
    weak_slice_rates,
    write_run_dir,
)

N_ITEMS = 5000


def _planted_record(comparison):
    found = [r for r in comparison.slices if r["predicates"] == PLANTED]
    return found[0] if found else None


def planted_outcome(seed: int):
    rng = np.random.default_rng(seed)
    items = make_items(rng, N_ITEMS)
    old, new = planted_errors(rng, items)
    return compare_sides(run_side("old", items, old), run_side("new", items, new))


def null_outcome(seed: int, *, shared_items: bool):
    """Two runs whose errors come from one distribution: the same items drawn twice, or other items."""
    rng = np.random.default_rng(seed)
    items = make_items(rng, N_ITEMS)
    old = (rng.random(N_ITEMS) < weak_slice_rates(items)).astype(float)
    other = items if shared_items else make_items(rng, N_ITEMS, prefix="other")
    new = (rng.random(N_ITEMS) < weak_slice_rates(other)).astype(float)
    return compare_sides(run_side("old", items, old), run_side("new", other, new))


def _is_found(record) -> bool:
    return bool(record and record["status"] == "worse" and record["q_value"] <= 0.05)


# ---- planted regressions and no false alarms ------------------------------------------------------
def test_planted_regression_is_worse_and_explained():
    comparison = planted_outcome(0)
    record = _planted_record(comparison)
    assert _is_found(record), record
    assert record["old_size"] == record["new_size"] == record["matched"]  # the same images: paired
    assert record["test"] == "mcnemar-mid-p"
    assert record["ci_low"] > 0 and record["ci_low"] < record["diff"] < record["ci_high"]
    from clipengine.slices.stats import wilson_interval

    for side in ("old", "new"):
        low, high = wilson_interval(record[f"{side}_error_mean"] * record[f"{side}_size"], record[f"{side}_size"])
        assert record[f"{side}_ci"] == pytest.approx([low, high])
    # outside the planted slice nothing changed: every other worse slice overlaps it
    worse = [r for r in comparison.slices if r["status"] == "worse"]
    assert all(r["newly_failing"] > 0 for r in worse)
    assert comparison.facts["items"]["newly_failing"] == record["newly_failing"]
    assert not [r for r in comparison.drift if r["finding"]]


@pytest.mark.slow
def test_planted_regression_is_found_in_90_percent_of_50_seeds():
    found = sum(_is_found(_planted_record(planted_outcome(seed))) for seed in range(50))
    assert found >= 45, found


def _slice_findings(comparison) -> list[dict]:
    """Every slice the comparison calls a change: worse, better, or a new weak slice."""
    return [r for r in comparison.slices if r["finding"]]


def test_one_distribution_gives_no_finding_on_a_few_seeds():
    for seed in range(3):
        comparison = null_outcome(seed, shared_items=True)
        assert not _slice_findings(comparison), seed
        assert all(r["status"] == "unchanged" for r in comparison.slices)


@pytest.mark.slow
@pytest.mark.parametrize("shared_items", [True, False], ids=["same-items", "other-items"])
def test_one_distribution_gives_no_finding_in_95_percent_of_200_seeds(shared_items):
    comparisons = [null_outcome(seed, shared_items=shared_items) for seed in range(200)]
    alarms = sum(bool(_slice_findings(c)) for c in comparisons)
    assert alarms <= 10, alarms
    # other items from one distribution: the χ² tests hold their level (BH at 0.05 over 5 attributes
    # allows about 10 of 200; five tests without q-values would give about 45)
    drift_alarms = sum(any(r["finding"] for r in c.drift) for c in comparisons)
    assert drift_alarms <= 20, drift_alarms


def test_slices_chosen_by_a_runs_errors_pay_for_the_search():
    comparison = null_outcome(7, shared_items=False)  # no shared item: no change search
    assert comparison.facts["family"]["change_search"]["items"] == 0
    for record in comparison.slices:
        reported_only = not record["level_one"] and record["change_search"] is None
        if not reported_only:
            assert record["selection"] == 1
            continue
        expected = ((comparison.facts["old"]["candidates_evaluated"] if record["reported"]["old"] else 0)
                    + (comparison.facts["new"]["candidates_evaluated"] if record["reported"]["new"] else 0))
        assert record["selection"] == expected > 1
    tested = [r for r in comparison.slices if r["p_value"] is not None]
    adjusted = np.minimum(1, np.array([r["p_value"] * r["selection"] for r in tested]))
    from clipengine.slices.stats import benjamini_hochberg

    np.testing.assert_allclose([r["q_value"] for r in tested], benjamini_hochberg(adjusted))


# ---- one definition for both runs ---------------------------------------------------------------
def test_numeric_features_use_the_old_runs_bins_in_both_runs():
    rng = np.random.default_rng(5)
    old_items = make_items(rng, 3000)
    new_items = make_items(rng, 3000, prefix="new").with_columns(pl.col("box_height") * 1.6)  # boxes grew
    old = run_side("old", old_items, (rng.random(3000) < 0.1).astype(float))
    new_errors = (rng.random(3000) < np.where(new_items["box_height"].to_numpy() > 250, 0.5, 0.1)).astype(float)
    new = run_side("new", new_items, new_errors)
    assert old.binned["box_height"]["edges"] != new.binned["box_height"]["edges"]
    comparison = compare_sides(old, new)
    assert comparison.facts["features"]["box_height"] == {"binned_by": "old"}
    edges = np.asarray(old.binned["box_height"]["edges"])
    level_one = [r for r in comparison.slices if r["level_one"] and list(r["predicates"]) == ["box_height"]]
    assert len(level_one) == len(edges) + 1
    new_codes = np.searchsorted(edges, new_items["box_height"].to_numpy(), side="left")
    for record in level_one:
        low, high = record["bounds"]["box_height"]
        index = int(np.searchsorted(edges, high, side="left")) if high is not None else len(edges)
        assert record["predicates"]["box_height"] == old.binned["box_height"]["labels"][index]
        assert record["new_size"] == int((new_codes == index).sum())
    # the new run's own slices on box_height were moved onto the old bins, and say so
    snapped = [r for r in comparison.slices if "snapped" in r]
    assert snapped and all(r["reported"]["new"] for r in snapped)
    for record in snapped:
        low, high = record["bounds"]["box_height"]
        assert (low is None or low in edges) and (high is None or high in edges)
    drift = {r["attribute"]: r for r in comparison.drift}
    assert drift["box_height"]["finding"] and drift["box_height"]["psi"] > 0.25
    assert [level["level"] for level in drift["box_height"]["levels"]] == old.binned["box_height"]["labels"]


def test_new_and_gone_slices():
    rng = np.random.default_rng(6)
    old_items = make_items(rng, 4000)
    new_items = make_items(rng, 4000, prefix="new")
    # the new run has hail (a weak condition) and no snow
    hail = np.flatnonzero((new_items["weather"] == "snow").to_numpy())
    new_items = new_items.with_columns(pl.Series("weather", np.where(np.isin(np.arange(4000), hail), "hail",
                                                                     new_items["weather"].to_numpy())))
    old = run_side("old", old_items, (rng.random(4000) < 0.1).astype(float))
    new_errors = (rng.random(4000) < np.where(np.isin(np.arange(4000), hail), 0.4, 0.1)).astype(float)
    comparison = compare_sides(old, run_side("new", new_items, new_errors))
    by_slice = {tuple(r["predicates"].items()): r for r in comparison.slices}
    gone = by_slice[(("weather", "snow"),)]
    assert gone["status"] == "gone" and gone["new_size"] == 0 and gone["p_value"] is None and not gone["finding"]
    new = by_slice[(("weather", "hail"),)]
    assert new["status"] == "new" and new["old_size"] == 0 and new["new_size"] == len(hail)
    assert new["finding"] and new["q_value"] <= 0.05 and new["diff"] > 0.2
    assert new["test"] == "fisher-exact vs rest of new run"
    assert new in comparison.findings(("new",)) and new not in comparison.findings(("worse",))


# ---- mismatches --------------------------------------------------------------------------------
def test_different_labelling_models_compare_only_the_dataset_features():
    rng = np.random.default_rng(8)
    items = make_items(rng, 2000)
    errors = (rng.random(2000) < 0.1).astype(float)
    comparison = compare_sides(run_side("old", items, errors, model_id="clip-a"),
                               run_side("new", items, errors, model_id="clip-b"))
    reasons = {(m["what"], m["name"]): m["reason"] for m in comparison.mismatches}
    assert "labels made by different models (clip-a → clip-b)" in reasons[("model", "model_id")]
    for attribute in ATTRIBUTES:
        assert "different models" in reasons[("attribute", attribute)]
    compared = {f for r in comparison.slices for f in r["predicates"]}
    assert compared == {"box_height"}
    assert [r["attribute"] for r in comparison.drift] == ["box_height"]
    assert all(entry["reason"].startswith("feature") for entry in comparison.not_compared)
    assert comparison.not_compared  # the reported slices on attributes are listed, not dropped silently


def test_a_changed_schema_entry_leaves_that_attribute_out(tmp_path):
    rng = np.random.default_rng(9)
    items = make_items(rng, 2000)
    errors = (rng.random(2000) < 0.1).astype(float)
    changed = {**SCHEMA_CONTENT, "attributes": [dict(a) for a in SCHEMA_CONTENT["attributes"]]}
    changed["attributes"][1]["classes"] = [{"name": "bright", "prompts": ["a sunny photo"]},
                                           {"name": "dark", "prompts": ["a dim photo"]}]
    old_dir = write_run_dir(tmp_path / "old", items, errors)
    new_dir = write_run_dir(tmp_path / "new", items, errors, schema_content=changed)
    comparison = compare_runs(old_dir, new_dir)
    assert [(m["what"], m["name"]) for m in comparison.mismatches if m["what"] == "attribute"] == [("attribute", "tone")]
    compared = {f for r in comparison.slices for f in r["predicates"]}
    assert "tone" not in compared and {"scene", "weather", "time", "box_height"} <= compared


def test_a_feature_whose_values_changed_kind_is_left_out():
    rng = np.random.default_rng(14)
    items = make_items(rng, 2000)
    errors = (rng.random(2000) < 0.1).astype(float)
    as_text = items.with_columns(pl.col("box_height").round(0).cast(pl.Int64).cast(pl.String) + " px")
    comparison = compare_sides(run_side("old", items, errors), run_side("new", as_text, errors))
    assert {(m["what"], m["name"], m["reason"]) for m in comparison.mismatches} == {
        ("feature", "box_height", "number values → text values")}
    assert all("box_height" not in r["predicates"] for r in comparison.slices)
    assert "box_height" not in [r["attribute"] for r in comparison.drift]


def test_errors_of_different_kinds_are_not_compared():
    rng = np.random.default_rng(10)
    items = make_items(rng, 2000)
    comparison = compare_sides(run_side("old", items, (rng.random(2000) < 0.1).astype(float)),
                               run_side("new", items, rng.gamma(1.0, 0.2, 2000)))
    assert comparison.slices == []
    assert any(m["what"] == "errors" for m in comparison.mismatches)
    assert comparison.drift  # the data itself is still compared


# ---- items and continuous errors ------------------------------------------------------------------
def _members(items: pl.DataFrame, record: dict) -> np.ndarray:
    """A compared slice's items, computed here from its predicates and bounds."""
    inside = in_slice(items, {k: v for k, v in record["predicates"].items() if k not in record["bounds"]})
    for name, (low, high) in record["bounds"].items():
        values = items[name].to_numpy()
        inside &= (values > (-np.inf if low is None else low)) & (values <= (np.inf if high is None else high))
    return inside


def test_item_changes_by_slice():
    rng = np.random.default_rng(11)
    items = make_items(rng, 3000)
    old, new = planted_errors(rng, items)
    keep = np.ones(3000, bool)
    keep[:200] = False  # 200 items only in the old run
    # the dataset's box heights were re-measured for every fifth item: some items change bins
    heights = items["box_height"].to_numpy() * np.where(np.arange(3000) % 5 == 0, 1.4, 1.0)
    new_items = items.with_columns(pl.Series("box_height", heights)).filter(pl.Series(keep))
    comparison = compare_sides(run_side("old", items, old), run_side("new", new_items, new[keep]))
    facts = comparison.facts["items"]
    assert facts["matched"] == 2800 and facts["old_only"] == 200 and facts["new_only"] == 0
    shared_old, shared_new = old[keep], new[keep]
    assert facts["newly_failing"] == int(((shared_old == 0) & (shared_new == 1)).sum())
    assert facts["fixed"] == int(((shared_old == 1) & (shared_new == 0)).sum())
    partly = 0
    for record in comparison.slices:
        # an item counts for a slice when it is in the slice in both runs
        inside = _members(items, record)[keep] & _members(new_items, record)
        assert record["matched"] == int(inside.sum())
        assert record["newly_failing"] == int((inside & (shared_old == 0) & (shared_new == 1)).sum())
        assert record["fixed"] == int((inside & (shared_old == 1) & (shared_new == 0)).sum())
        if record["old_size"] > record["matched"] and record["new_size"]:
            assert record["test"] == "partial-overlap-t"
            partly += 1
    assert partly
    assert any(r["matched"] < r["new_size"] for r in comparison.slices if "box_height" in r["predicates"])
    table = comparison.items
    assert table.height == facts["changed"] and set(table["change"].unique()) <= {"newly failing", "fixed", "changed"}
    examples = comparison.facts["items"]["newly_failing_examples"]
    assert examples and examples[0]["path"] in set(table.filter(pl.col("change") == "newly failing")["path"])


def test_continuous_errors_are_compared_with_t_tests():
    rng = np.random.default_rng(12)
    items = make_items(rng, 3000)
    old = rng.gamma(2.0, 0.2, 3000)
    new = np.abs(old + rng.normal(0, 0.05, 3000))  # errors are ≥ 0
    new[in_slice(items, PLANTED)] += 0.3
    comparison = compare_sides(run_side("old", items, old), run_side("new", items, new))
    record = _planted_record(comparison)
    assert record["status"] == "worse" and record["test"] == "paired-t"
    assert record["diff"] == pytest.approx(0.3, abs=0.05)
    assert not comparison.facts["binary_errors"]


# ---- drift ------------------------------------------------------------------------------------
def _biased_subset(seed: int):
    """The old run's items, and a new run on a subset kept with probability 0.9 for fog, 0.4 otherwise."""
    rng = np.random.default_rng(seed)
    items = make_items(rng, N_ITEMS)
    errors = (rng.random(N_ITEMS) < 0.1).astype(float)
    keep = rng.random(N_ITEMS) < np.where((items["weather"] == "fog").to_numpy(), 0.9, 0.4)
    return compare_sides(run_side("old", items, errors), run_side("new", items.filter(pl.Series(keep)), errors[keep]))


@pytest.mark.parametrize("seed", [0, 1])
def test_a_subset_biased_toward_one_value_drifts_on_that_attribute_only(seed):
    comparison = _biased_subset(seed)
    drifted = [r["attribute"] for r in comparison.drift if r["finding"]]
    assert drifted == ["weather"]
    weather = next(r for r in comparison.drift if r["attribute"] == "weather")
    fog = next(level for level in weather["levels"] if level["level"] == "fog")
    assert fog["new_share"] > fog["old_share"] * 1.5


@pytest.mark.slow
def test_a_biased_subset_drifts_on_that_attribute_only_over_50_seeds():
    outcomes = [[r["attribute"] for r in _biased_subset(seed).drift if r["finding"]] for seed in range(50)]
    assert all(drifted == ["weather"] for drifted in outcomes), outcomes


def test_min_psi_and_min_diff_gate_findings():
    rng = np.random.default_rng(13)
    items = make_items(rng, N_ITEMS)
    old, new = planted_errors(rng, items)
    old_side, new_side = run_side("old", items, old), run_side("new", items, new)
    strict = compare_sides(old_side, new_side, CompareConfig(min_diff=0.5))
    assert not strict.findings(("worse",))
    assert all(r["status"] in ("unchanged", "gone", "new") for r in strict.slices)
    loose = compare_sides(old_side, new_side, CompareConfig(min_diff=0.1))
    assert {tuple(r["predicates"]) for r in loose.findings(("worse",))} >= {tuple(PLANTED)}
    assert all(abs(r["diff"]) >= 0.1 for r in loose.findings(("worse",)))


def test_pairs_of_conditions_the_new_run_no_longer_covers_are_listed():
    rng = np.random.default_rng(8)
    old_items = make_items(rng, 3000)
    new_items = make_items(rng, 3000, prefix="new")
    foggy_nights = in_slice(new_items, {"weather": "fog", "time": "night"})
    new_items = new_items.with_columns(pl.Series("time", np.where(foggy_nights, "day", new_items["time"].to_numpy())))
    errors = (rng.random(3000) < 0.1).astype(float)
    comparison = compare_sides(run_side("old", old_items, errors), run_side("new", new_items, errors))
    coverage = comparison.to_dict()["coverage"]
    assert coverage["t"] == 2 and set(coverage["features"]) == set(ATTRIBUTES)
    missing = [c["predicates"] for c in coverage["newly_missing"]["combinations"]]
    assert missing == [{"weather": "fog", "time": "night"}]
    assert coverage["newly_missing"]["total"] == 1 and coverage["newly_covered"]["total"] == 0
