"""Label quality: zero-shot metadata against ground truth, strategies side by side.

Per attribute: counts per class, accuracy, per-class precision / recall / F1 and the confusion
matrix, for each strategy (e.g. ``naive`` vs the ``mean`` ensemble, the layout of the CelebA
metadata study). Written as ``label_quality.csv`` and ``label_quality.md``.

Ground truth is CelebA's ``list_attr_celeba.txt`` (line 1 the count, line 2 the header, rows
``image_id  1 -1 ...``) or any CSV / Parquet table. How an attribute finds its truth (the
schema's ``truth`` key, or ``--map attr=SPEC``), SPEC being one of:

- ``Column``: for a binary attribute, positive (1, true, yes, or the positive class name) means
  its positive class, negative (-1, 0, false, no) the other; for an exclusive attribute, values are
  class names, or integer class indices in schema order;
- ``!Column``: a binary attribute whose column says the opposite (CelebA's ``No_Beard``);
- ``black:Black_Hair|blond:Blond_Hair|...``: one positive column per class; rows with none or
  several positive are left out.

Rows are matched on ``path`` (or the truth's key column, by full path, else by file name).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from clipengine import artifacts
from clipengine.annotate.thresholds import (
    ThresholdResult,
    binary_scores,
    fit_threshold,
    positive_probability,
    thresholds_markdown,
)
from clipengine.errors import ClipengineError
from clipengine.markdown import escape

ALL_CLASSES = "(all)"
_POSITIVE = {"1", "true", "yes", "y", "t"}
_NEGATIVE = {"-1", "0", "false", "no", "n", "f"}


@dataclass(frozen=True)
class AttributeInfo:
    """What evaluation needs of a schema attribute."""

    name: str
    classes: tuple[str, ...]
    kind: str = "exclusive"
    positive: str | None = None
    truth: str | None = None

    @classmethod
    def from_schema(cls, schema) -> list["AttributeInfo"]:
        if isinstance(schema, dict):  # the schema content stored in metadata.parquet
            return [
                cls(a["name"], tuple(c["name"] for c in a["classes"]), a.get("kind", "exclusive"), a.get("positive"),
                    a.get("truth"))
                for a in schema["attributes"]
            ]
        return [cls(a.name, a.class_names, a.kind, a.positive, a.truth) for a in schema.attributes]


@dataclass
class AttributeQuality:
    """One attribute under one strategy: ``confusion[i, j]`` counts truth class i labelled class j."""

    attribute: str
    strategy: str
    classes: tuple[str, ...]
    confusion: np.ndarray

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / self.n) if self.n else math.nan

    def per_class(self) -> dict[str, np.ndarray]:
        tp = np.diag(self.confusion).astype(np.float64)
        support = self.confusion.sum(axis=1).astype(np.float64)
        predicted = self.confusion.sum(axis=0).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(predicted > 0, tp / predicted, np.nan)
            recall = np.where(support > 0, tp / support, np.nan)
            f1 = np.where(tp > 0, 2 * tp / (predicted + support), np.where(support + predicted > 0, 0.0, np.nan))
        return {"support": support, "predicted": predicted, "precision": precision, "recall": recall, "f1": f1}

    @property
    def macro_f1(self) -> float:
        f1 = self.per_class()["f1"]
        return float(np.nanmean(f1)) if np.isfinite(f1).any() else math.nan


@dataclass
class EvalReport:
    """Label quality per attribute (schema order) and strategy (given order)."""

    strategies: list[str]
    attributes: list[str]
    results: dict[tuple[str, str], AttributeQuality] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # attribute -> why it has no truth
    matched_rows: int = 0
    calibration: dict[str, list] = field(default_factory=dict)  # strategy -> [ThresholdResult]

    def get(self, attribute: str, strategy: str) -> AttributeQuality:
        return self.results[(attribute, strategy)]

    def confusion(self, attribute: str, strategy: str) -> pl.DataFrame:
        quality = self.get(attribute, strategy)
        frame = pl.DataFrame({name: quality.confusion[:, j] for j, name in enumerate(quality.classes)})
        return frame.insert_column(0, pl.Series("truth", list(quality.classes)))

    def to_polars(self) -> pl.DataFrame:
        """One row per (attribute, class) plus an ``(all)`` row per attribute (n, accuracy, macro F1);
        per strategy s: ``s_predicted``, ``s_precision``, ``s_recall``, ``s_f1``, ``s_accuracy``."""
        rows = []
        for attribute in self.attributes:
            if (attribute, self.strategies[0]) not in self.results:
                continue
            first = self.get(attribute, self.strategies[0])
            overall = {"attribute": attribute, "class": ALL_CLASSES, "support": first.n}
            per_class_rows = [{"attribute": attribute, "class": c, "support": None} for c in first.classes]
            for strategy in self.strategies:
                quality = self.get(attribute, strategy)
                stats = quality.per_class()
                overall.update({f"{strategy}_predicted": quality.n, f"{strategy}_precision": None,
                                f"{strategy}_recall": None, f"{strategy}_f1": _num(quality.macro_f1),
                                f"{strategy}_accuracy": _num(quality.accuracy)})
                for i, row in enumerate(per_class_rows):
                    row["support"] = int(stats["support"][i])
                    row.update({f"{strategy}_predicted": int(stats["predicted"][i]),
                                f"{strategy}_precision": _num(stats["precision"][i]),
                                f"{strategy}_recall": _num(stats["recall"][i]), f"{strategy}_f1": _num(stats["f1"][i]),
                                f"{strategy}_accuracy": None})
            rows.append(overall)
            rows.extend(per_class_rows)
        schema = {"attribute": pl.String, "class": pl.String, "support": pl.Int64}
        for strategy in self.strategies:
            schema.update({f"{strategy}_predicted": pl.Int64, f"{strategy}_precision": pl.Float64,
                           f"{strategy}_recall": pl.Float64, f"{strategy}_f1": pl.Float64,
                           f"{strategy}_accuracy": pl.Float64})
        return pl.DataFrame(rows, schema=schema, orient="row")

    def to_markdown(self) -> str:
        """Per attribute: accuracy per strategy, then per class support, predictions and P / R / F1."""
        names = self.strategies
        lines = ["# Label quality", "",
                 f"{self.matched_rows} items matched with ground truth; strategies: {', '.join(names)}.", ""]
        summary = "| attribute | n | " + " | ".join(f"{s} accuracy" for s in names) + " | " + " | ".join(
            f"{s} macro F1" for s in names) + " |"
        lines += [summary, "|" + " --- |" * (2 + 2 * len(names))]
        for attribute in self.attributes:
            if (attribute, names[0]) not in self.results:
                continue
            qs = [self.get(attribute, s) for s in names]
            lines.append(f"| {escape(attribute)} | {qs[0].n} | " + " | ".join(_fmt(q.accuracy) for q in qs) + " | "
                         + " | ".join(_fmt(q.macro_f1) for q in qs) + " |")
        for attribute in self.attributes:
            if (attribute, names[0]) not in self.results:
                continue
            qs = [self.get(attribute, s) for s in names]
            lines += ["", f"## {escape(attribute)}", "",
                      "accuracy: " + ", ".join(f"{s} {_fmt(q.accuracy)}" for s, q in zip(names, qs)), ""]
            header = "| class | support | " + " | ".join(f"{s} predicted | {s} P | {s} R | {s} F1" for s in names) + " |"
            lines += [header, "|" + " --- |" * (2 + 4 * len(names))]
            stats = [q.per_class() for q in qs]
            for i, name in enumerate(qs[0].classes):
                cells = [f"{int(st['predicted'][i])} | {_fmt(st['precision'][i])} | {_fmt(st['recall'][i])} | "
                         f"{_fmt(st['f1'][i])}" for st in stats]
                lines.append(f"| {escape(name)} | {int(stats[0]['support'][i])} | " + " | ".join(cells) + " |")
        for strategy, results in self.calibration.items():
            lines += ["", thresholds_markdown(results, strategy).rstrip()]
        if self.skipped:
            lines += ["", "Not evaluated (no ground truth): "
                      + "; ".join(f"{escape(a)} ({escape(why)})" for a, why in self.skipped.items()), ""]
        return "\n".join(lines).rstrip() + "\n"

    def write(self, out_dir: str | os.PathLike) -> tuple[Path, Path]:
        """``label_quality.csv``/``.md`` (and ``thresholds.json`` after calibration) into ``out_dir``."""
        paths = artifacts.write_label_quality(out_dir, self.to_polars(), self.to_markdown())
        if self.calibration:
            from dataclasses import asdict

            from clipengine.bindings.files import write_json

            write_json(Path(out_dir) / artifacts.THRESHOLDS,
                       {s: [asdict(r) for r in rs] for s, rs in self.calibration.items()})
        return paths


def _num(value) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def _fmt(value) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.3f}"


# ---- ground truth ----------------------------------------------------------------------------


def read_truth(path: str | os.PathLike) -> pl.DataFrame:
    """A ground-truth table: CelebA's attribute list (→ ``image_id`` + Int8 ±1 columns), CSV or Parquet."""
    path = Path(path)
    if not path.is_file():
        raise ClipengineError(f"{path}: ground-truth file not found")
    if path.suffix.lower() == ".parquet":
        return pl.read_parquet(path)
    with open(path, encoding="utf-8", errors="replace") as handle:
        first = handle.readline().strip()
    if first.isdigit():
        return _read_celeba_attributes(path)
    try:
        separator = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
        return pl.read_csv(path, separator=separator, infer_schema_length=10_000)
    except Exception as error:  # polars raises several error types for malformed text
        raise ClipengineError(f"{path}: not a readable CSV table ({str(error).splitlines()[0]})") from None


