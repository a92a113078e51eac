"""The labelling sheet: its files, and the page in headless Chromium (offline, click and keyboard,
download equal to the edited table, hostile file names inert)."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from clipengine import artifacts
from clipengine.annotate.labels import read_labels
from clipengine.annotate.sample import csv_field
from clipengine.errors import ClipengineError
from clipengine.report.labelsheet import make_sheet

HOSTILE = 'a</script><script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">, "q".png'
QUOTED = 'say "cheese".png'  # a quote and no comma: still a quoted CSV field
SCHEMA = {"format": 1, "attributes": [
    {"name": "garment", "kind": "exclusive", "positive": None, "strategy": "mean", "top_m": 1,
     "classes": [{"name": n, "prompts": [n]} for n in ("shirt", "coat", "bag")]},
    {"name": "tone", "kind": "exclusive", "positive": None, "strategy": "mean", "top_m": 1,
     "classes": [{"name": "light", "prompts": ["light"]}, {"name": "dark", "prompts": ["dark"]}]},
]}
N_ITEMS = 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder: 12 images (one with a quote in its name, one with a hostile name, nested as its
    slashes say), items, labels."""
    run = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    paths = [f"img{i:02d}.png" for i in range(N_ITEMS - 2)] + [QUOTED, HOSTILE]
    for i, path in enumerate(paths):
        target = run / path
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), mode="L").save(target, format="PNG")
    items = pl.DataFrame({"path": paths})
    from clipengine.bindings.files import write_parquet

    write_parquet(run / artifacts.ITEMS, items)
    garments = ["shirt", "coat", "bag"]
    metadata = items.with_columns(
        pl.Series("garment", [garments[i % 3] for i in range(N_ITEMS)]),
        pl.Series("garment_prob", np.linspace(0.4, 0.9, N_ITEMS), dtype=pl.Float32),
        pl.Series("garment_margin", np.linspace(0.05, 0.8, N_ITEMS), dtype=pl.Float32),
        pl.Series("tone", ["light" if i % 2 else "dark" for i in range(N_ITEMS)]),
        pl.Series("tone_prob", np.full(N_ITEMS, 0.7), dtype=pl.Float32),
        pl.Series("tone_margin", np.linspace(0.9, 0.3, N_ITEMS), dtype=pl.Float32))
    artifacts.write_metadata(run / artifacts.METADATA, metadata, {
        artifacts.META_SCHEMA_CONTENT: json.dumps(SCHEMA), artifacts.META_SCHEMA: "clothes",
        artifacts.META_MODEL_ID: "toy-model"})
    return run


def test_the_sheet_files(run_dir, tmp_path):
    sheet = make_sheet(run_dir, tmp_path / "sheet", n=8, seed=5)
    folder = tmp_path / "sheet"
    assert sheet.n == 8 and sheet.population == N_ITEMS and sheet.seed == 5 and sheet.design == "uniform"
    record = json.loads((folder / artifacts.SAMPLE_RECORD).read_text())
    assert record["seed"] == 5 and record["population"] == N_ITEMS and record["n"] == 8
    assert [i["inclusion_prob"] for i in record["items"]] == [8 / N_ITEMS] * 8
    table = pl.read_csv(folder / artifacts.LABELS_CSV, infer_schema=False)
    assert table.columns == ["path", "inclusion_prob", "garment", "tone", "true_garment", "true_tone"]
    assert table["path"].to_list() == [i["key"] for i in record["items"]]
    assert table["true_garment"].null_count() == 8
    # the same draw again from the same seed
    again = make_sheet(run_dir, tmp_path / "again", n=8, seed=5)
    assert again.n == 8 and (tmp_path / "again" / artifacts.LABELS_CSV).read_bytes() == \
        (folder / artifacts.LABELS_CSV).read_bytes()
    tasks = json.loads((folder / artifacts.LABEL_STUDIO_TASKS).read_text())
    assert len(tasks) == 8 and all(t["data"]["image"].startswith("data:image/png;base64,") for t in tasks)
    first = tasks[0]
    assert first["data"]["path"] == table["path"][0]
    assert {r["from_name"]: r["value"]["choices"] for r in first["predictions"][0]["result"]} == \
        {"garment": [table["garment"][0]], "tone": [table["tone"][0]]}
    config = ElementTree.fromstring((folder / artifacts.LABEL_STUDIO_CONFIG).read_text())
    choices = {c.get("name"): [x.get("value") for x in c] for c in config.iter("Choices")}
    assert choices == {"garment": ["shirt", "coat", "bag"], "tone": ["light", "dark"]}


