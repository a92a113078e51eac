"""The report's "since the baseline" section: from compare.json of two runs over the same object crops,
where the new run fails far more often on small red objects; checked in the HTML and in Chromium."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from clipengine.bindings.files import write_parquet

from tests.engine.report.test_report import ARTIFACTS, CHROMIUM_ARGS, _chromium, _open, build_run_dir, write_slices_json


@pytest.fixture(scope="module")
def chromium():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    executable = _chromium()
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(baseline, this run): this run is the report fixture's run directory; the baseline holds the
    same items, with small red objects failing at the rate of the rest."""
    from clipengine.compare.stage import compare_runs, write_comparison

    root = tmp_path_factory.mktemp("report-baseline")
    new = build_run_dir(root)
    old = root / "baseline"
    shutil.copytree(new, old)
    errors = pl.read_parquet(old / "errors.parquet")
    metadata = pl.read_parquet(old / "metadata.parquet")
    weak = ((metadata["color"] == "red") & (metadata["size"] == "small")).to_numpy()
    rng = np.random.default_rng(5)
    before = np.where(weak, (rng.random(errors.height) < 0.12).astype(float), errors["error"].to_numpy())
    write_parquet(old / "errors.parquet", errors.with_columns(pl.Series("error", before)))
    joined = pl.concat([metadata, errors.with_columns(pl.Series("error", before)).drop("path", "box")], how="horizontal")
    write_slices_json(joined, old)
    write_comparison(new, compare_runs(old, new))
    return old, new


@pytest.fixture(scope="module")
def page(runs) -> Path:
    from clipengine.report import write_report

    return write_report(runs[1])


def _worse(run_dir: Path) -> list[dict]:
    import json

    document = json.loads((run_dir / "compare.json").read_text())
    return [r for r in document["slices"] if r["status"] == "worse" and r["finding"]]


def test_the_section_shows_worse_slices_drift_and_examples(runs, page):
    old, new = runs
    html = page.read_text(encoding="utf-8")
    worse = _worse(new)
    assert any(set(r["predicates"].items()) == {("color", "red"), ("size", "small")} for r in worse)
    section = html[html.index('<section id="baseline">'):html.index('<section id="slices">')]
    assert '<a href="#baseline">Since the baseline</a>' in html
    assert section.count('class="change-row change-worse"') == len(worse)
    assert str(old) in section and "in both" in section
    assert section.count('class="drift-row') == 5  # color, shape, size, box_area, occlusion
    assert "No attribute drifted" in section  # the same items: the data did not move
    assert "<svg" in section  # both runs' intervals
    examples = section[section.index("Items that turned into errors"):]
    assert 1 <= examples.count('<li class="item') <= 12 and 'src="thumbs/' in examples
    assert "<img src=x" not in html  # a hostile file name among the examples stays text


def test_a_comparison_older_than_the_run_is_not_shown(runs, tmp_path):
    from clipengine.report import write_report

    _, new = runs
    copy = tmp_path / "run"
    shutil.copytree(new, copy, ignore=shutil.ignore_patterns("report.html", "thumbs"))
    errors = pl.read_parquet(copy / "errors.parquet")
    write_parquet(copy / "errors.parquet", errors.with_columns(pl.lit(0.0).alias("error")))
    html = write_report(copy).read_text(encoding="utf-8")
    assert 'id="baseline"' not in html
    assert "compare.json was made from this run&#39;s files as they were before they changed" in html


@pytest.mark.browser
def test_the_section_in_chromium(chromium, runs, page):
    view, events = _open(chromium, page, "report-baseline.png")
    try:
        assert events["page_errors"] == [] and events["dialogs"] == []
        assert [text for kind, text in events["console"] if kind == "error"] == []
        assert view.locator("#baseline table.changes.worse tbody tr").count() == len(_worse(runs[1]))
        assert view.locator("#baseline figure svg").count() == 1
        assert view.locator("#drift-table tbody tr").count() == 5
        widths = view.evaluate("() => [...document.querySelectorAll('#baseline a.thumb img')].map(i => i.naturalWidth)")
        assert widths and min(widths) > 0
        view.locator("#baseline a.thumb").first.click()  # enlarges like the other thumbnails
        assert view.locator("#lightbox").is_visible()
        view.keyboard.press("Escape")
        view.locator('nav a[href="#baseline"]').click()
        assert view.evaluate("() => location.hash") == "#baseline"
        assert (ARTIFACTS / "report-baseline.png").stat().st_size > 0
    finally:
        view.close()