def _read_celeba_attributes(path: Path) -> pl.DataFrame:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if len(lines) < 2:
        raise ClipengineError(f"{path}: a CelebA attribute list needs a count line and a header line")
    header = lines[1].split()
    ids, values = [], []
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(header) + 1:
            raise ClipengineError(f"{path}: line {number} has {len(parts) - 1} values but the header names {len(header)}")
        ids.append(parts[0])
        try:
            values.append([int(v) for v in parts[1:]])
        except ValueError:
            raise ClipengineError(f"{path}: line {number}: values must be 1 or -1") from None
    matrix = np.asarray(values, dtype=np.int8).reshape(len(ids), len(header))
    return pl.DataFrame({"image_id": ids, **{name: matrix[:, j] for j, name in enumerate(header)}})


def parse_mapping(text: str | None) -> dict[str, str]:
    """``"eyeglasses=Eyeglasses,beard=!No_Beard"`` → {attribute: SPEC}."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        name, sep, spec = part.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise ClipengineError(f"--map {part!r}: expected attr=COLUMN (or attr=!COLUMN, attr=class:COL|class:COL)")
        out[name.strip()] = spec.strip()
    return out


class _MissingColumn(ClipengineError):
    """The truth table lacks a column a spec names."""


def truth_labels(truth: pl.DataFrame, info: AttributeInfo, spec: str) -> list[str | None]:
    """The true class name of each truth row (None where unknown) for one attribute."""
    columns = {c.lower(): c for c in truth.columns}

    def column(name: str) -> pl.Series:
        found = columns.get(name.strip().lower())
        if found is None:
            raise _MissingColumn(f"truth has no column {name.strip()!r} (for attribute '{info.name}', spec {spec!r})")
        return truth[found]

    if "|" in spec or (":" in spec and not spec.startswith("!")):
        pairs = []
        for part in spec.split("|"):
            class_name, sep, col = part.partition(":")
            if not sep or class_name not in info.classes:
                raise ClipengineError(
                    f"attribute '{info.name}': truth spec part {part!r} must be class:COLUMN with a class of {list(info.classes)}"
                )
            pairs.append((class_name, _as_bool(column(col), info.name)))
        stacked = np.stack([np.asarray([v is True for v in values]) for _, values in pairs], axis=1)
        out: list[str | None] = [None] * truth.height
        for i in np.flatnonzero(stacked.sum(axis=1) == 1):
            out[i] = pairs[int(stacked[i].argmax())][0]
        return out
    inverted = spec.startswith("!")
    series = column(spec[1:] if inverted else spec)
    if info.kind == "binary":
        other = next(c for c in info.classes if c != info.positive)
        as_names = series.cast(pl.String).to_list()
        if series.dtype == pl.String and set(v for v in as_names if v is not None) <= set(info.classes):
            flags = [None if v is None else v == info.positive for v in as_names]
        else:
            flags = _as_bool(series, info.name)
        if inverted:
            flags = [None if f is None else not f for f in flags]
        return [None if f is None else (info.positive if f else other) for f in flags]
    if inverted:
        raise ClipengineError(f"attribute '{info.name}': '!' applies to binary attributes only")
    if series.dtype.is_integer():
        values = series.to_list()
        bad = [v for v in values if v is not None and not 0 <= v < len(info.classes)]
        if bad:
            raise ClipengineError(
                f"attribute '{info.name}': truth column {series.name!r} holds class index {bad[0]} outside 0..{len(info.classes) - 1}"
            )
        return [None if v is None else info.classes[v] for v in values]
    values = series.cast(pl.String).to_list()
    unknown = sorted({v for v in values if v is not None and v not in info.classes})
    if unknown:
        raise ClipengineError(
            f"attribute '{info.name}': truth column {series.name!r} holds {unknown[:3]}, not classes of {list(info.classes)}"
        )
    return values


def _as_bool(series: pl.Series, attribute: str) -> list[bool | None]:
    out = []
    for value in series.cast(pl.String).to_list():
        if value is None:
            out.append(None)
            continue
        text = value.strip().lower()
        if text in _POSITIVE:
            out.append(True)
        elif text in _NEGATIVE:
            out.append(False)
        else:
            raise ClipengineError(
                f"attribute '{attribute}': truth column {series.name!r} holds {value!r}; expected 1/-1, 1/0, true/false or yes/no"
            )
    return out


# ---- evaluation ------------------------------------------------------------------------------


def label_quality(
    metadata_by_strategy: dict[str, pl.DataFrame],
    truth: pl.DataFrame,
    mapping: dict[str, str] | None = None,
    *,
    schema=None,
    key: str | None = None,
    calibrate: bool = False,
    fit_fraction: float = 0.5,
    seed: int = 0,
) -> EvalReport:
    """Compare each strategy's labels with ``truth``.

    ``metadata_by_strategy``: strategy name → annotate output (``path`` [, ``box``], ``<attr>`` …);
    all with the same rows in the same order. ``schema``: a :class:`~clipengine.annotate.schemas.Schema` or
    the stored schema content (classes, binary positive class, default ``truth`` specs); without
    it, classes come from the labels. ``mapping``: attribute → SPEC, overriding the schema's.
    ``key``: truth column holding item ids (default ``path``, else ``image_id``, else the first).
    Without a ``path`` column in the metadata, truth rows are taken as aligned row by row.
    ``calibrate``: also fit binary attributes' thresholds (see :func:`calibrate_thresholds`).
    """
    if not metadata_by_strategy:
        raise ClipengineError("label_quality: no metadata given")
    strategies = list(metadata_by_strategy)
    frames = list(metadata_by_strategy.values())
    heights = {f.height for f in frames}
    if len(heights) != 1:
        raise ClipengineError(f"label_quality: the metadata tables differ in rows ({sorted(heights)})")
    infos, truths, skipped, matched = aligned_truth(frames[0], truth, mapping, schema=schema, key=key)
    report = EvalReport(strategies=strategies, attributes=[i.name for i in infos], matched_rows=matched, skipped=skipped)
    for info in infos:
        if info.name not in truths:
            continue
        true_names = truths[info.name]
        index = {c: i for i, c in enumerate(info.classes)}
        for strategy, frame in metadata_by_strategy.items():
            if info.name not in frame.columns:
                raise ClipengineError(f"metadata of strategy {strategy!r} has no column {info.name!r}")
            confusion = np.zeros((len(info.classes), len(info.classes)), dtype=np.int64)
            for t, p in zip(true_names, frame[info.name].to_list()):
                if t is not None and p is not None:
                    if p not in index:
                        raise ClipengineError(f"metadata column {info.name!r} holds {p!r}, not a class of {list(info.classes)}")
                    confusion[index[t], index[p]] += 1
            report.results[(info.name, strategy)] = AttributeQuality(info.name, strategy, info.classes, confusion)
    if calibrate:
        for strategy, frame in metadata_by_strategy.items():
            report.calibration[strategy] = calibrate_thresholds(
                frame, truth, mapping, schema=schema, key=key, fit_fraction=fit_fraction, seed=seed
            )
    return report


def aligned_truth(metadata: pl.DataFrame, truth: pl.DataFrame, mapping=None, *, schema=None, key=None):
    """Per attribute, the true class of each metadata row (None where unknown).

    Returns (attribute infos, {attribute: list[str | None]}, {attribute: why skipped}, matched row count).
    """
    infos = _attribute_infos(schema, metadata)
    mapping = dict(mapping or {})
    unknown = [a for a in mapping if a not in {i.name for i in infos}]
    if unknown:
        raise ClipengineError(f"--map names attribute {unknown[0]!r}, not in the metadata ({', '.join(i.name for i in infos)})")
    truth_rows = _match_rows(metadata, truth, key)
    matched = int((truth_rows >= 0).sum())
    if not matched:
        raise ClipengineError("no metadata row matched a ground-truth row (compare the 'path' values with the truth's ids)")
    lower_columns = {c.lower() for c in truth.columns}
    truths: dict[str, list] = {}
    skipped: dict[str, str] = {}
    for info in infos:
        spec = mapping.get(info.name) or info.truth or (info.name if info.name.lower() in lower_columns else None)
        if spec is None:
            skipped[info.name] = "no truth column; give --map"
            continue
        try:
            truth_values = truth_labels(truth, info, spec)
        except _MissingColumn as error:
            if info.name in mapping:
                raise
            skipped[info.name] = str(error)  # the schema's default truth spec does not apply here
            continue
        truths[info.name] = [truth_values[r] if r >= 0 else None for r in truth_rows]
    return infos, truths, skipped, matched


def _attribute_infos(schema, frame: pl.DataFrame) -> list[AttributeInfo]:
    if schema is not None:
        return AttributeInfo.from_schema(schema)
    names = [c[: -len("_prob")] for c in frame.columns if c.endswith("_prob") and c[: -len("_prob")] in frame.columns]
    infos = []
    for name in names:
        classes = tuple(sorted(v for v in frame[name].unique().to_list() if v is not None))
        binary = set(classes) == {"no", "yes"}
        infos.append(AttributeInfo(name, ("yes", "no") if binary else classes, "binary" if binary else "exclusive",
                                   "yes" if binary else None))
    if not infos:
        raise ClipengineError("metadata holds no attribute columns (<attr>, <attr>_prob)")
    return infos


def _match_rows(metadata: pl.DataFrame, truth: pl.DataFrame, key: str | None) -> np.ndarray:
    """For each metadata row, its truth row (-1 when none): by path, else by file name."""
    if "path" not in metadata.columns:
        if metadata.height != truth.height:
            raise ClipengineError(
                f"metadata has no 'path' column and {metadata.height} rows but the truth {truth.height}: cannot align them"
            )
        return np.arange(metadata.height)
    if key is None:
        key = next((c for c in ("path", "image_id", "file", "filename") if c in truth.columns), truth.columns[0])
    elif key not in truth.columns:
        raise ClipengineError(f"--key {key!r}: the truth has no such column ({', '.join(truth.columns[:8])} …)")
    ids = truth[key].cast(pl.String).to_list()
    paths = metadata["path"].to_list()
    best = None
    for transform in (lambda s: s, lambda s: Path(s).name, lambda s: Path(s).stem):
        lookup: dict[str, int] = {}
        for i, value in enumerate(ids):
            if value is not None:
                lookup.setdefault(transform(value), i)
        rows = np.fromiter((lookup.get(transform(p), -1) for p in paths), dtype=np.int64, count=len(paths))
        if best is None or (rows >= 0).sum() > (best >= 0).sum():
            best = rows
    return best


# ---- files -----------------------------------------------------------------------------------


def evaluate_files(
    metadata_paths: list[str | os.PathLike],
    truth_path: str | os.PathLike,
    *,
    mapping: dict[str, str] | None = None,
    key: str | None = None,
    calibrate: bool = False,
) -> EvalReport:
    """Evaluate one or more ``metadata.parquet`` files (one per strategy, same schema and model)."""
    from clipengine.artifacts import META_MODEL_ID, META_SCHEMA_CONTENT, META_STRATEGY, read_parquet_metadata

    frames: dict[str, pl.DataFrame] = {}
    schema_content = None
    models, schema_names = set(), set()
    for path in metadata_paths:
        path = Path(path)
        if not path.is_file():
            raise ClipengineError(f"{path}: metadata file not found")
        meta = read_parquet_metadata(path)
        if meta.get(META_MODEL_ID):
            models.add(meta[META_MODEL_ID])
        content = json.loads(meta[META_SCHEMA_CONTENT]) if META_SCHEMA_CONTENT in meta else None
        if content is not None:
            names = tuple(a["name"] for a in content["attributes"])
            schema_names.add(names)
            schema_content = schema_content or content
        strategies = sorted(set(json.loads(meta[META_STRATEGY]).values())) if META_STRATEGY in meta else []
        name = "/".join(strategies) or path.stem
        if name in frames:
            name = f"{name}:{path.stem}"
        frames[name] = artifacts.read_parquet_file(path)
    if len(models) > 1:
        raise ClipengineError(f"the metadata files come from different models ({', '.join(sorted(models))}); compare like with like")
    if len(schema_names) > 1:
        raise ClipengineError("the metadata files use different schemas (their attributes differ)")
    return label_quality(frames, read_truth(truth_path), mapping, schema=schema_content, key=key, calibrate=calibrate)


def evaluate_embeddings_dir(
    emb_dir: str | os.PathLike,
    truth_path: str | os.PathLike,
    *,
    schema: str = "celeba",
    strategies: list[str] | None = None,
    mapping: dict[str, str] | None = None,
    key: str | None = None,
    config=None,
    calibrate: bool = False,
) -> EvalReport:
    """Annotate ``emb_dir`` under each of ``strategies`` (default: ``naive`` and the schema's own,
    named ``schema``) and evaluate them side by side; prompts are encoded once."""
    from clipengine.annotate.schemas import load_schema
    from clipengine.annotate.stage import annotate_strategies, logit_scale_of, text_encoder_for
    from clipengine.config import AnnotateConfig

    config = config or AnnotateConfig(schema=schema)
    stored = artifacts.read_encoded(emb_dir)
    loaded = load_schema(schema)
    own = loaded.strategy_name
    strategies = list(dict.fromkeys(strategies or ["naive", own]))
    encoder = text_encoder_for(stored, config)
    frames = annotate_strategies(
        stored.embeddings, loaded, encoder, ["schema" if s == own else s for s in strategies], config,
        model_id=stored.model_id or None, logit_scale=logit_scale_of(encoder, stored.record),
    )
    keys = artifacts.key_columns(stored.items)
    named = {name: pl.concat([keys, frame], how="horizontal") for name, frame in zip(strategies, frames.values())}
    return label_quality(named, read_truth(truth_path), mapping, schema=loaded, key=key, calibrate=calibrate)


# ---- threshold calibration (binary attributes) -----------------------------------------------

def calibrate_thresholds(
    metadata: pl.DataFrame,
    truth: pl.DataFrame,
    mapping: dict[str, str] | None = None,
    *,
    schema=None,
    key: str | None = None,
    fit_fraction: float = 0.5,
    seed: int = 0,
) -> list[ThresholdResult]:
    """Per binary attribute with truth: fit a threshold on P(positive) on a random ``fit_fraction`` of
    the labelled rows, and measure its effect against argmax on the other rows."""
    if not 0.0 < fit_fraction < 1.0:
        raise ClipengineError(f"--fit-fraction must be within (0, 1), got {fit_fraction}")
    infos, truths, _, _ = aligned_truth(metadata, truth, mapping, schema=schema, key=key)
    results = []
    for info in infos:
        if info.kind != "binary" or info.name not in truths:
            continue
        labelled = np.asarray([t is not None for t in truths[info.name]])
        rows = np.flatnonzero(labelled)
        if len(rows) < 4:
            continue
        is_positive = np.asarray([t == info.positive for t in truths[info.name]])
        p = positive_probability(metadata, info.name, info.positive)
        shuffled = np.random.default_rng(seed).permutation(rows)
        cut = max(1, min(len(rows) - 1, int(round(fit_fraction * len(rows)))))
        fit, test = shuffled[:cut], shuffled[cut:]
        threshold = fit_threshold(p[fit], is_positive[fit])
        default = binary_scores(p[test] >= 0.5, is_positive[test])
        calibrated = binary_scores(p[test] >= threshold, is_positive[test])
        results.append(ThresholdResult(info.name, str(info.positive), threshold, len(fit), len(test),
                                       default[0], calibrated[0], default[1], calibrated[1], default[2], calibrated[2]))
    return results




def evaluate_run(run_dir: str | os.PathLike, schema, truth: pl.DataFrame | None, mapping: dict[str, str],
                 labels: str | os.PathLike | None = None):
    """The eval stage of a run: with ground truth, ``metadata_naive.parquet`` and ``metadata.parquet``
    (the schema's own strategies, or the served labels when adapted; items a person labelled left
    out) against ``truth``; with a labels file, the reliability of each attribute measured on it
    (:mod:`clipengine.annotate.reliability`). Writes ``label_quality.csv``/``.md`` into ``run_dir``;
    returns ``(EvalReport or None, ReliabilityReport or None)``."""
    run_dir = Path(run_dir)
    report = reliability = None
    if truth is not None:
        metadata = artifacts.read_parquet_file(run_dir / artifacts.METADATA)
        naive = artifacts.read_parquet_file(run_dir / artifacts.NAIVE_METADATA)
        adaptation, _, _ = artifacts.read_adaptation(run_dir / artifacts.METADATA)
        served = "served" if any(r.get("method") != "zero-shot" for r in adaptation.values()) else schema.strategy_name
        metadata, naive = without_human_labels(metadata, naive)
        report = label_quality({"naive": naive, served: metadata}, truth, mapping, schema=schema)
    if labels is not None:
        from clipengine.annotate.reliability import evaluate_labels

        reliability = evaluate_labels(run_dir / artifacts.METADATA, labels)
    write_label_quality(run_dir, report, reliability)
    return report, reliability


def without_human_labels(metadata: pl.DataFrame, *others: pl.DataFrame) -> tuple[pl.DataFrame, ...]:
    """``metadata`` and ``others`` (same rows) with each attribute's label emptied where a person gave
    it (``<attr>_source`` human): ground truth then measures the model on the items it labelled."""
    sources = [c for c in metadata.columns if c.endswith(artifacts.SOURCE_SUFFIX)]
    out = [metadata, *others]
    for column in sources:
        name = column[: -len(artifacts.SOURCE_SUFFIX)]
        human = metadata.get_column(column) == artifacts.SOURCE_HUMAN
        out = [frame.with_columns(pl.when(human).then(None).otherwise(pl.col(name)).alias(name))
               if name in frame.columns else frame for frame in out]
    return tuple(out)


def write_label_quality(out_dir: str | os.PathLike, report: EvalReport | None = None, reliability=None):
    """``label_quality.csv``/``.md`` from ground truth (``report``), a labelled sample (``reliability``)
    or both (one row per attribute and class, the columns of both side by side)."""
    if report is None and reliability is None:
        raise ClipengineError("eval: give ground truth (--truth) or a labels file (--labels)")
    if reliability is None:
        return report.write(out_dir)
    table, markdown = reliability.to_polars(), reliability.to_markdown()
    if report is not None:
        truth_table = report.to_polars()
        table = truth_table.join(table, on=["attribute", "class"], how="full", coalesce=True, maintain_order="left")
        markdown = report.to_markdown() + "\n" + markdown
    return artifacts.write_label_quality(out_dir, table, markdown)
