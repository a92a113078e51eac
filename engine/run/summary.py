"""``summary.md``: the run in one page of Markdown, read from the run directory's files.

Top slices with their statistics, t-way coverage and the thinnest combinations, label quality
(when ground truth exists), counts and the stage timings. It is one of the two run files with timings and dates (with ``manifest.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipengine import artifacts
from clipengine.errors import ClipengineError
from clipengine.markdown import escape

TOP_SLICES = 10
TOP_MISSING = 5  # missing / thin combinations named in the coverage paragraph


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _sci(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2g}" if value >= 1e-3 else f"{value:.1e}"


def _slice_text(predicates: dict) -> str:
    return " AND ".join(f"{escape(name)} = {'(null)' if value is None else escape(value)}"
                        for name, value in predicates.items())


def _slices_section(run_dir: Path) -> list[str]:
    try:
        summary, records = artifacts.read_slices(run_dir)
    except ClipengineError as error:
        return [f"No slices ({escape(error)})."]
    from clipengine.slices.explain import family_text, labels_text

    lines = []
    if summary:
        lines.append(
            f"{summary.get('n_rows', '–')} items, overall error rate {_pct(summary.get('error_mean'))}; "
            f"{summary.get('n_evaluated', '–')} candidate slices evaluated over "
            f"{len(summary.get('features', []))} features."
        )
        skipped = summary.get("skipped_features") or {}
        if skipped:
            lines.append("Features left out: " + "; ".join(f"{escape(k)} ({escape(v)})" for k, v in skipped.items()) + ".")
        for text in (family_text(summary), labels_text(summary)):
            if text:
                lines.append(escape(text))
        lines.append("")
    if not records:
        return lines + ["SliceLine found no slice with an error rate above the overall rate."]
    if not any(r.get("significant") for r in records):
        lines += ["**No slice is significant** at the chosen q-value; the slices below may be noise.", ""]
    corrected = bool(summary.get("labels"))
    held_out = (summary.get("family") or {}).get("design") == "split"
    level = summary.get("confidence")
    level = "95 %" if not isinstance(level, (int, float)) or abs(level - 0.95) < 1e-9 else f"{100 * level:.2f} %"
    header = (f"| # | slice | size | {'held-out errors / rows' if held_out else 'errors'} | "
              f"error rate{' (held-out)' if held_out else ''} | {level} CI | q-value | significant |")
    rule = "| --- | --- | --- | --- | --- | --- | --- | --- |"
    if corrected:
        header += " true group: error rate | true group: CI | true group: size | confirmed |"
        rule += " --- | --- | --- | --- |"
    lines += [header, rule]
    for rank, record in enumerate(records[:TOP_SLICES], start=1):
        errors = record.get("test_error_sum") if held_out else record.get("error_sum")
        errors = _fmt(errors, 0) if isinstance(errors, float) and errors.is_integer() else _fmt(errors)
        if held_out:
            errors = f"{errors} / {record.get('test_size', '–')}"
        line = (
            f"| {rank} | {_slice_text(record.get('predicates', {}))} | {record.get('size')} | {errors} | "
            f"{_pct(record.get('error_mean'))} | {_pct(record.get('ci_low'))} – {_pct(record.get('ci_high'))} | "
            f"{_sci(record.get('q_value'))} | {'yes' if record.get('significant') else 'no'} |"
        )
        if corrected:
            size = record.get("true_size")
            confirmed = record.get("confirmed")
            line += (f" {_pct(record.get('true_error_mean'))} | {_pct(record.get('true_ci_low'))} – "
                     f"{_pct(record.get('true_ci_high'))} | {'–' if size is None else f'≈ {size:,.0f}'} | "
                     f"{'yes' if confirmed else '**not confirmed**' if confirmed is False else '–'} |")
        lines.append(line)
    return lines


def _interval(row: dict, column: str) -> str:
    value = row.get(column)
    if value is None:
        return "–"
    return f"{value:.3f} ({row.get(column + '_low') or 0:.3f}–{row.get(column + '_high') or 0:.3f})"


def _reliability_section(table) -> list[str]:
    """Per attribute measured on a labelled sample: which labeller served, its accuracy with the
    95 % interval beside zero-shot's, and whether the attribute is reliable (and why not)."""
    import polars as pl

    if "reliable" not in table.columns or "served" not in table.columns:
        return []
    numeric = [c for c in table.columns if c.startswith(("zero_shot_", "adapted_"))]
    table = table.with_columns(pl.col(c).cast(pl.Float64, strict=False) for c in numeric)
    overall = table.filter((pl.col("class") == "(all)") & pl.col("served").is_not_null())
    if overall.height == 0:
        return []
    lines = ["## Label reliability (measured on your labelled sample)", "",
             "| attribute | labels | served | accuracy (95 % interval) | zero-shot accuracy | reliable |",
             "| --- | --- | --- | --- | --- | --- |"]
    notes = []
    for row in overall.iter_rows(named=True):
        served = "adapted_accuracy" if row.get("adapted_accuracy") is not None else "zero_shot_accuracy"
        reliable = row.get("reliable") == "yes"
        lines.append(f"| {escape(row['attribute'])} | {row.get('labelled') or '–'} | {escape(row['served'])} | "
                     f"{_interval(row, served)} | {_interval(row, 'zero_shot_accuracy')} | "
                     f"{'yes' if reliable else '**no**'} |")
        if not reliable and row.get("reason"):
            notes.append(f"- **{escape(row['attribute'])}** is unreliable: {escape(row['reason'])}.")
    if notes:
        lines += ["", "Slices whose predicates use an unreliable attribute may describe the model's labelling "
                      "errors rather than the model under test:", *notes]
    return lines + ["", "Per-class precision and recall with intervals: `label_quality.md`.", ""]


