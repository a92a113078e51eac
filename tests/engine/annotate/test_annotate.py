"""The annotate stage: each aggregation by hand, and the whole stage on a random-init tiny CLIP
against an independent computation with open_clip's encode_text on the same weights."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from clipengine.annotate.schemas import load_schema, parse_schema
from clipengine.annotate.stage import (
    annotate_dir,
    annotate_strategies,
    label_with_prompts,
    metadata_frame,
)
from clipengine.artifacts import META_MODEL_ID, META_SCHEMA, META_SCHEMA_HASH, META_STRATEGY, read_encoded
from clipengine.bindings.files import read_parquet_metadata
from clipengine.config import AnnotateConfig
from clipengine.errors import ClipengineError

HAND_SCHEMA = """
attributes:
  thing:
    top_m: 2
    classes:
      a: {prompts: [p1, p2, p3]}
      b: {prompts: [q1]}
"""


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# image e = (1, 0, 0); class a's prompts at cosines 1, 0, 0; class b's one prompt at cosine 0.6; scale 10.
HAND_CASES = {
    "naive": ("a", 10 * (1.0 - 0.6)),  # first prompt only
    "mean": ("b", 10 * (0.6 - 1 / np.sqrt(3))),  # normalized mean (1,1,1)/√3 → cosine 0.577 < 0.6
    "max": ("a", 10 * (1.0 - 0.6)),
    "logsumexp": ("a", np.log((np.exp(10.0) + 2.0) / 3.0) - 6.0),
    "topm": ("b", 6.0 - 10 * 0.5),  # mean of the top two: (1 + 0) / 2
}


@pytest.mark.parametrize("strategy", list(HAND_CASES))
def test_each_aggregation_against_hand_computation(strategy):
    schema = parse_schema(HAND_SCHEMA).with_strategy(strategy)
    prompts = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0]], np.float32)
    image = np.array([[1, 0, 0]], np.float32)
    labels, probs, margins = label_with_prompts(image, schema, prompts, 10.0, AnnotateConfig(device="cpu", progress=False))
    frame = metadata_frame(schema, labels, probs, margins)
    label, gap = HAND_CASES[strategy]
    assert frame["thing"].to_list() == [label]
    assert frame["thing_prob"][0] == pytest.approx(sigmoid(gap), abs=1e-6)
    assert frame["thing_margin"][0] == pytest.approx(2 * sigmoid(gap) - 1, abs=1e-6)
    assert frame.columns == ["thing", "thing_prob", "thing_margin"]
    assert frame.schema["thing_prob"] == pl.Float32


# ---- the whole stage on a tiny random-init CLIP ------------------------------------------------


@pytest.fixture(scope="module")
def emb_dir(tiny_clip, sample_photos, tmp_path_factory):
    from clipengine.config import EncodeConfig
    from clipengine.encode.stage import encode_items

    out = tmp_path_factory.mktemp("emb")
    items = pl.DataFrame({"path": [str(p) for p in sample_photos]})
    encode_items(items, out, EncodeConfig(model=tiny_clip.model_config, device="cpu", backend="torch", precision="fp32",
                                          progress=False, workers=1))
    return out


def reference_labels(tiny_clip, embeddings, schema, scale):
    """open_clip eager: encode_text on the prompts, mean ensemble, softmax per attribute."""
    import open_clip
    import torch

    model = tiny_clip.build_reference()
    with torch.no_grad():
        text = model.encode_text(open_clip.tokenize(schema.prompts())).double()
    text = torch.nn.functional.normalize(text, dim=-1).numpy()
    images = np.asarray(embeddings, np.float64)
    out, start = {}, 0
    for attribute in schema.attributes:
        rows = []
        for c in attribute.classes:
            mean = text[start : start + len(c.prompts)].mean(axis=0)
            rows.append(mean / np.linalg.norm(mean))
            start += len(c.prompts)
        logits = scale * images @ np.stack(rows).T
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        order = np.sort(p, axis=1)[:, ::-1]
        out[attribute.name] = ([attribute.class_names[i] for i in p.argmax(axis=1)], order[:, 0], order[:, 0] - order[:, 1])
    return out


def test_annotate_dir_equals_open_clip_reference(tiny_clip, emb_dir, tmp_path):
    out_path = tmp_path / "metadata.parquet"
    frame = annotate_dir(emb_dir, AnnotateConfig(schema="celeba", strategy="mean", device="cpu", progress=False), out_path)
    stored = pl.read_parquet(out_path)
    assert stored.equals(frame)
    schema = load_schema("celeba")
    assert stored.columns[0] == "path"
    assert stored.columns[1:4] == ["young", "young_prob", "young_margin"]
    assert stored["path"].to_list() == pl.read_parquet(emb_dir / "items.parquet")["path"].to_list()
    meta = read_parquet_metadata(out_path)
    record = read_encoded(emb_dir).record
    assert meta[META_MODEL_ID] == record["model_id"]
    assert meta[META_SCHEMA] == "celeba" and meta[META_SCHEMA_HASH] == schema.hash
    assert '"hair_color": "mean"' in meta[META_STRATEGY]
    scale = float(meta["clipengine.logit_scale"])
    model_scale = float(tiny_clip.build_reference().logit_scale.exp())
    assert scale == pytest.approx(model_scale, rel=1e-6) or scale == 100.0
    want = reference_labels(tiny_clip, np.load(emb_dir / "embeddings.npy"), schema, scale)
    for name, (labels, probs, margins) in want.items():
        decided = margins > 1e-4
        assert [x for x, d in zip(stored[name].to_list(), decided) if d] == [x for x, d in zip(labels, decided) if d]
        np.testing.assert_allclose(stored[f"{name}_prob"].to_numpy(), probs, atol=1e-4)
        np.testing.assert_allclose(stored[f"{name}_margin"].to_numpy(), margins, atol=1e-4)


def test_prompt_embeddings_are_cached_per_model_and_schema(tiny_clip, emb_dir):
    from clipengine.annotate.class_embeddings import cache_path, prompt_embeddings
    from clipengine.encode.encoders import text_encoder_from_dir

    stored = read_encoded(emb_dir)
    schema = load_schema("scene")
    encoder = text_encoder_from_dir(emb_dir, device="cpu")
    first = prompt_embeddings(schema, encoder, stored.model_id)
    path = cache_path(stored.model_id, schema)
    assert path.is_file() and np.array_equal(np.load(path), first)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
    marker = np.roll(first, 1, axis=0)  # the cache file is what a second call returns
    np.save(path, marker)
    assert np.array_equal(prompt_embeddings(schema, encoder, stored.model_id), marker)
    path.unlink()
    assert np.array_equal(prompt_embeddings(schema, encoder, stored.model_id), first)


def test_strategies_side_by_side_differ_only_where_they_should(emb_dir):
    from clipengine.encode.encoders import text_encoder_from_dir

    stored = read_encoded(emb_dir)
    encoder = text_encoder_from_dir(emb_dir, device="cpu")
    config = AnnotateConfig(device="cpu", progress=False)
    frames = annotate_strategies(stored.embeddings, "fashion", encoder, ["naive", "mean", "max"], config,
                                 model_id=stored.model_id, logit_scale=100.0)
    assert set(frames) == {"naive", "mean", "max"}
    for frame in frames.values():
        assert frame.height == stored.embeddings.shape[0]
        assert frame["garment"].is_in(load_schema("fashion").attribute("garment").class_names).all()


def test_refuses_to_mix_models(tiny_clip, emb_dir, tmp_path):
    from clipengine.config import ModelConfig

    from tests.fixtures_models import TINY_ARCHITECTURE, save_random_model

    other = save_random_model(TINY_ARCHITECTURE, tmp_path / "other", "other", seed=1)
    config = AnnotateConfig(schema="scene", device="cpu", progress=False,
                            model=ModelConfig(model=str(other.config_path), weights=other.weights_path))
    with pytest.raises(ClipengineError, match="embeddings were made by model .* but the given model is"):
        annotate_dir(emb_dir, config, tmp_path / "m.parquet")
    same = AnnotateConfig(schema="scene", device="cpu", progress=False, model=tiny_clip.model_config)
    assert annotate_dir(emb_dir, same, tmp_path / "ok.parquet").height == 5


def test_rejects_nan_embeddings(emb_dir):
    schema = load_schema("scene")
    prompts = np.ones((len(schema.prompts()), 4), np.float32) / 2
    bad = np.full((3, 4), np.nan, np.float32)
    with pytest.raises(ClipengineError, match="NaN"):
        label_with_prompts(bad, schema, prompts, 100.0, AnnotateConfig(device="cpu", progress=False))
    with pytest.raises(ClipengineError, match="8-d embeddings but the images are 4-d"):
        label_with_prompts(bad, schema, np.ones((len(schema.prompts()), 8), np.float32), 100.0, AnnotateConfig(device="cpu"))


def test_cli_annotate_writes_metadata_and_reports_errors_in_one_line(emb_dir, tmp_path, capsys):
    from clipengine.cli import main

    out = tmp_path / "cli.parquet"
    with pytest.raises(SystemExit) as code:
        main(["annotate", str(emb_dir), "--schema", "pedestrian", "--strategy", "mean,lighting=max", "--out", str(out),
              "--device", "cpu", "-q"])
    assert code.value.code == 0
    printed = capsys.readouterr().out
    assert "5 rows × 8 attributes" in printed and "age_group" in printed
    assert '"lighting": "max"' in read_parquet_metadata(out)[META_STRATEGY]
    with pytest.raises(SystemExit) as code:
        main(["annotate", str(emb_dir), "--schema", "nope", "--out", str(out)])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("clipengine: error: unknown schema 'nope'") and err.count("\n") == 1


def test_annotate_applies_calibrated_thresholds(emb_dir, tmp_path):
    import json

    from clipengine.annotate.evaluate import AttributeInfo
    from clipengine.annotate.thresholds import positive_probability
    from clipengine.artifacts import META_THRESHOLDS

    config = AnnotateConfig(schema="celeba", device="cpu", progress=False)
    plain = annotate_dir(emb_dir, config, tmp_path / "plain.parquet")
    info = AttributeInfo.from_schema(load_schema("celeba"))[4]  # eyeglasses
    p_yes = positive_probability(plain, info.name, info.positive)
    threshold = float(np.median(p_yes))  # half the items above, whatever the random model says
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"mean": [{"attribute": "eyeglasses", "threshold": threshold}]}))
    from dataclasses import replace

    calibrated = annotate_dir(emb_dir, replace(config, thresholds=path), tmp_path / "cal.parquet")
    assert calibrated["eyeglasses"].to_list() == ["yes" if p >= threshold else "no" for p in p_yes]
    np.testing.assert_allclose(positive_probability(calibrated, info.name, info.positive), p_yes, atol=1e-6)
    assert calibrated.drop("eyeglasses", "eyeglasses_prob", "eyeglasses_margin").equals(
        plain.drop("eyeglasses", "eyeglasses_prob", "eyeglasses_margin"))
    assert json.loads(read_parquet_metadata(tmp_path / "cal.parquet")[META_THRESHOLDS]) == {"eyeglasses": threshold}
    path.write_text(json.dumps({"max": [], "naive": []}))
    with pytest.raises(ClipengineError, match="no thresholds for strategy 'mean'"):
        annotate_dir(emb_dir, replace(config, thresholds=path), tmp_path / "x.parquet")
