"""The HTML report: sections, escaping, determinism, CLI, and the page in headless Chromium.

The run directory is built here with the files a real run writes: object crops of
PIL-drawn images (one of them named like an HTML injection), zero-shot metadata,
per-object errors with geometric metadata, and slices found by the real SliceLine.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image, ImageDraw

from clipengine.bindings.files import write_json, write_parquet, write_text

HOSTILE = "<img src=x onerror=alert(1)>.png"
COLORS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200)}
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
FEATURES = ["color", "shape", "size", "box_area", "occlusion"]


def _draw_scene(rng, objects_per_image: int = 4):
    """A 160×120 RGB image with coloured shapes; returns (image, [(box, color, shape, size)])."""
    image = Image.new("RGB", (160, 120), (236, 236, 230))
    draw = ImageDraw.Draw(image)
    objects = []
    for slot in range(objects_per_image):
        color = str(rng.choice(list(COLORS)))
        shape = str(rng.choice(["circle", "square"]))
        size = str(rng.choice(["small", "large"]))
        side = 14 if size == "small" else 30
        cx, cy = 22 + 38 * slot, 60 + int(rng.integers(-20, 20))
        box = [float(cx - side // 2), float(cy - side // 2), float(cx + side // 2), float(cy + side // 2)]
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        else:
            draw.rectangle(box, fill=COLORS[color])
        margin = 4.0
        objects.append(([box[0] - margin, box[1] - margin, box[2] + margin, box[3] + margin], color, shape, size))
    return image, objects


def build_run_dir(root: Path, *, images: int = 36, seed: int = 0) -> Path:
    """A realistic object-level run directory (no embeddings: the report does not read them)."""
    rng = np.random.default_rng(seed)
    image_dir = root / "images"
    image_dir.mkdir(parents=True)
    run_dir = root / "run"
    run_dir.mkdir()
    items, metadata, errors = [], [], []
    for i in range(images):
        image, objects = _draw_scene(rng)
        name = HOSTILE if i == 0 else f"frame_{i:04d}.png"
        file = image_dir / name
        image.save(file)
        for box, color, shape, size in objects:
            key = {"path": str(file), "box": box}
            items.append({**key, "file": str(file)})
            probs = {a: float(rng.uniform(0.5, 0.99)) for a in ("color", "shape", "size")}
            metadata.append(
                {
                    **key,
                    "color": color, "color_prob": probs["color"], "color_margin": probs["color"] - 0.3,
                    "shape": shape, "shape_prob": probs["shape"], "shape_margin": probs["shape"] - 0.3,
                    "size": size, "size_prob": probs["size"], "size_margin": probs["size"] - 0.3,
                }
            )
            weak = color == "red" and size == "small"
            area = (box[2] - box[0]) * (box[3] - box[1])
            occlusion = str(rng.choice(["fully visible", "partly occluded"]))
            errors.append(
                {
                    **key,
                    "error": float(rng.random() < (0.75 if weak else 0.12)),
                    "box_area": area,
                    "occlusion": occlusion,
                }
            )
    box_type = pl.List(pl.Float64)
    write_parquet(run_dir / "items.parquet", pl.DataFrame(items, schema_overrides={"box": box_type}))
    metadata_frame = pl.DataFrame(metadata, schema_overrides={"box": box_type})
    errors_frame = pl.DataFrame(errors, schema_overrides={"box": box_type})
    write_parquet(run_dir / "metadata.parquet", metadata_frame)
    write_parquet(run_dir / "errors.parquet", errors_frame)
    write_parquet(
        run_dir / "skipped.parquet",
        pl.DataFrame(
            {"path": [str(image_dir / "broken.png"), str(image_dir / "empty.png")],
             "reason": ["corrupt: cannot identify image file", "empty file"]}
        ),
    )
    write_json(run_dir / "model.json", {"model_id": "0f1e2d3c", "source": "open_clip", "name": "tiny-test",
                                        "pretrained": None, "weights": "/models/tiny.safetensors",
                                        "embed_dim": 64, "backend": "onnxruntime", "precision": "fp32"})
    write_json(
        run_dir / "manifest.json",
        {
            "dataset": {"name": "shapes <test>", "root": str(image_dir)},
            "schema": {"name": "shapes", "hash": "0123456789abcdef0123"},
            "config": {"slices": {"k": 6, "alpha": 0.95, "max_level": 2}, "encode": {"batch_size": 32}},
            "started_at": "2026-01-01T00:00:00Z",
            "timings": {"encode": 12.5, "annotate": 0.75, "slices": 0.5},
        },
    )
    joined = pl.concat([metadata_frame, errors_frame.drop("path", "box")], how="horizontal")
    write_slices_json(joined, run_dir)
    header = ["attribute", "class", "support"] + [
        f"{s}_{m}" for s in ("naive", "ensemble") for m in ("predicted", "precision", "recall", "f1", "accuracy")
    ]
    write_text(
        run_dir / "label_quality.csv",
        ",".join(header) + "\n"
        "color,(all),98,98,,,0.676,0.68,98,,,0.81,0.8\n"
        "color,red,50,45,0.71,0.64,0.673,,50,0.83,0.8,0.815,\n"
        "color,<b>bold</b>,48,53,0.66,0.7,0.679,,48,0.81,0.79,0.8,\n",
    )
    write_text(run_dir / "summary.md", "# Summary\n\n<script>alert(2)</script> top slice: color = red\n")
    return run_dir


def write_slices_json(frame: pl.DataFrame, run_dir: Path) -> None:
    """slices.json / slices.parquet by the real SliceLine front end."""
    from clipengine.slices.find import find_slices, write_slices

    result = find_slices(frame, error="error", features=FEATURES, k=6, max_level=2, bins=4)
    write_slices(result, run_dir)


def _slice_records(run_dir: Path) -> list[dict]:
    document = json.loads((run_dir / "slices.json").read_text())
    return document["slices"] if isinstance(document, dict) else document


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return build_run_dir(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def report(run_dir) -> Path:
    from clipengine.report import write_report

    return write_report(run_dir)


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / run_dir.name  # the page shows the folder name
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("report.html", "thumbs"))
    return target


# ---- content ---------------------------------------------------------------------------------
def test_report_has_every_section_and_a_row_per_slice(run_dir, report):
    html = report.read_text(encoding="utf-8")
    slices = _slice_records(run_dir)
    assert slices, "the fixture should produce slices"
    assert html.startswith("<!DOCTYPE html>")
    for anchor in ('id="slices"', 'id="examples"', 'id="attributes"', 'id="label-quality"', 'id="run"'):
        assert anchor in html
    assert html.count('class="slice-row"') == len(slices)
    assert html.count('class="slice-examples') == len(slices)
    # header facts from the manifest and model.json
    assert "tiny-test · tiny.safetensors" in html and "onnxruntime" in html and "shapes &lt;test&gt;" in html
    assert "Overall error rate" in html and "Run time" in html
    # significant ones apart from the others, the top slice first
    top = slices[0]
    first_row = html[html.index('class="slice-row"'):]
    first_value = next(iter(top["predicates"].values()))
    assert re.search(r'<span class="val">' + re.escape(str(first_value)), first_row[:2000])
    assert ("Significant slices" in html) == any(s["significant"] for s in slices)


def test_top_slice_is_the_planted_weakness_and_examples_are_inside_it(run_dir, report):
    from clipengine.report.rundir import read_run
    from clipengine.report.tables import overall_rate, slice_rows

    run = read_run(run_dir)
    rows = slice_rows(run, overall_rate(run))
    assert dict(rows[0].predicates).get("color") == "red" or dict(rows[0].predicates).get("size") == "small"
    for row in rows:
        assert row.membership_note is None, row.membership_note  # recomputed membership matches slices.json
        assert int(row.mask.sum()) == row.size
    html = report.read_text(encoding="utf-8")
    article = html[html.index('id="slice-1"'):html.index('id="slice-2"')]
    inside = article[article.index("Within group"):article.index("Outside of group")]
    predicates = dict(rows[0].predicates)
    for feature, value in predicates.items():
        if feature in ("color", "shape", "size"):
            # every thumbnail inside lists the slice's label
            shown = re.findall(rf'<dt class="focus">{feature}</dt><dd class="focus">([^<]*?) ?<', inside)
            assert shown == [value] * inside.count('<li class="item'), shown


def test_per_attribute_tables_use_wilson_intervals(run_dir):
    from clipengine.report.rundir import read_run
    from clipengine.report.tables import attribute_tables, overall_rate, wilson_interval

    run = read_run(run_dir)
    tables = {t.name: t for t in attribute_tables(run, overall_rate(run))}
    assert {"color", "shape", "size", "box_area", "occlusion"} <= set(tables)
    errors = pl.read_parquet(run_dir / "errors.parquet").get_column("error")
    colors = pl.read_parquet(run_dir / "metadata.parquet").get_column("color")
    red = tables["color"].rows[[r.value for r in tables["color"].rows].index("red")]
    n_red = int((colors == "red").sum())
    e_red = float(errors.filter(colors == "red").sum())
    assert red.count == n_red and red.error_sum == e_red
    assert (red.ci_low, red.ci_high) == pytest.approx(wilson_interval(e_red, n_red))
    # Wilson against a value computed by hand: 3 of 10, z = 1.959964
    assert wilson_interval(3, 10) == pytest.approx((0.10779, 0.60322), abs=1e-5)
    assert wilson_interval(0, 5)[0] == 0.0


def test_data_strings_are_escaped(report):
    html = report.read_text(encoding="utf-8")
    assert "<img src=x" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in html
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert "<script>alert(2)" not in html
    assert html.count("<script>") == 1  # our own inline script only


def test_thumbnails_are_small_files_next_to_the_page(run_dir, report):
    html = report.read_text(encoding="utf-8")
    sources = re.findall(r'<img src="(thumbs/[^"]+)"', html)
    assert sources
    for source in set(sources):
        with Image.open(run_dir / source) as image:
            assert max(image.size) <= 160
    total = sum(p.stat().st_size for p in (run_dir / "thumbs").iterdir())
    assert total < 400_000
    assert report.stat().st_size < 600_000


def test_same_run_dir_gives_the_same_bytes(run_dir, report, tmp_path):
    from clipengine.report import write_report

    copy = _copy_run(run_dir, tmp_path)
    again = write_report(copy)
    assert again.read_bytes() == report.read_bytes()
    assert sorted(p.name for p in (copy / "thumbs").iterdir()) == sorted(p.name for p in (run_dir / "thumbs").iterdir())
    # only the run-time fields of the manifest change the page
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["timings"]["encode"] = 99.0
    manifest["started_at"] = "2026-02-02T00:00:00Z"
    write_json(copy / "manifest.json", manifest)
    changed = write_report(copy).read_text(encoding="utf-8").splitlines()
    before = report.read_text(encoding="utf-8").splitlines()
    different = [line for line in difflib.unified_diff(before, changed, lineterm="", n=0)
                 if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert len(different) == 2 * 4, different  # run time, the stage row, two manifest lines
    assert all(("99" in line or "2026-0" in line or "12.5" in line or "Run time" in line) for line in different)


def test_single_file_inlines_thumbnails(run_dir, tmp_path):
    from clipengine.report import write_report

    copy = _copy_run(run_dir, tmp_path)
    write_report(copy)
    (copy / "thumbs" / "mine.txt").write_text("not a thumbnail")
    page = write_report(copy, single_file=True)
    html = page.read_text(encoding="utf-8")
    assert 'src="thumbs/' not in html
    assert re.search(r'<img src="data:image/(png|jpeg);base64,', html)
    # the earlier page's thumbnails are gone, files it did not write are kept
    assert [p.name for p in (copy / "thumbs").iterdir()] == ["mine.txt"]


def test_missing_optional_files_are_named_in_the_page(run_dir, tmp_path):
    from clipengine.report import write_report

    copy = _copy_run(run_dir, tmp_path)
    for name in ("slices.json", "label_quality.csv", "skipped.parquet", "summary.md", "manifest.json", "model.json"):
        (copy / name).unlink()
    html = write_report(copy).read_text(encoding="utf-8")
    assert "slices.json not found" in html
    assert "no ground truth in this run" in html
    assert 'id="attributes"' in html and "color" in html


def test_nothing_significant_is_said_plainly(run_dir, tmp_path):
    from clipengine.report import write_report

    copy = _copy_run(run_dir, tmp_path)
    document = json.loads((copy / "slices.json").read_text())
    slices = document["slices"] if isinstance(document, dict) else document
    for record in slices:
        record["significant"] = False
    write_json(copy / "slices.json", document)
    html = write_report(copy).read_text(encoding="utf-8")
    assert "No significant weak slice was found." in html
    assert html.count('class="slice-row"') == len(slices)
    assert "not significant" in html
    document["slices"] = []
    write_json(copy / "slices.json", document)
    html = write_report(copy).read_text(encoding="utf-8")
    assert "No significant weak slice was found." in html and 'class="slice-row"' not in html


def test_slices_corrected_by_labels_show_the_true_group_and_not_confirmed(run_dir, tmp_path):
    from clipengine.report import write_report
    from clipengine.slices.corrected import LabelledSample
    from clipengine.slices.find import find_slices, write_slices

    copy = _copy_run(run_dir, tmp_path)
    frame = pl.read_parquet(copy / "metadata.parquet").join(pl.read_parquet(copy / "errors.parquet"),
                                                           on=["path", "box"], maintain_order="left")
    rows = np.arange(0, frame.height, 2)
    sample = LabelledSample(rows=rows, truth={"color": frame["color"].to_numpy()[rows].astype(object)},
                            inclusion=np.full(rows.size, 0.5))
    result = find_slices(frame, error="error", features=FEATURES, k=6, max_level=2, bins=4, max_q=1.0, labels=sample)
    write_slices(result, copy)
    html = write_report(copy).read_text(encoding="utf-8")
    assert html.count('<td class="n true-group"') == len(result)
    assert html.count("not-confirmed") == sum(c is False for c in result.confirmed) > 0
    assert f"True-group error rates from {rows.size} labelled items" in html
    assert "held-out items" in html


def test_not_a_run_dir_is_a_one_line_error(tmp_path):
    from clipengine.errors import ClipengineError
    from clipengine.report import write_report

    with pytest.raises(ClipengineError, match="not a run directory"):
        write_report(tmp_path)


# ---- CLI --------------------------------------------------------------------------------------
def test_cli_writes_the_report_and_fails_cleanly(run_dir, tmp_path):
    from click.testing import CliRunner

    from clipengine.cli import cli, main

    copy = _copy_run(run_dir, tmp_path)
    runner = CliRunner()
    result = runner.invoke(cli, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    assert (copy / "report.html").is_file() and "report.html" in result.output
    help_text = runner.invoke(cli, ["report", "--help"]).output
    assert "Example:" in help_text and "--single-file" in help_text
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2


# ---- in a real browser --------------------------------------------------------------------------
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _chromium() -> str:
    for candidate in ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"):
        if Path(candidate).is_file():
            return candidate
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no Chromium binary found (install Debian's chromium)")
    return found


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    executable = _chromium()
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def _open(browser, page_path: Path, artifact: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    events = {"console": [], "requests": [], "dialogs": [], "page_errors": []}
    page.on("console", lambda m: events["console"].append((m.type, m.text)))
    page.on("pageerror", lambda e: events["page_errors"].append(str(e)))
    page.on("request", lambda r: events["requests"].append(r.url))

    def on_dialog(dialog):
        events["dialogs"].append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.goto(page_path.resolve().as_uri(), wait_until="load")
    page.set_default_timeout(20_000)
    page.evaluate(
        "() => Promise.race([Promise.all([...document.images].map(i => i.decode().catch(() => null))),"
        " new Promise(done => setTimeout(done, 10000))])"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / artifact), full_page=True)
    return page, events


@pytest.mark.browser
def test_page_in_chromium(browser, run_dir, report):
    page, events = _open(browser, report, "report-fixture.png")
    try:
        assert events["page_errors"] == []
        assert [text for kind, text in events["console"] if kind == "error"] == []
        own = report.resolve().as_uri()
        thumbs = (run_dir / "thumbs").resolve().as_uri() + "/"
        assert events["requests"] and events["requests"][0] == own
        assert all(url == own or url.startswith(thumbs) for url in events["requests"]), events["requests"]
        assert events["dialogs"] == []
        slices = _slice_records(run_dir)
        assert page.locator("table.slices tbody tr").count() == len(slices)
        widths = page.evaluate("() => [...document.querySelectorAll('a.thumb img')].map(i => i.naturalWidth)")
        assert widths and min(widths) > 0
        # the hostile file name is visible text, and no element came from it
        assert page.get_by_text(HOSTILE).first.count() == 1
        assert page.locator('img[src="x"]').count() == 0
        # click to enlarge, Escape to close
        page.locator("a.thumb").first.click()
        assert page.locator("#lightbox").is_visible()
        assert page.evaluate("() => document.querySelector('.lightbox-image').naturalWidth") > 0
        page.keyboard.press("Escape")
        assert not page.locator("#lightbox").is_visible()
        assert (ARTIFACTS / "report-fixture.png").stat().st_size > 0
    finally:
        page.close()


@pytest.mark.browser
def test_single_file_page_in_chromium(browser, run_dir, tmp_path):
    from clipengine.report import write_report

    copy = _copy_run(run_dir, tmp_path)
    page_path = write_report(copy, single_file=True)
    page, events = _open(browser, page_path, "report-single-file.png")
    try:
        assert events["page_errors"] == [] and events["dialogs"] == []
        # a single-file page requests nothing but itself
        assert events["requests"] == [page_path.resolve().as_uri()]
        widths = page.evaluate("() => [...document.querySelectorAll('a.thumb img')].map(i => i.naturalWidth)")
        assert widths and min(widths) > 0
    finally:
        page.close()


def test_chart_text_is_escaped_and_not_math():
    from clipengine.report.charts import interval_chart

    svg = interval_chart(["<script>alert(1)</script> $x$"], [0.2], [0.1], [0.3], overall=0.15, salt="t")
    assert svg.startswith("<svg") and "<script" not in svg
    assert "&lt;script&gt;alert(1)&lt;/script&gt; $x$" in svg


def test_outside_examples_are_the_nearest_items_outside_the_slice(run_dir):
    from clipengine.report.rundir import read_run
    from clipengine.report.tables import overall_rate, slice_rows
    from clipengine.report.thumbs import pick_examples

    run = read_run(run_dir)
    row = slice_rows(run, overall_rate(run))[0]
    features = [f for f, _ in row.predicates]
    inside, partners, remaining = pick_examples(run, row.mask, features, 6)
    assert len(inside) == 6 and all(row.mask[i] for i in inside)
    errors = run.frame.get_column("error").to_numpy()
    assert errors[inside[0]] > 0  # failures first
    values = run.frame.select(remaining).to_numpy()
    outside = np.flatnonzero(~row.mask)
    for i, (partner, shared) in zip(inside, partners):
        assert not row.mask[partner]
        assert shared == int((values[partner] == values[i]).sum())
        assert shared == max(int((values[j] == values[i]).sum()) for j in outside)
    assert len({p for p, _ in partners}) == len(partners)


def test_continuous_errors_get_mean_intervals(run_dir, tmp_path):
    from clipengine.report import write_report
    from clipengine.report.rundir import read_run
    from clipengine.report.tables import attribute_tables, overall_rate

    copy = _copy_run(run_dir, tmp_path)
    errors = pl.read_parquet(copy / "errors.parquet")
    loss = np.linspace(0.0, 2.5, errors.height)
    write_parquet(copy / "errors.parquet", errors.with_columns(pl.Series("error", loss)))
    run = read_run(copy)
    overall = overall_rate(run)
    assert not overall.binary and overall.rate == pytest.approx(loss.mean())
    assert overall.ci_low < overall.rate < overall.ci_high
    color = next(t for t in attribute_tables(run, overall) if t.name == "color")
    assert all(r.ci_low < r.rate < r.ci_high for r in color.rows)
    html = write_report(copy).read_text(encoding="utf-8")
    assert "normal interval of the mean" in html
