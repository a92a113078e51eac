"""The HTML report of a run: one self-contained page, fed only by the run directory.

``write_report(run_dir)`` reads ``manifest.json``, ``model.json``, ``items.parquet``,
``metadata.parquet``, ``errors.parquet``, ``slices.json``, ``coverage.json``, ``coverage.parquet``,
``label_quality.csv``, ``skipped.parquet``, ``summary.md`` and ``compare.json`` + ``compare_items.parquet``
(each optional but the item table) and writes
``report.html`` with its thumbnails in ``thumbs/`` (or inlined with ``single_file``).
The page needs no network: styles, script and charts (SVG) are inline. Every string
that comes from data is escaped by Jinja2's autoescape. The same run directory gives
the same bytes, except the run-time fields that the manifest itself carries.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_HERE = Path(__file__).parent


def write_report(run_dir: str | Path, *, single_file: bool = False) -> Path:
    """Write ``run_dir/report.html`` (and ``run_dir/thumbs/``); return the page's path.

    Raises ClipengineError when ``run_dir`` holds no run (no item, metadata or error table).
    """
    from clipengine import artifacts
    from clipengine.report.rundir import read_run

    run = read_run(run_dir)
    out_dir = Path(run_dir)
    html, thumbs = render_report(run, out_dir=out_dir, single_file=single_file)
    destination = artifacts.write_report(out_dir, html)
    thumbs.remove_stale()
    return destination


def render_report(run, *, out_dir: Path, single_file: bool = False):
    """(HTML text, the ThumbnailWriter that wrote its thumbnails) for a read run."""
    from clipengine.report import charts
    from clipengine.report.coverage import coverage_section
    from clipengine.report.tables import attribute_tables, overall_rate, slice_rows
    from clipengine.report.thumbs import (
        EXAMPLES_PER_SIDE,
        ThumbnailWriter,
        pick_examples,
    )

    overall = overall_rate(run)
    slices = slice_rows(run, overall)
    thumbs = ThumbnailWriter(run, out_dir, single_file=single_file)
    codes: dict = {}
    for row in slices:
        if row.mask is None:
            continue
        features = [feature for feature, _ in row.predicates]
        inside, partners, remaining = pick_examples(run, row.mask, features, EXAMPLES_PER_SIDE, codes=codes)
        focus = tuple(features)
        row.examples["inside"] = [thumbs.example(r, inside=True, focus=focus) for r in inside]
        row.examples["outside"] = [
            thumbs.example(r, inside=False, focus=focus, matched=shared, of=len(remaining)) for r, shared in partners
        ]

    significant = [s for s in slices if s.significant]
    others = [s for s in slices if not s.significant]
    scale = _bar_scale(slices, overall.rate)
    slice_chart = None
    if slices and any(s.error_mean is not None for s in slices):
        slice_chart = charts.interval_chart(
            [f"#{s.rank} " + " & ".join(f"{f} = {v}" for f, v in s.predicates) for s in slices],
            [s.error_mean for s in slices],
            [s.ci_low for s in slices],
            [s.ci_high for s in slices],
            overall=overall.rate,
            highlight=[s.significant for s in slices],
            counts=[s.size or 0 for s in slices],
            salt="slices",
        )
    attributes = attribute_tables(run, overall)
    attribute_charts = {}
    if run.has_error:
        for i, table in enumerate(attributes):
            rows = [r for r in table.rows if r.rate is not None]
            if rows:
                attribute_charts[table.name] = charts.interval_chart(
                    [r.value for r in rows],
                    [r.rate for r in rows],
                    [r.ci_low for r in rows],
                    [r.ci_high for r in rows],
                    overall=overall.rate,
                    counts=[r.count for r in rows],
                    salt=f"attribute-{i}",
                    width=5.0,
                )

    from clipengine.report.baseline import baseline_section

    coverage = coverage_section(run, thumbs)
    context = {
        "baseline": baseline_section(run, thumbs),
        "title": _dataset_name(run.manifest) or run.run_dir.resolve().name,
        "run_name": run.run_dir.resolve().name,
        "facts": _facts(run, overall, slices) + _coverage_facts(coverage),
        "parameters": _parameters(run.manifest),
        "timings": _timings(run.manifest),
        "overall": overall,
        "slices": slices,
        "slices_missing": run.slices is None,
        "significant": significant,
        "others": others,
        "scale": scale,
        "slice_chart": slice_chart,
        "search": _search_facts(run.slices_summary),
        "corrected": any(s.true_error_mean is not None or s.true_note for s in slices),
        "attributes": attributes,
        "attribute_charts": attribute_charts,
        "coverage": coverage,
        "label_quality": _label_quality(run.label_quality, run.label_quality_columns),
        "reliability": _reliability(run.label_quality, run.label_quality_columns),
        "skipped": run.skipped,
        "skipped_reasons": run.skipped_reasons,
        "summary_md": run.summary_md,
        "manifest_json": json.dumps(run.manifest, indent=2, sort_keys=True, ensure_ascii=False, default=str),
        "notes": run.notes,
        "has_error": run.has_error,
        "n_items": run.frame.height,
        "version": _version(),
        "css": (_HERE / "static" / "report.css").read_text(encoding="utf-8"),
        "js": (_HERE / "static" / "report.js").read_text(encoding="utf-8"),
        "examples_per_side": EXAMPLES_PER_SIDE,
    }
    context["reliability_of"] = {r["attribute"]: r for r in context["reliability"]}
    return _environment().get_template("report.html.j2").render(**context), thumbs


def _environment():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    environment = Environment(
        loader=FileSystemLoader(str(_HERE / "templates")),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters.update(pct=_pct, num=_num, sci=_sci, fixed=_fixed, position=_position, change=_change)
    return environment


def _coverage_facts(coverage) -> list[tuple[str, str]]:
    """The header's coverage figure: pairs (else the highest t) covered of valid."""
    if coverage is None or not coverage.levels:
        return []
    level = next((entry for entry in coverage.levels if entry["t"] == 2), coverage.levels[-1])
    if level["covered"] is None or level["valid"] is None:
        return []
    return [(f"Coverage (t = {level['t']})", f"{_num(level['covered'])} of {_num(level['valid'])}")]