def test_a_label_studio_export_of_the_tasks_reads_back(run_dir, tmp_path):
    make_sheet(run_dir, tmp_path, n=5, seed=1)
    tasks = json.loads((tmp_path / artifacts.LABEL_STUDIO_TASKS).read_text())
    for task in tasks:  # a person accepts the pre-annotations in Label Studio, which exports them
        task["annotations"] = [{"was_cancelled": False, "result": task.pop("predictions")[0]["result"]}]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    items = pl.read_parquet(run_dir / artifacts.ITEMS)
    labels = read_labels(export, items, {"garment": ("shirt", "coat", "bag"), "tone": ("light", "dark")})
    metadata = pl.read_parquet(run_dir / artifacts.METADATA)
    assert labels.truth["garment"].tolist() == [metadata["garment"][int(r)] for r in labels.rows]
    np.testing.assert_allclose(labels.inclusion, 5 / N_ITEMS)


def test_focus_uncertain_records_the_strata(run_dir, tmp_path):
    make_sheet(run_dir, tmp_path, n=4, seed=2, focus="uncertain", attributes=["garment"])
    record = json.loads((tmp_path / artifacts.SAMPLE_RECORD).read_text())
    assert record["design"] == "stratified" and record["attributes"] == ["garment"]
    assert [(s["size"], s["drawn"]) for s in record["strata"]] == [(3, 2), (9, 2)]
    low = {i["key"] for i in record["items"] if i["inclusion_prob"] == pytest.approx(2 / 3)}
    assert low <= {"img00.png", "img01.png", "img02.png"}  # the three lowest garment margins
    assert pl.read_csv(tmp_path / artifacts.LABELS_CSV).columns == ["path", "inclusion_prob", "garment",
                                                                     "true_garment"]


def test_a_sheet_with_a_persons_labels_is_never_replaced(run_dir, tmp_path):
    make_sheet(run_dir, tmp_path, n=3, seed=0)
    make_sheet(run_dir, tmp_path, n=3, seed=1)  # still empty: replaced
    path = tmp_path / artifacts.LABELS_CSV
    filled = path.read_text().splitlines()
    filled[1] += "coat"
    path.write_text("\n".join(filled) + "\n")
    with pytest.raises(ClipengineError, match="already holds 1 labels a person gave"):
        make_sheet(run_dir, tmp_path, n=3, seed=2)
    other = tmp_path / "mine"
    other.mkdir()
    (other / artifacts.LABELS_CSV).write_text("my own notes; not a sheet\n")
    with pytest.raises(ClipengineError, match="exists and is not an empty labelling sheet"):
        make_sheet(run_dir, other, n=3, seed=2)
    assert (other / artifacts.LABELS_CSV).read_text() == "my own notes; not a sheet\n"
    with pytest.raises(ClipengineError, match="'colour' is not an attribute"):
        make_sheet(run_dir, tmp_path / "other", n=3, attributes=["colour"])


# ---- in a real browser --------------------------------------------------------------------------
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    executable = next((c for c in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(c).is_file()),
                      shutil.which("chromium"))
    if executable is None:
        pytest.skip("no Chromium binary found (install Debian's chromium)")
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture
def sheet(run_dir, tmp_path):
    make_sheet(run_dir, tmp_path, n=N_ITEMS, seed=7)  # every item, the hostile one included
    return tmp_path


