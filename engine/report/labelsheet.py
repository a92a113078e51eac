"""A labelling sheet for a run: a drawn sample of its items as ``labels.csv``, a self-contained page
to label them in a browser (``labels.html``), Label Studio's import (tasks with the predictions as
pre-annotations, and its labelling config) and the record of the draw (``sample.json``).

The page needs no network and no server: thumbnails (object crops for box items) are inlined as
data URIs, its script and styles are inline, and the sheet's data travels as JSON that Jinja2's
``tojson`` escapes; the script builds the page with ``textContent`` only, so no file name can
become markup. The predicted labels are pre-selected but count only once a person confirms them
(a click on a class, or accepting the item); the download is ``labels.csv`` with the
``true_<attr>`` cells filled, quoted exactly as :func:`clipengine.annotate.sample.sheet_csv` quotes.
Work in progress is kept in the browser's local storage for this sheet.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from clipengine import artifacts
from clipengine.errors import ClipengineError

_HERE = Path(__file__).parent
LABEL_STUDIO_IMAGE = "image"  # the Image control's name in the Label Studio config


@dataclass(frozen=True)
class Sheet:
    """A written sheet: where, how many items, the design and the seed."""

    folder: Path
    n: int
    population: int
    design: str
    seed: int
    attributes: list[str]


def make_sheet(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, n: int, seed: int | None = None,
               focus: str | None = None, attributes: list[str] | None = None) -> Sheet:
    """Draw ``n`` items of the run in ``run_dir`` (its ``items.parquet`` and ``metadata.parquet``) and
    write the sheet's files into ``out_dir``. ``focus="uncertain"`` stratifies on the margin;
    ``attributes`` (default: all of the schema's) are the ones to label."""
    from clipengine.annotate.sample import (
        FOCUS_CHOICES,
        draw_sample,
        new_seed,
        sample_record,
        sheet_csv,
        sheet_header,
        sheet_rows,
        smallest_margins,
    )

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if focus is not None and focus not in FOCUS_CHOICES:
        raise ClipengineError(f"--focus {focus!r}: expected one of {', '.join(FOCUS_CHOICES)}")
    items, metadata, schema = read_run_labels(run_dir)
    classes = {a["name"]: [c["name"] for c in a["classes"]] for a in schema["attributes"]}
    chosen = list(classes) if not attributes else attributes
    unknown = [a for a in chosen if a not in classes]
    if unknown:
        raise ClipengineError(f"--attributes: {unknown[0]!r} is not an attribute of the run's schema "
                              f"({', '.join(classes)})")
    check_no_labels_lost(out_dir / artifacts.LABELS_CSV)
    seed = new_seed() if seed is None else int(seed)
    margins = smallest_margins(metadata, chosen) if focus == "uncertain" else None
    draw = draw_sample(items.height, n, seed, margins=margins)
    header = sheet_header(chosen, has_box="box" in items.columns)
    rows = sheet_rows(items, metadata, draw, chosen)
    csv_text = sheet_csv(header, rows)
    manifest = artifacts.read_manifest(run_dir) or {}
    model_id = str(artifacts.read_parquet_metadata(run_dir / artifacts.METADATA).get(artifacts.META_MODEL_ID, ""))
    record = sample_record(draw, seed=seed, population=items.height, items=items, attributes=chosen,
                           run=str(run_dir.resolve()), model_id=model_id,
                           schema={"name": schema.get("name"), "hash": schema.get("hash")})
    thumbnails = _thumbnails(items, draw.rows, run_dir, manifest)
    attribute_classes = {a: classes[a] for a in chosen}
    html = render_sheet_page(header, rows, attribute_classes, thumbnails, title=run_dir.resolve().name,
                             record=record)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts.write_sheet_file(out_dir, artifacts.LABELS_HTML, html)
    artifacts.write_sheet_file(out_dir, artifacts.LABEL_STUDIO_TASKS,
                               label_studio_tasks(header, rows, attribute_classes, thumbnails, model_id))
    artifacts.write_sheet_file(out_dir, artifacts.LABEL_STUDIO_CONFIG, label_studio_config(attribute_classes))
    artifacts.write_sheet_file(out_dir, artifacts.SAMPLE_RECORD, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    artifacts.write_sheet_file(out_dir, artifacts.LABELS_CSV, csv_text)
    return Sheet(out_dir, len(rows), items.height, record["design"], seed, chosen)


def read_run_labels(run_dir: Path):
    """``(items, metadata aligned to items, schema content)`` of a run or annotated encode folder."""
    items = artifacts.read_parquet_file(run_dir / artifacts.ITEMS)
    path = run_dir / artifacts.METADATA
    metadata = artifacts.read_parquet_file(path)
    meta = artifacts.read_parquet_metadata(path)
    if artifacts.META_SCHEMA_CONTENT not in meta:
        raise ClipengineError(f"{path}: records no schema; write it with `clipengine annotate` or `clipengine run`")
    schema = json.loads(meta[artifacts.META_SCHEMA_CONTENT])
    schema.setdefault("name", meta.get(artifacts.META_SCHEMA))
    schema.setdefault("hash", meta.get(artifacts.META_SCHEMA_HASH))
    item_keys, metadata_keys = artifacts.item_keys(items), artifacts.item_keys(metadata)
    if item_keys != metadata_keys:
        position = {key: i for i, key in enumerate(metadata_keys)}
        missing = [key for key in item_keys if key not in position]
        if missing:
            raise ClipengineError(f"{path}: has no labels for {len(missing)} of the run's items (e.g. "
                                  f"{missing[0].split(chr(9))[0]!r}); run `clipengine annotate` again")
        metadata = metadata[[position[key] for key in item_keys]]
    return items, metadata, schema


def check_no_labels_lost(path: Path) -> None:
    """Refuse to replace a ``labels.csv`` unless it is a sheet with no label filled in yet (one a person
    has labelled, or a file that is not a sheet at all, is kept)."""
    if not path.is_file():
        return
    from clipengine.tables import read_table

    try:
        table = read_table(path, what="labels", as_text=True)
    except ClipengineError:
        table = None
    truth = [c for c in table.columns if c.startswith(artifacts.TRUTH_PREFIX)] if table is not None else []
    if not truth:
        raise ClipengineError(f"{path} exists and is not an empty labelling sheet; choose another --out "
                              "(or move that file away)")
    filled = sum(table.get_column(c).drop_nulls().str.strip_chars().ne("").sum() for c in truth)
    if filled:
        raise ClipengineError(f"{path} already holds {filled} labels a person gave; choose another --out "
                              "(or move that file away)")


def _thumbnails(items, rows: np.ndarray, run_dir: Path, manifest: dict) -> list[tuple[str | None, str | None, bool]]:
    from clipengine.report.thumbs import image_roots, thumbnail_uri

    roots = image_roots(run_dir, manifest)
    files = artifacts.item_files(items)
    boxes = items.get_column("box").to_list() if "box" in items.columns else None
    return [thumbnail_uri(str(files[r]), boxes[r] if boxes is not None else None, roots) for r in rows.tolist()]


def render_sheet_page(header: list[str], rows: list[list[str]], classes: dict[str, list[str]],
                      thumbnails: list, *, title: str, record: dict) -> str:
    """The self-contained labelling page."""
    from clipengine.report import _environment

    truth_start = len(header) - len(classes)
    attributes = [{"name": name, "classes": names, "predicted": header.index(name),
                   "truth": truth_start + i} for i, (name, names) in enumerate(classes.items())]
    sheet_id = hashlib.sha256(json.dumps([header, [r[0] for r in rows], record.get("seed")]).encode()).hexdigest()[:16]
    data = {
        "sheet_id": sheet_id,
        "file_name": artifacts.LABELS_CSV,
        "header": header,
        "attributes": attributes,
        "rows": rows,
        "images": [{"src": src, "reason": reason, "pixelated": pixelated} for src, reason, pixelated in thumbnails],
    }
    strata = record.get("strata") or []
    context = {
        "title": title,
        "n": len(rows),
        "population": record.get("population"),
        "design": record.get("design"),
        "seed": record.get("seed"),
        "strata": strata,
        "data": data,
        "css": (_HERE / "static" / "labels.css").read_text(encoding="utf-8"),
        "js": (_HERE / "static" / "labels.js").read_text(encoding="utf-8"),
    }
    return _environment().get_template("labels.html.j2").render(**context)


def label_studio_tasks(header: list[str], rows: list[list[str]], classes: dict[str, list[str]], thumbnails: list,
                       model_id: str) -> str:
    """Label Studio's import file: one task per item (``data``: the thumbnail, ``path`` [, ``box``],
    ``inclusion_prob``) with the model's labels as a prediction (pre-annotations)."""
    from clipengine.annotate.labels import INCLUSION_COLUMN

    position = {name: i for i, name in enumerate(header)}
    tasks = []
    for row, (src, _, _) in zip(rows, thumbnails):
        data = {LABEL_STUDIO_IMAGE: src or "", "path": row[position["path"]],
                INCLUSION_COLUMN: float(row[position[INCLUSION_COLUMN]])}
        if "box" in position:
            data["box"] = row[position["box"]]
        result = [{"from_name": name, "to_name": LABEL_STUDIO_IMAGE, "type": "choices",
                   "value": {"choices": [row[position[name]]]}} for name in classes if row[position[name]]]
        tasks.append({"data": data, "predictions": [{"model_version": model_id or "clipengine", "result": result}]})
    return json.dumps(tasks, ensure_ascii=False, indent=1) + "\n"


def label_studio_config(classes: dict[str, list[str]]) -> str:
    """Label Studio's labelling config: the image, its path, one single-choice control per attribute."""
    lines = ["<View>", f'  <Image name="{LABEL_STUDIO_IMAGE}" value="${LABEL_STUDIO_IMAGE}" zoom="true"/>',
             '  <Text name="path" value="$path"/>']
    for name, names in classes.items():
        lines.append(f"  <Header value={quoteattr(name)}/>")
        lines.append(f'  <Choices name={quoteattr(name)} toName="{LABEL_STUDIO_IMAGE}" choice="single" '
                     'showInline="true">')
        lines += [f"    <Choice value={quoteattr(c)}/>" for c in names]
        lines.append("  </Choices>")
    lines.append("</View>")
    return "\n".join(lines) + "\n"