def _search_facts(summary: dict) -> dict[str, Any]:
    """What SliceLine searched, from the run-level part of slices.json."""
    from clipengine.slices.explain import family_text, labels_text

    params = summary.get("params") if isinstance(summary.get("params"), dict) else {}
    skipped = summary.get("skipped_features") if isinstance(summary.get("skipped_features"), dict) else {}
    features = summary.get("features") if isinstance(summary.get("features"), list) else []
    return {
        "n_evaluated": summary.get("n_evaluated") if isinstance(summary.get("n_evaluated"), int) else None,
        "features": [str(f) for f in features],
        "skipped": sorted((str(k), str(v)) for k, v in skipped.items()),
        "min_sup": params.get("min_sup"),
        "max_level": params.get("max_level"),
        "max_q": params.get("max_q"),
        "alpha": params.get("alpha"),
        "family": family_text(summary),
        "labels": labels_text(summary),
    }



LABEL_QUALITY_METRICS = ("accuracy", "precision", "recall", "f1")
SAMPLE_LABELLERS = ("zero_shot", "adapted")  # label_quality.csv's columns measured on a labelled sample


def _reliability(rows, columns) -> list[dict[str, Any]]:
    """The label-quality table's sample measurements per attribute: which labeller served, accuracy with
    its interval for zero-shot and adapted, reliable or not (and why), per class precision and
    recall with intervals. Empty without a labels file."""
    if rows is None or not {"attribute", "class", "served", "reliable"} <= set(columns):
        return []

    def interval(row, labeller, metric):
        value = _float(row.get(f"{labeller}_{metric}"))
        if value is None:
            return None
        return (value, _float(row.get(f"{labeller}_{metric}_low")), _float(row.get(f"{labeller}_{metric}_high")))

    out: list[dict[str, Any]] = []
    by_name: dict[str, dict[str, Any]] = {}
    for row in rows:
        if not row.get("served"):
            continue
        name = row.get("attribute") or ""
        if row.get("class") == "(all)":
            entry = {
                "attribute": name, "anchor": f"reliability-{len(out) + 1}", "served": row.get("served"),
                "labelled": _float(row.get("labelled")), "cv_accuracy": _float(row.get("cv_accuracy")),
                "reliable": row.get("reliable") == "yes", "reason": row.get("reason") or "",
                "accuracy": {lab: interval(row, lab, "accuracy") for lab in SAMPLE_LABELLERS},
                "classes": [], "precision": {},
            }
            out.append(entry)
            by_name[name] = entry
            continue
        entry = by_name.get(name)
        if entry is None:
            continue
        served = "adapted" if entry["accuracy"].get("adapted") else "zero_shot"
        precision = interval(row, served, "precision")
        entry["precision"][row.get("class") or ""] = precision
        entry["classes"].append({
            "name": row.get("class") or "", "labelled": _float(row.get("labelled")),
            "reliable": row.get("reliable"),
            "metrics": {lab: (interval(row, lab, "precision"), interval(row, lab, "recall")) for lab in SAMPLE_LABELLERS},
        })
    for entry in out:
        entry["labellers"] = [lab for lab in SAMPLE_LABELLERS if entry["accuracy"].get(lab) is not None]
    return out


