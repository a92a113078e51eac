"""The annotate stage: stored image embeddings + a prompt schema → zero-shot metadata.

Per attribute the most similar class wins (softmax over the attribute's classes, at CLIP's
logit scale): columns ``<attr>`` (class name), ``<attr>_prob`` (its probability) and
``<attr>_margin`` (its lead over the runner-up). Images are never re-encoded: only the
schema's prompts go through the text tower of the same model, once per (model, prompts),
cached.

With a labels file (``AnnotateConfig.labels``), the attributes it labels may be adapted to it
(:mod:`clipengine.annotate.adapt`, one pass of :func:`clipengine.kernels.fewshot.label_adapted`), and
the labelled items keep their person's label (``<attr>_source``: ``human``, probability and margin 1).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl

from clipengine import artifacts
from clipengine.annotate.schemas import Schema, load_schema
from clipengine.artifacts import key_columns, read_encoded
from clipengine.config import AnnotateConfig
from clipengine.devices import numba_threads, resolve_device
from clipengine.errors import ClipengineError

DEFAULT_LOGIT_SCALE = 100.0  # CLIP's trained logit scale sits at its clamp, 100


def resolve_schema(config: AnnotateConfig | None = None, schema: Schema | str | None = None) -> Schema:
    """``schema`` (or ``config.schema``) loaded, with ``config.strategy`` applied."""
    config = config or AnnotateConfig()
    loaded = schema if isinstance(schema, Schema) else load_schema(schema or config.schema)
    if not config.strategy:
        return loaded
    default, overrides = parse_strategy(config.strategy)
    return loaded.with_strategy(default, overrides)


def parse_strategy(text: str) -> tuple[str | None, dict[str, str]]:
    """``"mean"`` → ("mean", {}); ``"max,hair_color=topm"`` → ("max", {"hair_color": "topm"})."""
    default, overrides = None, {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" in part:
            name, _, value = part.partition("=")
            overrides[name.strip()] = value.strip()
        elif default is not None:
            raise ClipengineError(f"--strategy {text!r}: two strategies for every attribute ({default}, {part})")
        else:
            default = part
    return default, overrides


def logit_scale_of(text_encoder=None, record: dict | None = None) -> float:
    """CLIP's logit scale for the model: the embeddings' model record's, else the text encoder's
    ``model_record``'s, else 100 (an encoder from elsewhere may carry no record)."""
    encoder_record = getattr(text_encoder, "model_record", None) or {}
    for source in ((record or {}).get("logit_scale"), encoder_record.get("logit_scale")):
        if source is not None:
            value = float(source)
            if np.isfinite(value) and value > 0:
                return value
    return DEFAULT_LOGIT_SCALE


def annotate_embeddings(
    embeddings: np.ndarray,
    schema: Schema | str,
    text_encoder,
    config: AnnotateConfig | None = None,
    *,
    model_id: str | None = None,
    logit_scale: float | None = None,
) -> pl.DataFrame:
    """Label (N, D) float embeddings (L2-normalized; may be a memmap) with ``schema``.

    Returns N rows with, per attribute in schema order, ``<attr>`` (String: class name),
    ``<attr>_prob`` and ``<attr>_margin`` (Float32). ``config.strategy`` overrides the
    schema's strategies; ``model_id`` keys the prompt-embedding cache (None: no cache);
    ``logit_scale`` None asks :func:`logit_scale_of`.
    """
    config = config or AnnotateConfig()
    schema = resolve_schema(config, schema)
    labels, probs, margins = label_arrays(embeddings, schema, text_encoder, config, model_id=model_id, logit_scale=logit_scale)
    return metadata_frame(schema, labels, probs, margins)


def annotate_strategies(
    embeddings: np.ndarray,
    schema: Schema | str,
    text_encoder,
    strategies: list[str],
    config: AnnotateConfig | None = None,
    *,
    model_id: str | None = None,
    logit_scale: float | None = None,
) -> dict[str, pl.DataFrame]:
    """The same labelling under several strategies (e.g. ``["naive", "mean"]``), prompts encoded once.

    A strategy ``"schema"`` keeps the schema's own per-attribute strategies."""
    base = schema if isinstance(schema, Schema) else load_schema(schema)
    out = {}
    for strategy in strategies:
        with_strategy = base if strategy == "schema" else resolve_schema(AnnotateConfig(strategy=strategy), base)
        labels, probs, margins = label_arrays(
            embeddings, with_strategy, text_encoder, config or AnnotateConfig(), model_id=model_id, logit_scale=logit_scale
        )
        out[strategy] = metadata_frame(with_strategy, labels, probs, margins)
    return out