def _coverage_section(run_dir: Path) -> list[str]:
    """A short paragraph from coverage.json: t-way coverage, the thinnest combinations in words with
    their expected counts, items out of the ODD."""
    try:
        data = artifacts.read_coverage(run_dir)
    except ClipengineError as error:
        return ["## Coverage", "", f"No coverage ({escape(error)}).", ""]
    if not isinstance(data, dict):
        return []
    params = data.get("params") if isinstance(data.get("params"), dict) else {}
    features = list(data["features"]) if isinstance(data.get("features"), dict) else []
    min_count = params.get("min_count", 1)
    lines = ["## Coverage", ""]
    text = (f"{data.get('rows', '–')} items over {len(features)} features ({', '.join(escape(f) for f in features)}); "
            f"a combination of their values is covered with at least {escape(min_count)} item(s)")
    levels = [e for e in data.get("coverage", []) if isinstance(e, dict)]
    shares = [f"t = {escape(e.get('t'))}: {escape(e.get('covered'))} of {escape(e.get('valid'))} "
              f"({_pct(e['covered'] / e['valid']) if isinstance(e.get('covered'), int) and e.get('valid') else '–'})"
              for e in levels]
    if shares:
        text += ": " + "; ".join(shares)
    lines.append(text + ".")
    skipped = data.get("skipped_features") if isinstance(data.get("skipped_features"), dict) else {}
    if skipped:
        lines += ["", "Not covered: " + "; ".join(f"{escape(k)} ({escape(v)})" for k, v in skipped.items()) + "."]
    missing = [m for m in data.get("missing", []) if isinstance(m, dict) and isinstance(m.get("predicates"), dict)]
    total = data.get("missing_total", len(missing))
    if missing:
        named = [m for m in missing if not m.get("implied")][:TOP_MISSING]
        lines += ["", f"{escape(total)} valid combination(s) have fewer than {escape(min_count)} item(s); the "
                  "thinnest (items, and the number expected if the features were independent):", ""]
        lines += [f"- {_words(m['predicates'])}: {escape(m.get('count', '–'))} item(s), "
                  f"{_fmt(m.get('expected'), 1) if isinstance(m.get('expected'), (int, float)) else '–'} expected"
                  for m in named]
    elif levels:
        lines += ["", f"Every valid combination has at least {escape(min_count)} item(s)."]
    if isinstance(data.get("odd"), dict):
        lines += ["", f"{escape(data.get('out_of_odd', 0))} item(s) outside the ODD"
                  + (f" ({escape(params['odd'])})" if params.get("odd") else "") + "."]
    return lines + ["", "Every combination: `coverage.parquet`; the heat maps: the report.", ""]


def _words(predicates: dict) -> str:
    return " AND ".join(f"{escape(name)} {'in' if isinstance(value, list) else '='} "
                        + (f"({', '.join(escape(v) for v in value)})" if isinstance(value, list) else escape(value))
                        for name, value in predicates.items())


def _label_quality_section(run_dir: Path) -> list[str]:
    import polars as pl

    table = artifacts.read_label_quality(run_dir)
    if table is None:
        return []
    reliability = _reliability_section(table)
    table = table.with_columns(pl.col(c).cast(pl.Float64, strict=False) for c in table.columns
                               if c.endswith(("_accuracy", "_f1", "_precision", "_recall")))
    if "support" not in table.columns:  # a labelled sample only: no ground-truth table
        return reliability
    overall = table.filter(pl.col("class") == "(all)")
    accuracy_columns = [c for c in table.columns if c.endswith("_accuracy") and c != "cv_accuracy"
                        and not c.startswith(("zero_shot_", "adapted_"))]
    f1_columns = [c for c in table.columns if c.endswith("_f1") and not c.startswith(("zero_shot_", "adapted_"))]
    if overall.height == 0 or not accuracy_columns:
        return reliability
    strategies = [c[: -len("_accuracy")] for c in accuracy_columns]
    lines = ["## Label quality (zero-shot attributes vs ground truth)", "",
             "| attribute | n | " + " | ".join(f"{s} accuracy" for s in strategies) + " | "
             + " | ".join(f"{s} macro F1" for s in strategies) + " |",
             "|" + " --- |" * (2 + 2 * len(strategies))]
    for row in overall.iter_rows(named=True):
        lines.append(f"| {escape(row['attribute'])} | {row['support']} | "
                     + " | ".join(_fmt(row[c]) for c in accuracy_columns) + " | "
                     + " | ".join(_fmt(row[c]) for c in f1_columns) + " |")
    return lines + ["", "Per-class precision / recall / F1: `label_quality.md`.", ""] + reliability


