"""summary.md's coverage paragraph: figures and the thinnest combinations from coverage.json, data
escaped (rendered as Markdown it makes no element), absent or broken files said plainly."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from tests.engine.report.test_report_coverage import HOSTILE_FEATURE, HOSTILE_VALUE, build_coverage_run


@pytest.fixture(scope="module")
def coverage_run(tmp_path_factory):
    return build_coverage_run(tmp_path_factory.mktemp("summary-coverage"))


def _coverage_paragraph(text: str) -> str:
    start = text.index("## Coverage")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_coverage_paragraph_states_the_figures_and_the_thinnest_combinations(coverage_run):
    from clipengine.run.summary import TOP_MISSING, build_summary, escape

    coverage = json.loads((coverage_run / "coverage.json").read_text())
    paragraph = _coverage_paragraph(build_summary(coverage_run, {}))
    figures = re.findall(r"t = (\d): (\d+) of (\d+)", paragraph)
    assert [tuple(map(int, f)) for f in figures] == [(e["t"], e["covered"], e["valid"]) for e in coverage["coverage"]]
    assert f"{coverage['missing_total']} valid combination(s) have fewer than {coverage['params']['min_count']}" \
        in paragraph
    listed = re.findall(r"^- (.*): (\d+) item\(s\), ([\d.]+) expected$", paragraph, re.M)
    named = [m for m in coverage["missing"] if not m["implied"]][:TOP_MISSING]
    assert len(listed) == len(named) > 0
    for (words, count, expected), record in zip(listed, named):
        assert words == " AND ".join(f"{escape(k)} = {escape(v)}" for k, v in record["predicates"].items())
        assert int(count) == record["count"] and float(expected) == pytest.approx(record["expected"], abs=0.05)
    assert f"{coverage['out_of_odd']} item(s) outside the ODD" in paragraph


def test_coverage_data_is_literal_markdown(coverage_run, tmp_path):
    from markdown_it import MarkdownIt

    from clipengine.run.summary import build_summary

    copy = tmp_path / "run"
    shutil.copytree(coverage_run, copy)
    document = json.loads((copy / "coverage.json").read_text())
    document["missing"][0].update(predicates={HOSTILE_FEATURE: HOSTILE_VALUE, "lane": ["a|b", "*c*"]}, implied=False)
    (copy / "coverage.json").write_text(json.dumps(document))
    text = build_summary(copy, {})
    paragraph = _coverage_paragraph(text)
    assert HOSTILE_FEATURE not in text and HOSTILE_VALUE not in text
    html = MarkdownIt("commonmark").render(paragraph)
    assert "<script" not in html and "<img" not in html and "<b>" not in html
    assert "&lt;script&gt;alert(5)&lt;/script&gt;" in html and "&lt;img src=x onerror=alert(4)&gt;" in html
    assert "<em>" not in html and "lane in (a|b, *c*)" in html


def test_no_coverage_or_a_broken_file(coverage_run, tmp_path):
    from clipengine.run.summary import build_summary

    copy = tmp_path / "run"
    shutil.copytree(coverage_run, copy)
    (copy / "coverage.json").write_text("{not json")
    assert "No coverage (" in _coverage_paragraph(build_summary(copy, {}))
    (copy / "coverage.json").unlink()
    assert "## Coverage" not in build_summary(copy, {})