def label_arrays(embeddings, schema: Schema, text_encoder, config: AnnotateConfig, *, model_id=None, logit_scale=None):
    """``labels`` (N, A) int32, ``probs``/``margins`` (N, A) float32 for an already resolved schema."""
    from clipengine.annotate.class_embeddings import prompt_embeddings

    if embeddings.ndim != 2:
        raise ClipengineError(f"embeddings must be (N, D), got shape {embeddings.shape}")
    prompts = prompt_embeddings(schema, text_encoder, model_id)
    scale = logit_scale if logit_scale is not None else logit_scale_of(text_encoder)
    return label_with_prompts(embeddings, schema, prompts, scale, config)


def label_with_prompts(embeddings, schema: Schema, prompts: np.ndarray, logit_scale: float, config: AnnotateConfig):
    """Label (N, D) ``embeddings`` given the schema's (P, D) prompt embeddings (``schema.prompts()`` order)."""
    from clipengine.annotate.class_embeddings import build_class_side

    check_prompt_embeddings(schema, prompts, embeddings.shape[1])
    labels, probs, margins = label_with_class_side(embeddings, build_class_side(schema, prompts), logit_scale, config,
                                                   name=schema.name)
    check_finite_labels(probs)
    return labels, probs, margins


def check_prompt_embeddings(schema: Schema, prompts: np.ndarray, image_dim: int) -> None:
    """(P, D) ``prompts`` must be one row per prompt of ``schema``, as wide as the image embeddings."""
    if prompts.shape[0] != len(schema.prompts()):
        raise ClipengineError(f"schema '{schema.name}' has {len(schema.prompts())} prompts but {prompts.shape[0]} embeddings")
    if prompts.shape[1] != image_dim:
        raise ClipengineError(
            f"the text tower gives {prompts.shape[1]}-d embeddings but the images are {image_dim}-d: "
            "annotate needs the model that encoded them"
        )


def label_with_class_side(embeddings, side, logit_scale: float, config: AnnotateConfig, *, name: str = ""):
    """``labels`` (N, A) int32, ``probs``/``margins`` (N, A) float32 of (N, D) ``embeddings`` against a
    prepared :class:`clipengine.annotate.class_embeddings.ClassSide` (what an encode worker reuses for every shard).
    Rows holding NaN give NaN probabilities (see :func:`check_finite_labels`)."""
    from clipengine.kernels.similarity import label_segments
    from clipengine.progress import progress_bar

    device = resolve_device(config.device, runtime="cupy")
    bar = progress_bar(embeddings.shape[0], f"annotate ({name})", enabled=config.progress, unit="img")
    try:
        with numba_threads():
            return label_segments(embeddings, side.matrix, side.prompt_offsets, side.class_offsets,
                                  float(logit_scale), reduce=side.reduce, top_m=side.top_m,
                                  chunk_rows=config.chunk_rows, device=device, on_chunk=bar.update)
    finally:
        bar.close()


def check_finite_labels(probs: np.ndarray) -> None:
    """A ``ClipengineError`` naming the rows (of the whole table) whose embeddings held NaN or inf."""
    bad = np.flatnonzero(np.isnan(probs).any(axis=1))
    if bad.size:
        raise ClipengineError(f"embeddings rows {bad[:5].tolist()} hold NaN or infinite values; re-encode them")


def metadata_table(items: pl.DataFrame, schema: Schema, labels: np.ndarray, probs: np.ndarray,
                   margins: np.ndarray, human: np.ndarray | None = None) -> pl.DataFrame:
    """What ``metadata.parquet`` holds: the key columns of ``items`` (``path`` [, ``box``]; N rows) then
    :func:`metadata_frame` of the (N, A) label arrays."""
    return pl.concat([key_columns(items), metadata_frame(schema, labels, probs, margins, human)], how="horizontal")