def _label_quality(rows, columns) -> dict[str, Any] | None:
    """label_quality.csv as a table: per strategy (naive, ensemble...) accuracy / P / R / F1.

    Rows are grouped per attribute; its ``(all)`` row carries accuracy and macro F1. The
    best F1 of each row is marked. A CSV of another shape is shown as it is.
    """
    if rows is None:
        return None
    strategies: list[str] = []
    for column in columns:
        for metric in LABEL_QUALITY_METRICS:
            if column.endswith("_" + metric):
                strategy = column[: -len(metric) - 1]
                if strategy and strategy not in strategies and strategy not in SAMPLE_LABELLERS \
                        and column != "cv_accuracy":
                    strategies.append(strategy)
    if not strategies and "reliable" in columns:
        return None  # measured on a labelled sample only: the reliability section shows it
    structured = {"attribute", "class"} <= set(columns) and strategies
    if not structured:
        return {"structured": False, "columns": list(columns),
                "rows": [[(row.get(c) or "", _is_number(row.get(c))) for c in columns] for row in rows]}
    table = []
    previous = None
    for row in rows:
        if row.get("support") in (None, ""):
            continue  # a row of the labelled sample only
        attribute = row.get("attribute") or ""
        metrics = []
        for strategy in strategies:
            metrics.append([_float(row.get(f"{strategy}_{metric}")) for metric in LABEL_QUALITY_METRICS])
        f1s = [m[3] for m in metrics]
        best = max((v for v in f1s if v is not None), default=None)
        table.append({
            "attribute": attribute if attribute != previous else "",
            "class": row.get("class") or "",
            "overall": (row.get("class") or "") == "(all)",
            "support": _float(row.get("support")),
            "metrics": metrics,
            "best": [best is not None and len(strategies) > 1 and v == best for v in f1s],
        })
        previous = attribute
    return {"structured": True, "strategies": strategies, "metrics": LABEL_QUALITY_METRICS, "rows": table}


def _float(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value == value else None


def _is_number(text: Any) -> bool:
    return _float(text) is not None


# ---- formatting ----------------------------------------------------------------------------
def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f} %"


def _num(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.3g}"
    return f"{int(value):,}"


def _sci(value: float | None) -> str:
    """p- and q-values: plain down to 0.001, then scientific."""
    if value is None:
        return "–"
    if value == 0:
        return "0"
    return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def _change(value: float | None, binary: bool = True) -> str:
    """A change of an error rate: ``+19.3 pts`` (0/1 errors, percentage points) or ``+0.0123``."""
    if value is None:
        return "–"
    return f"{100 * value:+.1f} pts" if binary else f"{value:+.3g}"


