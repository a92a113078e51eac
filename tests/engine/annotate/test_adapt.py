"""Few-shot adaptation: the choice by cross-validation, honest out-of-fold labels, and the labelling pass
agreeing with the fitted classifiers; annotate with a labels file end to end on a tiny CLIP's text tower."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from clipengine import artifacts
from clipengine.annotate import adapt
from clipengine.annotate.class_embeddings import build_class_side
from clipengine.annotate.schemas import parse_schema
from clipengine.config import AnnotateConfig, EncodeConfig
from clipengine.errors import ClipengineError
from clipengine.kernels import fewshot
from clipengine.kernels.similarity import label_segments

DIM = 32
SCHEMA = """name: toy
attributes:
  shape:
    type: exclusive
    strategy: {shape_strategy}
    classes:
      round: {{prompts: ["a round thing", "a ball", "a circle"]}}
      square: {{prompts: ["a square thing", "a box"]}}
      pointy: {{prompts: ["a pointy thing", "a star"]}}
  size:
    type: exclusive
    classes:
      big: {{prompts: ["a big thing"]}}
      small: {{prompts: ["a small thing"]}}
"""


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clusters(rng, n, n_classes, *, spread=0.6, centres=None):
    """(n, DIM) unit embeddings around one centre per class, and their classes."""
    centres = unit(rng.standard_normal((n_classes, DIM))) if centres is None else centres
    y = rng.integers(0, n_classes, n)
    return unit(centres[y] + spread * rng.standard_normal((n, DIM)) / np.sqrt(DIM)), y, centres


def test_auto_adapts_when_the_text_classifier_is_uninformative():
    rng = np.random.default_rng(0)
    x, y, _ = clusters(rng, 60, 3)
    text = unit(rng.standard_normal((3, DIM)))  # unrelated to the clusters: zero-shot near chance
    zs = 50 * x @ text.T
    choice = adapt.choose(x, y, np.ones(60), zs, 3, 50.0, "auto")
    assert choice.candidate.method in adapt.METHODS
    assert choice.accuracy > 0.9 and choice.accuracy - choice.zero_shot_accuracy > choice.gain_se


def test_auto_keeps_zero_shot_when_adaptation_does_not_beat_it():
    rng = np.random.default_rng(1)
    x, y, centres = clusters(rng, 40, 3, spread=0.3)
    zs = 50 * x @ centres.T  # the text classifier is the true class means: nothing to gain
    choice = adapt.choose(x, y, np.ones(40), zs, 3, 50.0, "auto")
    assert choice.candidate.method == adapt.ZERO_SHOT
    assert choice.reason.startswith("kept zero-shot")


def test_an_asked_method_is_used_and_too_few_labels_keep_zero_shot():
    rng = np.random.default_rng(2)
    x, y, centres = clusters(rng, 40, 3, spread=0.3)
    zs = 50 * x @ centres.T
    assert adapt.choose(x, y, np.ones(40), zs, 3, 50.0, "tip").candidate.method == "tip"
    few = adapt.choose(x[:3], y[:3], np.ones(3), zs[:3], 3, 50.0, "gda")
    assert few.candidate.method == adapt.ZERO_SHOT and "needs 4" in few.reason


def test_out_of_fold_labels_never_come_from_a_fit_on_the_item_itself():
    """Near-duplicate pairs sharing a label teach cross-validation to trust a sharp cache; the single
    items' labels are random. A cache that holds the item itself would recall every single item; a
    cache without it can only guess."""
    rng = np.random.default_rng(3)
    pairs = unit(rng.standard_normal((60, DIM)))
    singles = unit(rng.standard_normal((60, DIM)))
    x = np.concatenate([pairs, unit(pairs + 0.01 * rng.standard_normal(pairs.shape)), singles])
    pair_labels = rng.integers(0, 2, 60)
    y = np.concatenate([pair_labels, pair_labels, rng.integers(0, 2, 60)])
    zs = np.zeros((180, 2))
    inner = adapt.choose(x, y, np.ones(180), zs, 2, 50.0, "tip")
    assert inner.candidate.alpha is None and inner.candidate.beta == max(adapt.TIP_BETAS)  # the sharp cache alone
    in_sample = adapt.predict(inner.candidate, x, y, np.ones(180), zs, 2, 50.0, x, zs)
    assert (in_sample[120:] == y[120:]).mean() == 1.0  # recall, when the item is in the cache
    held_out = adapt.out_of_fold(x, y, np.ones(180), zs, 2, 50.0, "tip")
    assert (held_out[:120] == y[:120]).mean() > 0.9  # the pairs: each other's label
    assert (held_out[120:] == y[120:]).mean() < 0.75  # the single items: a guess, not recall


@pytest.mark.parametrize("strategy", ["mean", "max"])
@pytest.mark.parametrize("method", ["prototype", "gda", "tip"])
def test_the_labelling_pass_gives_what_the_fitted_classifier_gives(method, strategy):
    rng = np.random.default_rng(4)
    schema = parse_schema(SCHEMA.format(shape_strategy=strategy))
    prompts = unit(rng.standard_normal((len(schema.prompts()), DIM))).astype(np.float32)
    side = build_class_side(schema, prompts)
    x, y, _ = clusters(rng, 400, 3)
    x = x.astype(np.float32)
    labelled = np.flatnonzero(y != 2)[:30]  # class 'pointy' gets no label
    zs = adapt.attribute_zero_shot_logits(x, side, 0, 20.0)
    for alpha in (None, 2.0):
        candidate = adapt.Candidate(method, alpha, 5.5 if method == "tip" else None)
        fitted = adapt._fit_contribution(candidate, x[labelled].astype(np.float64), y[labelled], np.ones(30),
                                         zs[labelled], 3, 20.0)
        adaptation = adapt.AttributeAdaptation("shape", method, candidate, 30, 0.0, 0.0, "", labelled, y[labelled],
                                               np.ones(30), y[labelled], y[labelled], fitted)
        labels, probs, margins = fewshot.label_adapted(x, adapt.build_adapted_side(schema, side, 20.0,
                                                                                    {"shape": adaptation}))
        want = adapt.predict(candidate, x[labelled].astype(np.float64), y[labelled], np.ones(30), zs[labelled], 3, 20.0,
                             x, zs)
        assert (labels[:, 0] == want).mean() > 0.995  # float32 pass vs float64 NumPy: ties aside
        zero_shot = label_segments(x, side.matrix, side.prompt_offsets, side.class_offsets, 20.0,
                                   reduce=side.reduce, top_m=side.top_m)
        assert np.array_equal(labels[:, 1], zero_shot[0][:, 1])  # the unadapted attribute stays zero-shot
        np.testing.assert_allclose(probs[:, 1], zero_shot[1][:, 1], atol=1e-5)


# ---- annotate with a labels file ----------------------------------------------------------------
@pytest.fixture(scope="module")
def text_encoder(tiny_clip):
    from clipengine.encode.encoders import create_encoder

    return create_encoder(EncodeConfig(model=tiny_clip.model_config, backend="torch", device="cpu", precision="fp32"))


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """An encode folder of 300 clustered embeddings (shape classes) with the truth beside it."""
    rng = np.random.default_rng(5)
    x, y, _ = clusters(rng, 300, 3, spread=0.5)
    folder = tmp_path_factory.mktemp("toy-emb")
    items = pl.DataFrame({"path": [f"img{i:03d}.png" for i in range(300)]})
    artifacts.write_encoded(folder, items, encoded=list(range(300)), blocks=[x.astype(np.float32)], skipped=[],
                            stats=np.zeros((300, 2), np.int64), record={"embed_dim": DIM, "model_id": "toy-model"},
                            dtype="float32")
    return folder, y


def write_labels(path, rows, y, names=("round", "square", "pointy")):
    lines = ["path,true_shape,true_size"] + [f"img{r:03d}.png,{names[y[r]]}," for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_annotate_with_labels_adapts_keeps_human_labels_and_records_the_choice(toy_dir, text_encoder, tmp_path):
    from clipengine.annotate.stage import annotate_dir

    folder, y = toy_dir
    schema_path = tmp_path / "toy.yaml"
    schema_path.write_text(SCHEMA.format(shape_strategy="mean"))
    rows = np.random.default_rng(6).choice(300, 45, replace=False)
    given = y.copy()
    given[rows[0]] = (y[rows[0]] + 1) % 3  # a person may disagree with what the embeddings suggest
    labels = write_labels(tmp_path / "labels.csv", rows, given)
    config = AnnotateConfig(schema=str(schema_path), device="cpu", progress=False, labels=labels)
    out = tmp_path / "metadata.parquet"
    table = annotate_dir(folder, config, out, text_encoder=text_encoder)
    names = np.asarray(["round", "square", "pointy"])
    human = table["shape_source"].to_numpy() == "human"
    assert human.sum() == 45 and set(np.flatnonzero(human)) == set(rows.tolist())
    assert (table["shape"].to_numpy()[human] == names[given[human]]).all()
    assert (table["shape_prob"].to_numpy()[human] == 1.0).all()
    assert (table["size_source"].to_numpy() == "model").all()  # labelled nowhere: zero-shot
    unlabelled = ~human
    assert (table["shape"].to_numpy()[unlabelled] == names[y[unlabelled]]).mean() > 0.9
    adaptation, record, checks = artifacts.read_adaptation(out)
    assert adaptation["shape"]["method"] in adapt.METHODS and adaptation["shape"]["n_labels"] == 45
    assert adaptation["shape"]["cv_accuracy"] > 0.9 and "size" not in adaptation
    assert record["rows"] == 45 and record["population"] == 300
    assert sorted(checks["shape"]["rows"]) == sorted(rows.tolist()) and len(checks["shape"]["served"]) == 45
    # zero-shot without labels: the same items, a worse labelling (the text tower knows nothing of clusters)
    plain = annotate_dir(folder, AnnotateConfig(schema=str(schema_path), device="cpu", progress=False),
                         tmp_path / "plain.parquet", text_encoder=text_encoder)
    assert (plain["shape"].to_numpy() == names[y]).mean() < 0.8 and "shape_source" not in plain.columns


def test_a_bad_labels_file_fails_before_anything_is_written(toy_dir, text_encoder, tmp_path):
    from clipengine.annotate.stage import annotate_dir

    folder, y = toy_dir
    schema_path = tmp_path / "toy.yaml"
    schema_path.write_text(SCHEMA.format(shape_strategy="mean"))
    out = tmp_path / "metadata.parquet"
    out.write_bytes(b"an earlier result")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,true_shape\nimg001.png,round\nimg002.png,hexagonal\n")
    config = AnnotateConfig(schema=str(schema_path), device="cpu", progress=False, labels=bad)
    with pytest.raises(ClipengineError, match=r"row 2, column 'true_shape': 'hexagonal' is not a class"):
        annotate_dir(folder, config, out, text_encoder=text_encoder)
    assert out.read_bytes() == b"an earlier result"