def write_metadata(path: str | os.PathLike, items: pl.DataFrame, schema: Schema, labels: np.ndarray,
                   probs: np.ndarray, margins: np.ndarray, *, model_id: str, logit_scale: float,
                   thresholds: dict[str, float] | None = None, human: np.ndarray | None = None,
                   extra_record: dict[str, str] | None = None) -> pl.DataFrame:
    """Write :func:`metadata_table` of the label arrays to ``path`` with :func:`metadata_record`
    (:func:`clipengine.artifacts.write_metadata`); every labelling of every executor ends here.
    ``thresholds`` (binary attributes → probability threshold) are applied first and recorded;
    ``human`` (N, A) bool marks the person's labels (``<attr>_source``); ``extra_record``: more keys."""
    table = metadata_table(items, schema, labels, probs, margins, human)
    record = metadata_record(schema, model_id, logit_scale)
    if thresholds:
        from clipengine.annotate.thresholds import apply_thresholds

        table = apply_thresholds(table, thresholds, schema)
        record[artifacts.META_THRESHOLDS] = json.dumps(thresholds)
    record.update(extra_record or {})
    artifacts.write_metadata(path, table, record)
    return table


def metadata_frame(schema: Schema, labels: np.ndarray, probs: np.ndarray, margins: np.ndarray,
                   human: np.ndarray | None = None) -> pl.DataFrame:
    """Per attribute ``<attr>``, ``<attr>_prob``, ``<attr>_margin`` and, given ``human`` (N, A) bool,
    ``<attr>_source`` (``human``/``model``)."""
    columns = {}
    sources = pl.Series([artifacts.SOURCE_MODEL, artifacts.SOURCE_HUMAN], dtype=pl.String)
    for a, attribute in enumerate(schema.attributes):
        # class names gathered by index on polars' side: no Python string per row
        names = pl.Series(attribute.name, attribute.class_names, dtype=pl.String)
        columns[attribute.name] = names.gather(np.ascontiguousarray(labels[:, a], dtype=np.uint32))
        columns[f"{attribute.name}{artifacts.PROB_SUFFIX}"] = pl.Series(probs[:, a], dtype=pl.Float32)
        columns[f"{attribute.name}{artifacts.MARGIN_SUFFIX}"] = pl.Series(margins[:, a], dtype=pl.Float32)
        if human is not None:
            source = sources.gather(human[:, a].astype(np.uint32))
            columns[f"{attribute.name}{artifacts.SOURCE_SUFFIX}"] = source.alias(f"{attribute.name}{artifacts.SOURCE_SUFFIX}")
    return pl.DataFrame(columns)


def annotate_dir(
    emb_dir: str | os.PathLike,
    config: AnnotateConfig | None = None,
    out_path: str | os.PathLike | None = None,
    *,
    text_encoder=None,
) -> pl.DataFrame:
    """Annotate an encode output folder and write ``out_path`` (default ``EMB_DIR/metadata.parquet``).

    Rows: ``path`` (and ``box``) from ``items.parquet``, then the attribute columns. The Parquet
    file metadata records the model id, schema name, schema hash, strategies and logit scale.
    """
    config = config or AnnotateConfig()
    stored = read_encoded(emb_dir)
    schema = resolve_schema(config)
    label_set = read_labels_for(config, stored.items, schema)  # a bad labels file fails before any work
    thresholds = None
    if config.thresholds is not None:
        from clipengine.annotate.thresholds import read_thresholds

        thresholds = read_thresholds(config.thresholds, schema)
    if text_encoder is None:
        text_encoder = text_encoder_for(stored, config)
    scale = logit_scale_of(text_encoder, stored.record)
    destination = Path(out_path) if out_path is not None else stored.path / artifacts.METADATA
    return label_and_write(destination, stored, schema, text_encoder, replace(config, strategy=None), scale,
                           label_set=label_set, thresholds=thresholds)


def read_labels_for(config: AnnotateConfig, items: pl.DataFrame, schema: Schema):
    """``config.labels`` read against ``items`` and ``schema`` (a LabelSet), or None without one."""
    if config.labels is None:
        return None
    from clipengine.annotate.adapt import ADAPT_CHOICES
    from clipengine.annotate.labels import read_labels

    if config.adapt not in ADAPT_CHOICES:
        raise ClipengineError(f"--adapt {config.adapt!r}: expected one of {', '.join(ADAPT_CHOICES)}")
    return read_labels(config.labels, items, {a.name: a.class_names for a in schema.attributes})