def _fixed(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _position(value: float | None, scale: float) -> str:
    """A CSS percentage along an interval bar whose right end is ``scale``."""
    if value is None or not scale:
        return "0%"
    return f"{max(0.0, min(100.0, 100 * value / scale)):.2f}%"


def _bar_scale(slices, overall: float | None) -> float:
    values = [v for s in slices for v in (s.ci_high, s.error_mean) if v is not None]
    if overall is not None:
        values.append(overall)
    if not values:
        return 1.0
    top = max(values)
    return min(1.0, top * 1.1) if 0 < top <= 1 else (top * 1.1 if top > 0 else 1.0)


# ---- the manifest, read defensively (its producer may add fields) -----------------------------
def _get(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def _name(value: Any, *keys: str) -> str | None:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, dict):
        for key in keys:
            if isinstance(value.get(key), (str, int, float)):
                return str(value[key])
    return None


def _dataset_name(manifest: dict) -> str | None:
    return _name(manifest.get("dataset"), "name", "dataset") or _name(_get(manifest, "config", "dataset"))


def _facts(run, overall, slices) -> list[tuple[str, str]]:
    manifest = run.manifest
    model_record = _read_model_record(run.run_dir)
    record = model_record or (manifest.get("model") if isinstance(manifest.get("model"), dict) else {})
    model = _name(record, "name", "model", "architecture", "model_id") or _name(manifest.get("model"))
    tag = _name(record, "pretrained") or (Path(str(record["weights"])).name if record.get("weights") else None)
    if model and tag:
        model = f"{model} · {tag}"
    backend = (
        _name(manifest.get("backend"), "name")
        or _name(record.get("backend"))
        or _name(_get(manifest, "encode", "backend"))
        or _name(_get(manifest, "config", "encode", "backend"))
    )
    precision = _name(record.get("precision")) or _name(manifest.get("precision"))
    schema = (
        _name(manifest.get("schema"), "name")
        or _name(_get(manifest, "config", "schema"))
        or _name(_get(manifest, "config", "annotate", "schema"))
    )
    schema_hash = _name(_get(manifest, "schema", "hash")) or _name(manifest.get("schema_hash"))
    facts = [
        ("Dataset", _dataset_name(manifest) or "–"),
        ("Items", _num(run.frame.height)),
        ("Skipped", _num(run.skipped) if run.skipped is not None else "–"),
        ("Overall error rate", _pct(overall.rate) if overall.rate is not None else "–"),
        ("Significant slices", f"{sum(s.significant for s in slices)} of {len(slices)}" if run.slices is not None else "–"),
        ("Model", model or "–"),
        ("Backend", " · ".join(v for v in (backend, precision) if v) or "–"),
        ("Schema", (schema or "–") + (f" ({schema_hash[:12]})" if schema_hash else "")),
    ]
    duration = _duration(manifest)
    if duration:
        facts.append(("Run time", duration))
    return facts


def _read_model_record(run_dir: Path) -> dict:
    from clipengine.artifacts import read_model_record
    from clipengine.errors import ClipengineError

    try:
        record = read_model_record(run_dir)
    except ClipengineError:
        return {}
    return record if isinstance(record, dict) else {}


def _duration(manifest: dict) -> str | None:
    for key in ("duration_s", "elapsed_s", "wall_s", "run_time_s", "seconds"):
        seconds = manifest.get(key)
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
            return _seconds(float(seconds))
    timings = _timings(manifest)
    if timings:
        return _seconds(sum(seconds for _, seconds in timings if seconds is not None))
    return None


def _seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {rest:02d} s"


def _timings(manifest: dict) -> list[tuple[str, float | None]]:
    """(stage, seconds) from the manifest, whichever shape it records them in."""
    found: list[tuple[str, float | None]] = []
    timings = manifest.get("timings") or manifest.get("timings_s")
    if isinstance(timings, dict):
        for stage, seconds in timings.items():
            if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
                found.append((str(stage), float(seconds)))
    stages = manifest.get("stages")
    if not found and isinstance(stages, dict):
        for stage, record in stages.items():
            seconds = _get(record, "seconds") if isinstance(record, dict) else None
            seconds = seconds if seconds is not None else _get(record, "duration_s") if isinstance(record, dict) else None
            if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
                found.append((str(stage), float(seconds)))
    return found


def _parameters(manifest: dict) -> list[tuple[str, str]]:
    """Flattened ``key = value`` pairs of the run's configuration."""
    source = None
    for key in ("parameters", "config", "params", "settings"):
        if isinstance(manifest.get(key), dict):
            source = manifest[key]
            break
    if source is None:
        return []
    pairs: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key in value:
                walk(f"{prefix}.{key}" if prefix else str(key), value[key])
        else:
            pairs.append((prefix, json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, str) else value))

    walk("", source)
    return [(key, value) for key, value in pairs if value not in ("null", "[]", "{}")]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clipengine")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "dev"
