"""The report's coverage section: heat maps, t-way figures, missing/thin combinations in words,
out-of-ODD items with thumbnails; fed by coverage.json / coverage.parquet alone, inert with hostile
values, and in headless Chromium.

The run directory is test_report's (PIL-drawn object crops, zero-shot labels, errors) with a planted
hole (no red circle although red and circles are common), a dataset column whose name and values are
HTML, and an ODD naming a value no item has, a value outside it and an excluded combination; its
coverage files are written by the real coverage stage.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from clipengine.bindings.files import write_parquet, write_text

from tests.engine.report.test_report import _open, browser, build_run_dir, write_slices_json  # noqa: F401

HOSTILE_FEATURE = "<img src=x onerror=alert(4)>"
HOSTILE_VALUE = "<script>alert(5)</script>"
HOSTILE_DATA = "<b>dim</b> $x^2$"
ODD = f"""\
features:
  color: [red, green, blue, "{HOSTILE_VALUE}"]
  "{HOSTILE_FEATURE}": [bright, "{HOSTILE_DATA}"]
  shape: [circle, square]
  size: [small, large]
  occlusion: [fully visible]
exclude:
  - {{color: blue, size: large}}
"""


def build_coverage_run(root: Path, *, min_count: int = 12) -> Path:
    from clipengine.config import CoverageConfig
    from clipengine.coverage.inputs import read_run_table
    from clipengine.coverage.odd import load_odd
    from clipengine.coverage.stage import measure_coverage, write_coverage

    run_dir = build_run_dir(root)
    metadata = pl.read_parquet(run_dir / "metadata.parquet")
    metadata = metadata.with_columns(  # the planted hole: every red object is a square
        pl.when(pl.col("color") == "red").then(pl.lit("square")).otherwise(pl.col("shape")).alias("shape"))
    errors = pl.read_parquet(run_dir / "errors.parquet")
    errors = errors.with_columns(pl.Series(HOSTILE_FEATURE, [HOSTILE_DATA if i % 5 == 0 else "bright"
                                                             for i in range(errors.height)]))
    write_parquet(run_dir / "metadata.parquet", metadata)
    write_parquet(run_dir / "errors.parquet", errors)
    write_slices_json(pl.concat([metadata, errors.drop("path", "box")], how="horizontal"), run_dir)
    odd = root / "odd.yaml"
    write_text(odd, ODD)
    result = measure_coverage(read_run_table(run_dir), config=CoverageConfig(t=3, min_count=min_count, progress=False),
                              odd=load_odd(odd), is_run=True)
    write_coverage(result, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def coverage_run(tmp_path_factory) -> Path:
    return build_coverage_run(tmp_path_factory.mktemp("report-coverage"))


@pytest.fixture(scope="module")
def page_path(coverage_run) -> Path:
    from clipengine.report import write_report

    return write_report(coverage_run)


def _section(html: str) -> str:
    return html[html.index('<section id="coverage">'):html.index('<section id="label-quality">')]


def _pairs(run_dir: Path) -> dict[tuple[str, str], pl.DataFrame]:
    table = pl.read_parquet(run_dir / "coverage.parquet").filter(pl.col("t") == 2).with_columns(
        pl.col("feature_1", "feature_2", "value_1", "value_2").cast(pl.String))
    return {key: group for key, group in table.group_by("feature_1", "feature_2", maintain_order=True)}


# ---- content ------------------------------------------------------------------------------------------
def test_heat_maps_mark_every_missing_and_thin_cell_least_covered_pairs_first(coverage_run, page_path):
    from clipengine.report.coverage import MAX_HEAT_MAPS

    section = _section(page_path.read_text(encoding="utf-8"))
    coverage = json.loads((coverage_run / "coverage.json").read_text())
    min_count = coverage["params"]["min_count"]
    pairs = _pairs(coverage_run)
    figures = re.findall(r'<figure class="chart-figure heat-map" id="pair-(\d+)" data-missing="(\d+)" '
                         r'data-thin="(\d+)">(.*?)</figure>', section, re.S)
    assert len(figures) == min(MAX_HEAT_MAPS, len(pairs)) > 0
    shares = []
    for number, missing, thin, body in figures:
        caption = re.search(r"<strong>(.*?) × (.*?)</strong>", body)
        key = tuple(t.replace("&lt;", "<").replace("&gt;", ">") for t in caption.groups())
        group = pairs[key]
        valid = group.filter(pl.col("valid"))
        assert int(missing) == valid.filter(pl.col("count") == 0).height
        assert int(thin) == valid.filter((pl.col("count") > 0) & (pl.col("count") < min_count)).height
        # every missing and thin cell is marked in the picture, and only those
        assert len(re.findall(rf'<g id="coverage-{number}-missing-\d+-\d+"', body)) == int(missing)
        assert len(re.findall(rf'<g id="coverage-{number}-thin-\d+-\d+"', body)) == int(thin)
        assert body.count("excl.") == group.filter(~pl.col("valid")).height
        shares.append(valid.filter(pl.col("covered")).height / valid.height)
    assert shares == sorted(shares)
    assert sum(int(thin) for _, _, thin, _ in figures) > 0
    assert int(figures[0][1]) >= 1  # the planted hole and the ODD's unseen value are among them


def test_t_way_figures_and_the_missing_list_come_from_coverage_json(coverage_run, page_path):
    section = _section(page_path.read_text(encoding="utf-8"))
    coverage = json.loads((coverage_run / "coverage.json").read_text())
    levels = re.findall(r"<tr><td class=\"n\">(\d)</td><td class=\"n\">([\d,]+)</td><td class=\"n\">([\d,]+)</td>"
                        r"<td class=\"n\">([\d,]+)</td><td class=\"n\"><strong>([\d.]+) %</strong>", section)
    assert [(int(t), int(c.replace(",", "")), int(v.replace(",", ""))) for t, _, c, v, _ in levels] == [
        (e["t"], e["covered"], e["valid"]) for e in coverage["coverage"]]
    assert [float(p) for *_, p in levels] == [round(100 * e["covered"] / e["valid"], 1) for e in coverage["coverage"]]
    pairs = next(e for e in coverage["coverage"] if e["t"] == 2)
    html = page_path.read_text(encoding="utf-8")
    assert f"<dt>Coverage (t = 2)</dt><dd>{pairs['covered']} of {pairs['valid']}</dd>" in html
    table = section[section.index('id="coverage-missing"'):]
    table = table[:table.index("</table>")]
    shown = [m for m in coverage["missing"] if not m["implied"]]
    assert table.count('class="missing-row') == min(40, len(shown))
    # error rates beside the combinations that have items
    with_items = [m for m in shown[:40] if m["count"]]
    assert with_items and "Error rate" in table
    rows = table.split('<tr class="missing-row')[1:]
    for row, record in zip(rows, shown):
        if record["count"]:
            assert f"{100 * record['error_rate']:.1f} %" in row
    # in words, in coverage.json's order (thinnest first)
    first = shown[0]["predicates"]
    words = re.sub(r"<[^>]+>", "", table[table.index('class="missing-row'):]).split("\n")[0]
    assert all(f"{k} = {v}".replace("<", "&lt;").replace(">", "&gt;") in words for k, v in first.items())


def test_a_combination_missing_although_common_is_told_from_one_rare_because_its_values_are(coverage_run):
    from clipengine.report.coverage import coverage_section, poisson_cdf
    from clipengine.report.rundir import read_run
    from clipengine.report.thumbs import ThumbnailWriter

    run = read_run(coverage_run)
    section = coverage_section(run, ThumbnailWriter(run, coverage_run, single_file=True))
    rows = {tuple((f, v) for f, _, v in row.predicates): row for row in section.missing + section.implied}
    hole = rows[(("color", "red"), ("shape", "circle"))]
    frame = run.frame
    n = frame.height
    expected = n * (frame["color"] == "red").sum() / n * (frame["shape"] == "circle").sum() / n
    assert hole.count == 0 and hole.expected == pytest.approx(expected, rel=1e-6)
    assert hole.p_value == pytest.approx(math.exp(-expected)) and hole.unexpected
    unseen = rows[(("color", HOSTILE_VALUE),)]
    assert unseen.expected == 0 and not unseen.unexpected
    from scipy.stats import poisson

    for k, mean in ((0, 0.3), (2, 4.2), (7, 30.0), (40, 900.0), (3, 1e-9)):
        assert poisson_cdf(k, mean) == pytest.approx(poisson.cdf(k, mean), rel=1e-9, abs=1e-300)


def test_out_of_odd_items_are_shown_with_their_thumbnails_and_reasons(coverage_run, page_path):
    section = _section(page_path.read_text(encoding="utf-8"))
    coverage = json.loads((coverage_run / "coverage.json").read_text())
    assert f'id="odd-count">{coverage["out_of_odd"]} items outside the ODD' in section
    items = section.split('<li class="item odd-item">')[1:]
    assert len(items) == min(12, len(coverage["out_of_odd_examples"])) > 0
    for item, example in zip(items, coverage["out_of_odd_examples"]):
        source = re.search(r'<img src="(thumbs/[^"]+)"', item).group(1)
        assert (coverage_run / source).is_file()
        assert all(reason.replace("<", "&lt;").replace(">", "&gt;") in item for reason in example["reasons"])
        # the thumbnail is that item's (its labels say so), not another object of the same image
        for reason in example["reasons"]:
            if not reason.startswith("excluded:"):
                feature, value = reason.split(" = ")
                assert re.search(rf'<dt[^>]*>{feature}</dt><dd[^>]*>{value}[ <]', item), (feature, value)
    reasons = section[section.index('id="odd-reasons"'):]
    assert "occlusion = partly occluded" in reasons and "excluded: color = blue and size = large" in reasons


def test_hostile_names_and_values_are_escaped_in_the_page_and_the_pictures(page_path):
    html = page_path.read_text(encoding="utf-8")
    section = _section(html)
    for text in (HOSTILE_FEATURE, HOSTILE_VALUE, HOSTILE_DATA):
        escaped = text.replace("<", "&lt;").replace(">", "&gt;")
        assert text not in html
        assert escaped in section
    assert html.count("<script>") == 1  # our own script only
    pictures = re.findall(r"<svg.*?</svg>", section, re.S)
    # chart text is text as written: escaped, never markup nor TeX
    assert all(any(text[:20].replace("<", "&lt;").replace(">", "&gt;") in svg for svg in pictures)
               for text in (HOSTILE_FEATURE, HOSTILE_VALUE, HOSTILE_DATA))  # long labels are cut
    as_text = re.escape(HOSTILE_DATA.replace("<", "&lt;").replace(">", "&gt;"))
    assert any(re.search(rf"<text [^>]*>{as_text}</text>", svg) for svg in pictures)  # one text element, as written


def test_the_section_without_or_with_broken_coverage_files(coverage_run, tmp_path):
    from clipengine.report import write_report

    copy = tmp_path / "run"
    shutil.copytree(coverage_run, copy, ignore=shutil.ignore_patterns("report.html", "thumbs"))
    (copy / "coverage.parquet").write_bytes(b"not parquet")
    html = write_report(copy).read_text(encoding="utf-8")
    assert "coverage.parquet: not a readable coverage table" in html and 'id="coverage-levels"' in html
    assert 'class="chart-figure heat-map"' not in html
    document = json.loads((copy / "coverage.json").read_text())
    document["coverage"] = [{"t": "two", "covered": None}, "nonsense"]
    document["missing"] = [{"predicates": {"color": ["red", "blue"]}, "count": "x", "expected": None}, 7]
    document["out_of_odd_examples"] = [{"path": 5, "box": "nope", "reasons": "no list"}]
    (copy / "coverage.json").write_text(json.dumps(document))
    html = write_report(copy).read_text(encoding="utf-8")
    assert "color</span> in <span class=\"val\">(red, blue)" in html
    (copy / "coverage.json").write_text("[1, 2]")
    assert "holds no coverage" in write_report(copy).read_text(encoding="utf-8")
    (copy / "coverage.json").unlink()
    html = write_report(copy).read_text(encoding="utf-8")
    assert "No coverage: coverage.json not found." in html


def test_the_same_run_gives_the_same_page(coverage_run, page_path, tmp_path):
    from clipengine.report import write_report

    copy = tmp_path / coverage_run.name
    shutil.copytree(coverage_run, copy, ignore=shutil.ignore_patterns("report.html", "thumbs"))
    assert write_report(copy).read_bytes() == page_path.read_bytes()


def test_heat_map_cells_and_counts():
    from clipengine.report.charts import COVERED, EXCLUDED, MISSING, THIN, _compact, heat_map

    counts = np.array([[120.0, 0.0], [2.0, 4000.0]])
    states = np.array([[COVERED, MISSING], [THIN, EXCLUDED]])
    svg = heat_map(["a", "b"], ["x", "y"], counts, states, row_title="r", column_title="c", salt="s")
    assert svg.startswith("<svg") and 'style="max-width: ' in svg
    assert re.findall(r'<g id="(s-(?:missing|thin)-\d-\d)"', svg) == ["s-missing-0-1", "s-thin-1-0"]
    assert [_compact(v) for v in (7, 950, 1234, 35_400, 1_200_000, 2.25)] == ["7", "950", "1.2k", "35k", "1.2M", "2.2"]


# ---- in a real browser ----------------------------------------------------------------------------------
@pytest.mark.browser
def test_coverage_section_in_chromium(browser, coverage_run, page_path):  # noqa: F811
    page, events = _open(browser, page_path, "report-coverage.png")
    try:
        assert events["page_errors"] == [] and events["dialogs"] == []
        own = page_path.resolve().as_uri()
        thumbs = (coverage_run / "thumbs").resolve().as_uri() + "/"
        assert all(url == own or url.startswith(thumbs) for url in events["requests"]), events["requests"]
        assert page.locator("#coverage").is_visible()
        # hostile names and values are text, and no element came from them
        assert page.locator('img[src="x"]').count() == 0 and page.locator("#coverage b").count() == 0
        assert page.locator("#coverage-missing").get_by_text(HOSTILE_DATA).first.is_visible()
        assert page.locator("#coverage .search-facts").get_by_text(HOSTILE_FEATURE, exact=False).count() == 1
        figures = page.locator("#coverage figure.heat-map")
        assert figures.count() > 0
        for i in range(figures.count()):
            figure = figures.nth(i)
            marked = figure.locator("svg g[id*='-missing-']").count()
            assert marked == int(figure.get_attribute("data-missing"))
            assert figure.locator("svg").bounding_box()["width"] > 100
        widths = page.evaluate("() => [...document.querySelectorAll('.odd-examples img')].map(i => i.naturalWidth)")
        assert widths and min(widths) > 0
        page.locator(".odd-examples a.thumb").first.click()
        assert page.locator("#lightbox").is_visible()
        assert page.locator("#lightbox .reasons li").count() >= 1
        page.keyboard.press("Escape")
    finally:
        page.close()