def label_and_write(destination: str | os.PathLike, stored: artifacts.EncodedDir, schema: Schema, text_encoder,
                    config: AnnotateConfig, scale: float, *, label_set=None,
                    thresholds: dict[str, float] | None = None) -> pl.DataFrame:
    """Label ``stored``'s embeddings with ``schema`` (strategies resolved) and write ``destination``:
    zero-shot, or with ``label_set`` (a LabelSet) adapted per ``config.adapt`` and with the labelled
    items keeping their labels. Returns the written table."""
    if label_set is None:
        labels, probs, margins = label_arrays(stored.embeddings, schema, text_encoder, config,
                                              model_id=stored.model_id or None, logit_scale=scale)
        return write_metadata(destination, stored.items, schema, labels, probs, margins, model_id=stored.model_id,
                              logit_scale=scale, thresholds=thresholds)
    from clipengine.annotate.adapt import adapt_attributes, build_adapted_side
    from clipengine.annotate.class_embeddings import build_class_side, prompt_embeddings

    prompts = prompt_embeddings(schema, text_encoder, stored.model_id or None)
    check_prompt_embeddings(schema, prompts, stored.embeddings.shape[1])
    side = build_class_side(schema, prompts)
    adaptations = adapt_attributes(stored.embeddings, schema, side, scale, label_set, config.adapt)
    if any(a.adapted for a in adaptations.values()):
        labels, probs, margins = label_adapted_side(stored.embeddings, build_adapted_side(schema, side, scale,
                                                                                         adaptations), config,
                                                    name=schema.name)
    else:
        labels, probs, margins = label_with_class_side(stored.embeddings, side, scale, config, name=schema.name)
    check_finite_labels(probs)
    human = apply_human_labels(labels, probs, margins, schema, label_set)
    if thresholds:  # calibrated for zero-shot scores: not for adapted attributes
        thresholds = {a: t for a, t in thresholds.items() if not (a in adaptations and adaptations[a].adapted)}
    return write_metadata(destination, stored.items, schema, labels, probs, margins, model_id=stored.model_id,
                          logit_scale=scale, thresholds=thresholds, human=human,
                          extra_record=adaptation_record(schema, label_set, adaptations))


def label_adapted_side(embeddings, side, config: AnnotateConfig, *, name: str = ""):
    """``labels`` (N, A) int32, ``probs``/``margins`` (N, A) float32 from an
    :class:`clipengine.kernels.fewshot.AdaptedSide` (the CPU: the adapted pass has no GPU kernel)."""
    from clipengine.kernels.fewshot import label_adapted
    from clipengine.progress import progress_bar

    bar = progress_bar(embeddings.shape[0], f"annotate ({name}, adapted)", enabled=config.progress, unit="img")
    try:
        with numba_threads():
            return label_adapted(embeddings, side, chunk_rows=config.chunk_rows, on_chunk=bar.update)
    finally:
        bar.close()


def apply_human_labels(labels: np.ndarray, probs: np.ndarray, margins: np.ndarray, schema: Schema,
                       label_set) -> np.ndarray:
    """Give the labelled items their person's label (probability and margin 1), in place; returns
    (N, A) bool: which labels are the person's."""
    human = np.zeros(labels.shape, dtype=bool)
    for a, attribute in enumerate(schema.attributes):
        if attribute.name not in label_set.truth:
            continue
        labelled = label_set.labelled(attribute.name)
        index = {name: i for i, name in enumerate(attribute.class_names)}
        rows = label_set.rows[labelled]
        labels[rows, a] = [index[v] for v in label_set.truth[attribute.name][labelled]]
        probs[rows, a] = 1.0
        margins[rows, a] = 1.0
        human[rows, a] = True
    return human


def adaptation_record(schema: Schema, label_set, adaptations) -> dict[str, str]:
    """The key/value record of a labelling with a labels file: the choice per attribute, the labels
    file and the label checks (per labelled item: true, zero-shot and out-of-fold served class)."""
    from clipengine.bindings.files import sha256_file

    checks = {}
    for attribute in schema.attributes:
        adaptation = adaptations.get(attribute.name)
        if adaptation is None:
            continue
        names = np.asarray(attribute.class_names, dtype=object)
        checks[attribute.name] = {
            "rows": adaptation.rows.tolist(),
            "inclusion": (1.0 / adaptation.weights).tolist(),
            "truth": names[adaptation.truth].tolist(),
            "zero_shot": names[adaptation.zero_shot_predictions].tolist(),
            "served": names[adaptation.served_predictions].tolist(),
        }
    labels_record = {"file": str(label_set.source), "sha256": sha256_file(label_set.source),
                     "rows": int(len(label_set.rows)), "population": int(label_set.population)}
    return {
        artifacts.META_ADAPTATION: json.dumps({name: a.record() for name, a in adaptations.items()}),
        artifacts.META_LABELS: json.dumps(labels_record),
        artifacts.META_LABEL_CHECKS: json.dumps(checks, ensure_ascii=False),
    }


