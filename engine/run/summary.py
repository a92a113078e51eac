"""``summary.md``: the run in one page of Markdown, read from the run directory's files.

Top slices with their statistics, t-way coverage and the thinnest combinations, label quality
(when ground truth exists), counts and the stage timings. It is one of the two run files with timings and dates (with ``manifest.json``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from clipengine import artifacts
from clipengine.errors import ClipengineError

TOP_SLICES = 10
TOP_MISSING = 5  # missing / thin combinations named in the coverage paragraph
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+!|~&])")


def escape(text: Any) -> str:
    """Data as literal Markdown text: Markdown's and HTML's special characters backslash-escaped,
    line breaks folded, so a value such as ``<b>x</b>`` or ``a|b`` shows as written."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


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
        lines.append("")
    if not records:
        return lines + ["SliceLine found no slice with an error rate above the overall rate."]
    if not any(r.get("significant") for r in records):
        lines += ["**No slice is significant** at the chosen q-value; the slices below may be noise.", ""]
    lines += [
        "| # | slice | size | errors | error rate | 95 % CI | q-value | significant |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rank, record in enumerate(records[:TOP_SLICES], start=1):
        lines.append(
            f"| {rank} | {_slice_text(record.get('predicates', {}))} | {record.get('size')} | "
            f"{_fmt(record.get('error_sum'), 0) if isinstance(record.get('error_sum'), float) and record['error_sum'].is_integer() else _fmt(record.get('error_sum'))} | "
            f"{_pct(record.get('error_mean'))} | {_pct(record.get('ci_low'))} – {_pct(record.get('ci_high'))} | "
            f"{_sci(record.get('q_value'))} | {'yes' if record.get('significant') else 'no'} |"
        )
    return lines


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
    table = table.with_columns(pl.col(c).cast(pl.Float64, strict=False) for c in table.columns
                               if c.endswith(("_accuracy", "_f1", "_precision", "_recall")))
    overall = table.filter(pl.col("class") == "(all)")
    accuracy_columns = [c for c in table.columns if c.endswith("_accuracy")]
    f1_columns = [c for c in table.columns if c.endswith("_f1")]
    if overall.height == 0 or not accuracy_columns:
        return []
    strategies = [c[: -len("_accuracy")] for c in accuracy_columns]
    lines = ["## Label quality (zero-shot attributes vs ground truth)", "",
             "| attribute | n | " + " | ".join(f"{s} accuracy" for s in strategies) + " | "
             + " | ".join(f"{s} macro F1" for s in strategies) + " |",
             "|" + " --- |" * (2 + 2 * len(strategies))]
    for row in overall.iter_rows(named=True):
        lines.append(f"| {escape(row['attribute'])} | {row['support']} | "
                     + " | ".join(_fmt(row[c]) for c in accuracy_columns) + " | "
                     + " | ".join(_fmt(row[c]) for c in f1_columns) + " |")
    return lines + ["", "Per-class precision / recall / F1: `label_quality.md`.", ""]


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
