"""Drawing a labelling sample: the designs, their inclusion probabilities, the sheet's CSV round trip."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from clipengine.annotate.labels import read_labels
from clipengine.annotate.sample import (
    FOCUS_FRACTION,
    FOCUS_SHARE,
    draw_sample,
    sheet_csv,
    sheet_header,
    sheet_rows,
    smallest_margins,
)


def test_a_uniform_draw_is_distinct_items_each_with_probability_n_over_n():
    draw = draw_sample(1000, 50, seed=4)
    assert len(set(draw.rows.tolist())) == 50 and draw.rows.min() >= 0 and draw.rows.max() < 1000
    assert np.all(draw.inclusion == 50 / 1000)
    assert np.array_equal(draw_sample(1000, 50, seed=4).rows, draw.rows)
    assert not np.array_equal(draw_sample(1000, 50, seed=5).rows, draw.rows)
    assert draw.design["design"] == "uniform"
    everything = draw_sample(30, 50, seed=1)
    assert sorted(everything.rows.tolist()) == list(range(30)) and np.all(everything.inclusion == 1.0)


def test_a_uniform_draw_is_uniform():
    counts = np.zeros(20)
    for seed in range(2000):
        counts[draw_sample(20, 5, seed=seed).rows] += 1
    np.testing.assert_allclose(counts / 2000, 5 / 20, atol=0.04)


def test_focus_uncertain_stratifies_on_the_margin_with_known_probabilities():
    rng = np.random.default_rng(0)
    margins = rng.uniform(0, 1, 1000)
    draw = draw_sample(1000, 100, seed=2, margins=margins)
    low = set(np.argsort(margins, kind="stable")[: int(FOCUS_SHARE * 1000)].tolist())
    in_low = np.asarray([r in low for r in draw.rows.tolist()])
    assert in_low.sum() == FOCUS_FRACTION * 100
    np.testing.assert_allclose(draw.inclusion[in_low], 50 / 200)
    np.testing.assert_allclose(draw.inclusion[~in_low], 50 / 800)
    strata = draw.design["strata"]
    assert [(s["size"], s["drawn"]) for s in strata] == [(200, 50), (800, 50)]
    assert draw.design["margin_cutoff"] == pytest.approx(np.sort(margins)[199])


def test_inverse_inclusion_weights_make_the_stratified_estimate_unbiased():
    """Horvitz–Thompson: the mean over draws of Σ y_i / π_i is the population total, though the
    low-margin items (where y is larger) are over-drawn; the unweighted mean is biased."""
    rng = np.random.default_rng(1)
    margins = rng.uniform(0, 1, 500)
    y = (margins < 0.3).astype(float) + rng.uniform(0, 0.2, 500)  # larger where the margin is low
    estimates, naive = [], []
    for seed in range(3000):
        draw = draw_sample(500, 40, seed=seed, margins=margins)
        estimates.append(np.sum(y[draw.rows] / draw.inclusion))
        naive.append(500 * y[draw.rows].mean())
    assert np.mean(estimates) == pytest.approx(y.sum(), rel=0.02)
    assert abs(np.mean(naive) - y.sum()) > 0.2 * y.sum()


def test_a_stratum_too_small_is_taken_whole():
    margins = np.arange(10, dtype=float)
    draw = draw_sample(10, 9, seed=0, margins=margins)
    assert len(draw.rows) == 9
    by_stratum = {s["name"]: s for s in draw.design["strata"]}
    assert by_stratum["low margin"]["drawn"] == 2 and by_stratum["low margin"]["inclusion_prob"] == 1.0
    assert by_stratum["other"]["drawn"] == 7


HOSTILE = ['a,b.png', 'say "cheese".png', 'two\nlines.png', '<img src=x onerror=alert(1)>.png', ' spaced .png']


def test_the_sheet_reads_back_through_the_labels_contract(tmp_path):
    items = pl.DataFrame({"path": HOSTILE + ["plain.png"]})
    metadata = pl.DataFrame({"time": ["day", "night", "day", "night", "day", "day"],
                             "time_margin": [0.9, 0.1, 0.5, 0.2, 0.8, 0.3]})
    draw = draw_sample(6, 6, seed=3)
    header = sheet_header(["time"], has_box=False)
    rows = sheet_rows(items, metadata, draw, ["time"])
    assert header == ["path", "inclusion_prob", "time", "true_time"]
    for row in rows:
        row[-1] = "night"
    path = tmp_path / "labels.csv"
    path.write_text(sheet_csv(header, rows))
    labels = read_labels(path, items, {"time": ("day", "night")})
    assert labels.rows.tolist() == draw.rows.tolist()
    assert labels.truth["time"].tolist() == ["night"] * 6
    np.testing.assert_allclose(labels.inclusion, 1.0)
    assert smallest_margins(metadata, ["time"]).tolist() == [0.9, 0.1, 0.5, 0.2, 0.8, 0.3]


def test_box_items_carry_their_box_as_json(tmp_path):
    items = pl.DataFrame({"path": ["a.png", "a.png"], "box": [[0.0, 1.0, 5.0, 6.5], [2.0, 2.0, 9.0, 9.0]]})
    metadata = pl.DataFrame({"time": ["day", "night"]})
    draw = draw_sample(2, 2, seed=0)
    rows = sheet_rows(items, metadata, draw, ["time"])
    for row in rows:
        row[-1] = row[-2]
    path = tmp_path / "labels.csv"
    path.write_text(sheet_csv(sheet_header(["time"], has_box=True), rows))
    labels = read_labels(path, items, {"time": ("day", "night")})
    assert sorted(labels.rows.tolist()) == [0, 1]
    assert dict(zip(labels.rows.tolist(), labels.truth["time"].tolist())) == {0: "day", 1: "night"}