def metadata_record(schema: Schema, model_id: str, logit_scale: float) -> dict[str, str]:
    content = schema.to_dict()
    for entry, attribute in zip(content["attributes"], schema.attributes):
        entry["truth"] = attribute.truth
    return {
        artifacts.META_MODEL_ID: model_id,
        artifacts.META_SCHEMA: schema.name,
        artifacts.META_SCHEMA_HASH: schema.hash,
        artifacts.META_STRATEGY: json.dumps(schema.strategies),
        artifacts.META_LOGIT_SCALE: repr(float(logit_scale)),
        artifacts.META_SCHEMA_CONTENT: json.dumps(content, ensure_ascii=False),
    }


def text_encoder_for(stored: artifacts.EncodedDir, config: AnnotateConfig):
    """The text tower of the model that made ``stored``; ``config.model``, when given, must be that model.
    Without it, the tower is loaded only when a prompt embedding is not cached yet."""
    from clipengine.encode.encoders import create_encoder

    if config.model is not None:
        from clipengine.config import EncodeConfig

        encoder = create_encoder(EncodeConfig(model=config.model, device=config.device, backend="torch", precision="fp32"))
        given = str(encoder.model_record.get("model_id", ""))
        check_same_model(stored.model_id, given, stored.path)
        return encoder
    return TextTowerOnDemand(stored, config.device)


class TextTowerOnDemand:
    """The text tower of an encode folder's model, loaded on its first ``encode_texts``: labelling with
    prompt embeddings already cached (per model and schema) needs no model at all. Its
    ``model_record`` is the folder's ``model.json`` wherever that records all a text tower would
    (the logit scale; a model family without one), else the loaded tower's."""

    def __init__(self, stored: artifacts.EncodedDir, device: str):
        self._stored = stored
        self._device = device
        self._encoder = None

    def _tower(self):
        if self._encoder is None:
            from clipengine.encode.encoders import text_encoder_from_dir

            self._encoder = text_encoder_from_dir(self._stored.path, device=self._device)
        return self._encoder

    @property
    def model_record(self) -> dict:
        from clipengine.encode.models import MODEL_FAMILIES

        record = self._stored.record
        if "logit_scale" in record or record.get("source") in MODEL_FAMILIES:
            return record
        return self._tower().model_record

    def encode_texts(self, texts):
        return self._tower().encode_texts(texts)


def check_same_model(stored_id: str, given_id: str, where) -> None:
    if stored_id and given_id and stored_id != given_id:
        raise ClipengineError(
            f"{where}: embeddings were made by model {stored_id} but the given model is {given_id}; "
            "labels need the text tower of the same model (drop --model/--weights or re-encode)"
        )


def label_targets(schema: Schema, config: AnnotateConfig, has_truth: bool) -> list[tuple[str, Schema]]:
    """The metadata files the annotate stage of a run writes, each with its strategy-resolved schema:
    ``metadata.parquet`` (the schema's strategies, or ``config.strategy``) and, with ground truth,
    ``metadata_naive.parquet`` (the first prompt per class, for the label-quality comparison)."""
    targets = [(artifacts.METADATA, resolve_schema(config, schema))]
    if has_truth:
        targets.append((artifacts.NAIVE_METADATA, resolve_schema(replace(config, strategy="naive"), schema)))
    return targets


def annotate_run(run_dir: str | os.PathLike, targets: list[tuple[str, Schema]], text_encoder,
                 config: AnnotateConfig) -> int:
    """The annotate stage of a run: label ``run_dir``'s embeddings for every (metadata file, schema)
    of ``targets`` (:func:`label_targets`) with ``text_encoder``'s prompts; how many rows. With
    ``config.labels``, the first target (``metadata.parquet``) is adapted to them; the others (the
    naive comparison) stay zero-shot."""
    stored = read_encoded(run_dir)
    label_set = read_labels_for(config, stored.items, targets[0][1]) if targets else None
    scale = logit_scale_of(text_encoder, stored.record)
    for number, (name, target) in enumerate(targets):
        label_and_write(Path(run_dir) / name, stored, target, text_encoder, replace(config, strategy=None), scale,
                        label_set=label_set if number == 0 else None)
    return stored.items.height