def _baseline_section(run_dir: Path) -> list[str]:
    """What changed since the baseline (``compare.json``), when the run has a current comparison."""
    try:
        found = artifacts.read_comparison(run_dir)
    except ClipengineError as error:
        return ["## Since the baseline", "", f"No comparison ({escape(error)}).", ""]
    if found is None or not artifacts.comparison_is_current(run_dir, found[0]):
        return []
    document = found[0]
    binary = document.get("binary_errors", True)
    counts = document.get("findings") or {}
    old = document.get("old") or {}
    lines = ["## Since the baseline", "",
             f"Baseline `{escape(old.get('run', '?'))}`: {counts.get('worse', 0)} slices worse, "
             f"{counts.get('better', 0)} better, {counts.get('new', 0)} new weak slices, "
             f"{counts.get('drift', 0)} attributes drifted (details: `{artifacts.COMPARE_JSON}`, the report).", ""]
    for mismatch in document.get("mismatches") or []:
        lines.append(f"- not compared: {escape(mismatch.get('what'))} {escape(mismatch.get('name'))}: "
                     f"{escape(mismatch.get('reason'))}")
    changed = [r for r in document.get("slices") or [] if r.get("status") in ("worse", "better") and r.get("finding")]
    if changed:
        rate = _pct if binary else _fmt
        lines += ["", "| status | slice | baseline | now | change (95 % CI) | q-value |", "| --- | --- | --- | --- | --- | --- |"]
        for record in changed[:TOP_SLICES]:
            scale = 100 if binary else 1
            change = (f"{scale * record['diff']:+.1f} ({scale * (record.get('ci_low') or 0):+.1f} to "
                      f"{scale * (record.get('ci_high') or 0):+.1f})") if record.get("diff") is not None else "–"
            lines.append(f"| {record['status']} | {_slice_text(record.get('predicates', {}))} | "
                         f"{rate(record.get('old_error_mean'))} | {rate(record.get('new_error_mean'))} | {change} | "
                         f"{_sci(record.get('q_value'))} |")
    return lines + [""]


def build_summary(run_dir: str | Path, manifest: dict) -> str:
    """The Markdown text of ``summary.md`` for ``run_dir`` and its manifest."""
    run_dir = Path(run_dir)
    dataset = manifest.get("dataset") or {}
    model = manifest.get("model") or {}
    schema = manifest.get("schema") or {}
    stages = manifest.get("stages") or {}
    encode = stages.get("encode") or {}
    lines = [f"# clipengine run: {escape(dataset.get('name', '–'))}", ""]
    facts = [
        ("dataset", escape(dataset.get("name", "–")) + (f" ({escape(dataset['root'])})" if dataset.get("root") else "")),
        ("items", f"{encode.get('encoded', '–')} encoded, {encode.get('skipped', 0)} skipped"),
        ("model", f"{escape(model.get('model_id', '–'))} ({escape(model.get('backend', '–'))}, "
                  f"{escape(model.get('precision', '–'))})"),
        ("schema", f"{escape(schema.get('name', '–'))} ({str(schema.get('hash', ''))[:12]})"),
    ]
    notice = (manifest.get("model_choice") or {}).get("notice")
    if notice:
        facts.append(("note", escape(notice.removeprefix("notice: "))))
    skipped_inputs = dataset.get("skipped_inputs") or []
    if skipped_inputs:
        facts.append(("inputs left out", f"{len(skipped_inputs)} (see manifest.json → dataset.skipped_inputs)"))
    lines += [f"- **{k}**: {v}" for k, v in facts]
    lines += ["", "## Top slices", ""] + _slices_section(run_dir) + [""]
    lines += _baseline_section(run_dir)
    lines += _coverage_section(run_dir)
    lines += _label_quality_section(run_dir)
    skipped = artifacts.read_skipped(run_dir)
    if skipped is not None and skipped.height:
        import polars as pl

        reasons = skipped.with_columns(pl.col("reason").str.split(":").list.first().alias("r")).group_by("r").len()
        lines += ["## Items not encoded", ""]
        lines += [f"- {escape(r)}: {n}" for r, n in sorted(reasons.iter_rows())] + [""]
    lines += ["## Stages", "", "| stage | seconds | this run | finished |", "| --- | --- | --- | --- |"]
    for name, record in stages.items():
        if name in ("summary", "report"):
            continue
        lines.append(f"| {name} | {_fmt(record.get('seconds'), 1)} | {'ran' if record.get('ran') else 'reused'} | "
                     f"{record.get('finished', '–')} |")
    return "\n".join(lines).rstrip() + "\n"


def write_summary(run_dir: str | Path, manifest: dict) -> Path:
    """``summary.md`` of ``run_dir`` (:func:`build_summary`), written atomically."""
    from clipengine.artifacts import write_summary as write

    return write(run_dir, build_summary(run_dir, manifest))