def open_page(browser, folder: Path):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1200, "height": 900})
    page = context.new_page()
    events = {"requests": [], "errors": [], "dialogs": []}
    page.on("request", lambda r: events["requests"].append(r.url))
    page.on("pageerror", lambda e: events["errors"].append(str(e)))
    page.on("console", lambda m: events["errors"].append(m.text) if m.type == "error" else None)
    page.on("dialog", lambda d: (events["dialogs"].append(d.message), d.dismiss()))
    page.goto((folder / artifacts.LABELS_HTML).resolve().as_uri(), wait_until="load")
    page.set_default_timeout(15_000)
    return context, page, events


def download(page) -> str:
    with page.expect_download() as caught:
        page.click("#download")
    return Path(caught.value.path()).read_text(encoding="utf-8")


def expected_csv(folder: Path, edits: dict[tuple[int, str], str]) -> str:
    """labels.csv with the given (row, attribute) → class filled into its true_ columns."""
    import csv

    with open(folder / artifacts.LABELS_CSV, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    header = rows[0]
    for (row, attribute), value in edits.items():
        rows[row + 1][header.index("true_" + attribute)] = value
    return "".join(",".join(csv_field(f) for f in line) + "\n" for line in rows)


@pytest.mark.browser
def test_the_page_loads_offline_and_hostile_names_stay_text(browser, sheet):
    context, page, events = open_page(browser, sheet)
    try:
        own = (sheet / artifacts.LABELS_HTML).resolve().as_uri()
        assert all(url == own or url.startswith("data:") for url in events["requests"]), events["requests"]
        assert events["errors"] == [] and events["dialogs"] == []
        assert page.locator("li.item").count() == N_ITEMS
        widths = page.evaluate("() => [...document.querySelectorAll('img.thumb')].map(i => i.naturalWidth)")
        assert len(widths) == N_ITEMS and min(widths) == 28
        assert page.evaluate("() => window.__pwned") is None
        assert page.locator('img[src="x"]').count() == 0 and page.locator("script").count() == 2
        assert page.locator("p.path", has_text=HOSTILE).count() == 1
        assert download(page) == (sheet / artifacts.LABELS_CSV).read_text(encoding="utf-8")  # nothing confirmed
    finally:
        context.close()


@pytest.mark.browser
def test_clicks_and_keys_change_labels_and_the_download_is_the_edited_table(browser, sheet):
    context, page, events = open_page(browser, sheet)
    try:
        first = page.locator("li.item").nth(0)
        button = first.locator("button.choice", has_text="bag")
        button.click()
        assert button.get_attribute("aria-pressed") == "true" and "confirmed" in button.get_attribute("class")
        # keyboard: next item, choose its second garment class, move to tone, accept the rest, next
        page.keyboard.press("j")
        page.keyboard.press("2")
        page.keyboard.press("ArrowRight")
        page.keyboard.press("1")
        page.keyboard.press("j")
        page.keyboard.press("Enter")  # the third item: the predicted labels accepted as they are
        page.keyboard.press("k")
        page.keyboard.press("k")  # back to the second item, at its first attribute: clear its garment again
        page.keyboard.press("Backspace")
        table = pl.read_csv(sheet / artifacts.LABELS_CSV, infer_schema=False)
        edits = {(0, "garment"): "bag", (1, "tone"): "light",
                 (2, "garment"): table["garment"][2], (2, "tone"): table["tone"][2]}
        assert page.locator("#progress").text_content() == f"1 of {N_ITEMS} items labelled"  # only the accepted one
        text = download(page)
        assert text == expected_csv(sheet, edits)
        saved = sheet / "downloaded.csv"
        saved.write_text(text, encoding="utf-8")
        labels = read_labels(saved, _items(sheet), {"garment": ("shirt", "coat", "bag"), "tone": ("light", "dark")})
        assert labels.truth["garment"][:3].tolist() == ["bag", None, table["garment"][2]]
        assert labels.truth["tone"][:3].tolist() == [None, "light", table["tone"][2]]
        # work in progress survives a reload
        page.reload(wait_until="load")
        assert download(page) == text
        assert events["errors"] == []
    finally:
        context.close()


def _items(sheet: Path) -> pl.DataFrame:
    record = json.loads((sheet / artifacts.SAMPLE_RECORD).read_text())
    return pl.read_parquet(Path(record["run"]) / artifacts.ITEMS)
