"""The report and summary with a labelled sample: the label-quality section per attribute (zero-shot vs
adapted, intervals, which served, reliable or not) and each slice predicate linked to its attribute."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from clipengine import artifacts
from clipengine.annotate.evaluate import write_label_quality
from clipengine.annotate.reliability import AttributeReliability, ReliabilityReport
from clipengine.run.summary import build_summary

SCHEMA = {"format": 1, "attributes": [
    {"name": "scene", "kind": "exclusive", "positive": None, "strategy": "mean", "top_m": 1,
     "classes": [{"name": "urban", "prompts": ["city"]}, {"name": "rural", "prompts": ["field"]}]},
    {"name": "tone", "kind": "exclusive", "positive": None, "strategy": "mean", "top_m": 1,
     "classes": [{"name": "bright", "prompts": ["bright"]}, {"name": "dark", "prompts": ["dark"]}]},
]}


@pytest.fixture
def run_dir(tmp_path):
    from clipengine.bindings.files import write_parquet

    n = 40
    paths = [f"img{i:02d}.png" for i in range(n)]
    write_parquet(tmp_path / artifacts.ITEMS, pl.DataFrame({"path": paths}))
    scene = ["urban" if i % 2 else "rural" for i in range(n)]
    tone = ["dark" if i % 3 else "bright" for i in range(n)]
    metadata = pl.DataFrame({"path": paths, "scene": scene, "scene_prob": [0.8] * n, "scene_margin": [0.6] * n,
                             "tone": tone, "tone_prob": [0.7] * n, "tone_margin": [0.4] * n})
    artifacts.write_metadata(tmp_path / artifacts.METADATA, metadata,
                             {artifacts.META_SCHEMA_CONTENT: json.dumps(SCHEMA)})
    artifacts.write_errors(tmp_path, pl.DataFrame({"path": paths, "error": [float(i % 2) for i in range(n)]}))
    records = [
        {"predicates": {"scene": "urban"}, "size": 20, "error_mean": 1.0, "error_sum": 20.0, "ci_low": 0.8,
         "ci_high": 1.0, "significant": True, "q_value": 0.001},
        {"predicates": {"tone": "dark"}, "size": 26, "error_mean": 0.5, "error_sum": 13.0, "ci_low": 0.3,
         "ci_high": 0.7, "significant": False, "q_value": 0.5},
    ]
    artifacts.write_slices(tmp_path, pl.DataFrame({"rank": [1, 2]}), {"n_rows": n, "error_mean": 0.5}, records)
    # the sample: scene adapted and unreliable (its 'urban' precision is poor), tone zero-shot and reliable
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 30)
    scene_item = AttributeReliability(
        "scene", ("urban", "rural"), truth, np.ones(30),
        {"zero_shot": rng.integers(0, 2, 30), "adapted": np.where(rng.random(30) < 0.6, truth, 1 - truth)},
        served="gda", assigned=np.array([True, True]),
        adaptation={"method": "gda", "cv_accuracy": 0.61, "reason": "gda won"})
    tone_truth = np.array([0] * 15 + [1] * 15)
    tone_item = AttributeReliability("tone", ("bright", "dark"), tone_truth, np.ones(30), {"zero_shot": tone_truth},
                                     served="zero-shot", assigned=np.array([True, True]))
    write_label_quality(tmp_path, None, ReliabilityReport([scene_item, tone_item], "labels.csv", 30))
    return tmp_path


def test_the_report_shows_reliability_and_links_predicates(run_dir):
    from clipengine.report import write_report

    html = write_report(run_dir, single_file=True).read_text(encoding="utf-8")
    assert 'id="reliability-1"' in html and 'id="reliability-2"' in html
    section = html[html.index('id="reliability-1"'):html.index('id="reliability-2"')]
    assert "unreliable" in section and "adapted (gda)" in section and "zero-shot" in section
    assert "cross-validated accuracy 0.610 when chosen" in section
    tone = html[html.index('id="reliability-2"'):html.index('id="run"')]
    assert '<span class="badge">reliable</span>' in tone
    # the slice on scene links to scene's section, marked unreliable; the slice on tone, reliable
    assert html.count('<a class="rel rel-poor" href="#reliability-1"') >= 1
    assert html.count('<a class="rel rel-ok" href="#reliability-2"') >= 1
    assert "precision of urban" in html


def test_the_summary_marks_unreliable_attributes(run_dir):
    summary = build_summary(run_dir, {})
    assert "## Label reliability (measured on your labelled sample)" in summary
    assert "| scene | 30 | gda |" in summary and "| **no** |" in summary
    assert "| tone | 30 | zero-shot |" in summary and "| yes |" in summary
    assert "**scene** is unreliable: precision of" in summary
