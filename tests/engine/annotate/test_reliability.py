"""Reliability from a labelled sample: weighted Wilson intervals, the counts behind them, which labels
are judged (out-of-fold for adapted attributes), and the unreliable mark."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from clipengine import artifacts
from clipengine.annotate.reliability import evaluate_labels, weighted_wilson
from clipengine.errors import ClipengineError

SCHEMA = {"format": 1, "attributes": [
    {"name": "time", "kind": "exclusive", "positive": None, "strategy": "mean", "top_m": 1,
     "classes": [{"name": "day", "prompts": ["day"]}, {"name": "night", "prompts": ["night"]}]},
    {"name": "weather", "kind": "exclusive", "positive": None, "strategy": "mean", "top_m": 1,
     "classes": [{"name": "rain", "prompts": ["rain"]}, {"name": "sun", "prompts": ["sun"]},
                 {"name": "snow", "prompts": ["snow"]}]},
]}


def test_uniform_weights_give_wilsons_interval():
    # Wilson's 95 % interval for 8 of 10: 0.4902 – 0.9433 (Newcombe 1998, table I)
    estimate, low, high = weighted_wilson(np.array([1] * 8 + [0] * 2, bool), np.full(10, 3.0))
    assert estimate == pytest.approx(0.8) and low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)
    assert weighted_wilson(np.ones(5, bool), np.ones(5))[2] == 1.0
    assert weighted_wilson(np.zeros(0, bool), np.zeros(0))[1:] == (0.0, 1.0)


def test_unequal_weights_shift_the_estimate_and_shrink_the_effective_size():
    hits = np.array([1, 1, 0, 0], bool)
    weights = np.array([1.0, 1.0, 4.0, 4.0])
    estimate, low, high = weighted_wilson(hits, weights)
    assert estimate == pytest.approx(0.2)
    n_eff = 10.0 ** 2 / 34.0
    z = 1.959963984540054
    centre = (0.2 + z * z / (2 * n_eff)) / (1 + z * z / n_eff)
    half = z * np.sqrt(0.2 * 0.8 / n_eff + z * z / (4 * n_eff ** 2)) / (1 + z * z / n_eff)
    assert low == pytest.approx(centre - half) and high == pytest.approx(centre + half)


def write_metadata(path, labels, *, sources=None, record=None):
    table = pl.DataFrame({"path": [f"img{i}.png" for i in range(len(labels["time"]))], **labels,
                          **{f"{k}_source": v for k, v in (sources or {}).items()}})
    meta = {artifacts.META_SCHEMA_CONTENT: json.dumps(SCHEMA), **(record or {})}
    artifacts.write_metadata(path, table, meta)
    return path


def test_precision_recall_and_accuracy_counted_by_hand(tmp_path):
    # model: day day day night day (night) ; truth: day night night night day (row 5 unlabelled)
    metadata = write_metadata(tmp_path / "metadata.parquet", {
        "time": ["day", "day", "day", "night", "day", "night"], "weather": ["sun"] * 6})
    labels = tmp_path / "labels.csv"
    labels.write_text("path,true_time\nimg0.png,day\nimg1.png,night\nimg2.png,night\nimg3.png,night\nimg4.png,day\n"
                      "img5.png,\n")
    report = evaluate_labels(metadata, labels)
    [time] = report.attributes
    assert time.served == "zero-shot" and time.n == 5
    assert time.accuracy("zero_shot")[0] == pytest.approx(3 / 5)
    assert time.precision("zero_shot", 0)[0] == pytest.approx(2 / 4)  # labelled day: img0-2, img4
    assert time.recall("zero_shot", 0)[0] == pytest.approx(2 / 2)  # true day: img0, img4
    assert time.precision("zero_shot", 1)[0] == pytest.approx(1 / 1)
    assert time.recall("zero_shot", 1)[0] == pytest.approx(1 / 3)
    table = report.to_polars()
    overall = table.filter(pl.col("class") == "(all)").row(0, named=True)
    assert overall["zero_shot_accuracy"] == pytest.approx(0.6) and overall["reliable"] == "no"
    assert overall["zero_shot_accuracy_low"] < 0.6 < overall["zero_shot_accuracy_high"]
    night = table.filter(pl.col("class") == "night").row(0, named=True)
    assert night["labelled"] == 3 and night["zero_shot_predicted"] == 1 and night["reliable"] == "no"
    assert night["zero_shot_f1"] == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3))


def test_an_attribute_is_reliable_when_every_assigned_class_has_a_good_precision_interval(tmp_path):
    model = ["day"] * 40 + ["night"] * 40
    metadata = write_metadata(tmp_path / "metadata.parquet", {"time": model, "weather": ["sun"] * 80})
    labels = tmp_path / "labels.csv"
    labels.write_text("path,true_time\n" + "".join(f"img{i}.png,{model[i]}\n" for i in range(0, 80, 2)))
    assert evaluate_labels(metadata, labels).attributes[0].judgement()[0] is True
    assert evaluate_labels(metadata, labels, min_precision=0.9).attributes[0].judgement()[0] is False
    # a class the model assigns but no labelled item got: its precision is unknown, so not reliable
    labels.write_text("path,true_time\n" + "".join(f"img{i}.png,day\n" for i in range(0, 40, 2)))
    reliable, why = evaluate_labels(metadata, labels).attributes[0].judgement()
    assert not reliable and "precision of 'night' not measured" in why


def test_non_uniform_inclusion_weights_the_estimates(tmp_path):
    metadata = write_metadata(tmp_path / "metadata.parquet", {"time": ["day"] * 4, "weather": ["sun"] * 4})
    labels = tmp_path / "labels.csv"
    labels.write_text("path,true_time,inclusion_prob\nimg0.png,day,0.5\nimg1.png,day,0.5\nimg2.png,night,0.125\n"
                      "img3.png,night,0.125\n")
    [time] = evaluate_labels(metadata, labels).attributes
    assert time.accuracy("zero_shot")[0] == pytest.approx(4 / 20)  # weights 2, 2, 8, 8


def test_adapted_labels_are_judged_out_of_fold_not_on_the_persons_own_labels(tmp_path):
    checks = {"time": {"rows": [0, 1, 2, 3], "inclusion": [0.5] * 4, "truth": ["day", "night", "night", "day"],
                       "zero_shot": ["night", "night", "day", "day"], "served": ["day", "day", "night", "day"]}}
    record = {artifacts.META_ADAPTATION: json.dumps({"time": {"method": "gda", "n_labels": 4, "cv_accuracy": 0.75,
                                                                "reason": "gda won"}}),
              artifacts.META_LABEL_CHECKS: json.dumps(checks)}
    # the file holds the person's labels on rows 0-3 (all "right" by construction)
    metadata = write_metadata(tmp_path / "metadata.parquet",
                              {"time": ["day", "night", "night", "day", "day", "night", "day", "day"],
                               "weather": ["sun"] * 8},
                              sources={"time": ["human"] * 4 + ["model"] * 4}, record=record)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,true_time,inclusion_prob\nimg0.png,day,0.5\nimg1.png,night,0.5\nimg2.png,night,0.5\n"
                      "img3.png,day,0.5\n")
    [time] = evaluate_labels(metadata, labels).attributes
    assert time.served == "gda" and time.served_labeller == "adapted"
    assert time.accuracy("adapted")[0] == pytest.approx(3 / 4)  # the out-of-fold labels, not 4 / 4
    assert time.accuracy("zero_shot")[0] == pytest.approx(2 / 4)
    # a labelled item with a person's label but no recorded model label cannot be judged
    other = tmp_path / "other.csv"
    other.write_text("path,true_time\nimg0.png,day\nimg5.png,night\n")
    checks["time"] = {k: v[1:] for k, v in checks["time"].items()}
    write_metadata(metadata, {"time": ["day", "night", "night", "day", "day", "night", "day", "day"],
                              "weather": ["sun"] * 8},
                   sources={"time": ["human"] * 4 + ["model"] * 4},
                   record={**record, artifacts.META_LABEL_CHECKS: json.dumps(checks)})
    with pytest.raises(ClipengineError, match="'img0.png' holds a person's label for 'time'"):
        evaluate_labels(metadata, other)


def test_an_independent_sample_judges_adapted_labels_by_the_file(tmp_path):
    """Items not used to fit are judged by the served label in the file; zero-shot is then unknown."""
    record = {artifacts.META_ADAPTATION: json.dumps({"time": {"method": "tip", "n_labels": 2}}),
              artifacts.META_LABEL_CHECKS: json.dumps({"time": {"rows": [0], "inclusion": [0.5], "truth": ["day"],
                                                                "zero_shot": ["day"], "served": ["day"]}})}
    metadata = write_metadata(tmp_path / "metadata.parquet", {"time": ["day", "night", "day"], "weather": ["sun"] * 3},
                              sources={"time": ["human", "model", "model"]}, record=record)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,true_time\nimg1.png,night\nimg2.png,night\n")
    [time] = evaluate_labels(metadata, labels).attributes
    assert set(time.predictions) == {"adapted"} and time.accuracy("adapted")[0] == pytest.approx(0.5)
