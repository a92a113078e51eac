"""Label quality against hand-checked confusion matrices; CelebA, CSV and Parquet truth."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from clipengine.annotate.evaluate import AttributeInfo, label_quality, parse_mapping, read_truth, truth_labels
from clipengine.annotate.schemas import parse_schema
from clipengine.annotate.stage import metadata_record
from clipengine.bindings.files import write_parquet
from clipengine.errors import ClipengineError

SCHEMA = parse_schema(
    """
name: faces
attributes:
  eyeglasses:
    truth: Eyeglasses
    classes:
      "yes": {prompts: [a person wearing eyeglasses]}
      "no": {prompts: [a person with bare eyes]}
  beard:
    truth: "!No_Beard"
    classes:
      "yes": {prompts: [a bearded man]}
      "no": {prompts: [a clean-shaven face]}
  hair_color:
    type: exclusive
    truth: "black:Black_Hair|blond:Blond_Hair|gray:Gray_Hair"
    templates: ["a person with {} hair"]
    classes: {black: [black], blond: [blond], gray: [gray]}
"""
)

CELEBA_TRUTH = """6
Eyeglasses No_Beard Black_Hair Blond_Hair Gray_Hair
000001.jpg  1  1  1 -1 -1
000002.jpg  1 -1 -1  1 -1
000003.jpg -1  1 -1 -1  1
000004.jpg -1  1  1  1 -1
000005.jpg -1 -1 -1 -1 -1
000006.jpg  1  1  1 -1 -1
"""


def metadata(labels: dict[str, list[str]]) -> pl.DataFrame:
    paths = [f"/data/celeba/img_align_celeba/{i:06d}.jpg" for i in range(1, 7)]
    columns = {"path": paths}
    for name, values in labels.items():
        columns[name] = values
        columns[f"{name}_prob"] = [0.9] * len(values)
        columns[f"{name}_margin"] = [0.8] * len(values)
    return pl.DataFrame(columns)


NAIVE = metadata({
    "eyeglasses": ["yes", "no", "no", "yes", "yes", "yes"],
    "beard": ["no", "no", "no", "no", "yes", "yes"],
    "hair_color": ["black", "black", "gray", "gray", "blond", "blond"],
})
MEAN = metadata({
    "eyeglasses": ["yes", "yes", "no", "no", "no", "yes"],
    "beard": ["no", "yes", "yes", "no", "no", "no"],
    "hair_color": ["black", "blond", "gray", "black", "black", "black"],
})


@pytest.fixture()
def truth_file(tmp_path):
    path = tmp_path / "list_attr_celeba.txt"
    path.write_text(CELEBA_TRUTH)
    return path


def test_reads_celeba_attribute_list(truth_file):
    truth = read_truth(truth_file)
    assert truth.columns == ["image_id", "Eyeglasses", "No_Beard", "Black_Hair", "Blond_Hair", "Gray_Hair"]
    assert truth["Eyeglasses"].to_list() == [1, 1, -1, -1, -1, 1]


def test_hand_checked_confusion_matrices(truth_file):
    report = label_quality({"naive": NAIVE, "mean": MEAN}, read_truth(truth_file), schema=SCHEMA)
    assert report.matched_rows == 6
    # eyeglasses truth: yes yes no no no yes
    assert report.get("eyeglasses", "naive").confusion.tolist() == [[2, 1], [2, 1]]
    assert report.get("eyeglasses", "mean").confusion.tolist() == [[3, 0], [0, 3]]
    assert report.get("eyeglasses", "naive").accuracy == pytest.approx(3 / 6)
    assert report.get("eyeglasses", "mean").accuracy == 1.0
    # beard = not No_Beard: no yes no no yes no
    assert report.get("beard", "naive").confusion.tolist() == [[1, 1], [1, 3]]
    assert report.get("beard", "mean").confusion.tolist() == [[1, 1], [1, 3]]
    # hair: black blond gray (none: left out) (black+blond: left out) black
    naive_hair = report.get("hair_color", "naive")
    assert naive_hair.n == 4
    assert naive_hair.confusion.tolist() == [[1, 1, 0], [1, 0, 0], [0, 0, 1]]
    stats = naive_hair.per_class()
    np.testing.assert_allclose(stats["precision"], [0.5, 0.0, 1.0])
    np.testing.assert_allclose(stats["recall"], [0.5, 0.0, 1.0])
    np.testing.assert_allclose(stats["f1"], [0.5, 0.0, 1.0])
    mean_hair = report.get("hair_color", "mean")
    assert mean_hair.confusion.tolist() == [[2, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert mean_hair.macro_f1 == 1.0


def test_table_and_markdown(truth_file, tmp_path):
    report = label_quality({"naive": NAIVE, "mean": MEAN}, read_truth(truth_file), schema=SCHEMA)
    table = report.to_polars()
    assert table.columns[:3] == ["attribute", "class", "support"]
    assert {"naive_precision", "naive_recall", "naive_f1", "naive_accuracy", "mean_f1", "mean_predicted"} <= set(table.columns)
    overall = table.filter((pl.col("attribute") == "eyeglasses") & (pl.col("class") == "(all)")).row(0, named=True)
    assert overall["support"] == 6 and overall["naive_accuracy"] == 0.5 and overall["mean_accuracy"] == 1.0
    yes = table.filter((pl.col("attribute") == "eyeglasses") & (pl.col("class") == "yes")).row(0, named=True)
    assert yes["support"] == 3 and yes["naive_predicted"] == 4
    assert yes["naive_precision"] == pytest.approx(0.5) and yes["naive_recall"] == pytest.approx(2 / 3)
    md = report.to_markdown()
    assert "| eyeglasses | 6 | 0.500 | 1.000 |" in md
    assert "| yes | 3 | 4 | 0.500 | 0.667 | 0.571 | 3 | 1.000 | 1.000 | 1.000 |" in md
    csv_path, md_path = report.write(tmp_path / "out")
    assert pl.read_csv(csv_path).height == table.height and md_path.read_text() == md


def test_no_precision_when_a_class_is_never_predicted(truth_file):
    never_blond = NAIVE.with_columns(pl.lit("black").alias("hair_color"))
    report = label_quality({"naive": never_blond}, read_truth(truth_file), schema=SCHEMA)
    stats = report.get("hair_color", "naive").per_class()
    assert np.isnan(stats["precision"][1]) and stats["recall"][1] == 0.0 and stats["f1"][1] == 0.0
    assert "–" in report.to_markdown()


def test_mapping_overrides_and_csv_truth(tmp_path):
    # fashion-style: integer class indices in a CSV with a path column
    schema = parse_schema(
        "attributes:\n  garment:\n    type: exclusive\n    classes: {Top: {prompts: [a top]}, "
        "Trouser: {prompts: [trousers]}, Bag: {prompts: [a bag]}}\n"
    )
    truth = tmp_path / "truth.csv"
    truth.write_text("path,label\na.png,0\nb.png,2\nc.png,2\nd.png,1\n")
    frame = pl.DataFrame({"path": ["a.png", "b.png", "c.png", "d.png", "e.png"],
                          "garment": ["Top", "Bag", "Top", "Trouser", "Bag"],
                          "garment_prob": [0.5] * 5, "garment_margin": [0.1] * 5})
    report = label_quality({"mean": frame}, read_truth(truth), parse_mapping("garment=label"), schema=schema)
    assert report.get("garment", "mean").confusion.tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert report.matched_rows == 4


def test_truth_spec_errors(truth_file):
    truth = read_truth(truth_file)
    glasses = AttributeInfo("eyeglasses", ("yes", "no"), "binary", "yes")
    with pytest.raises(ClipengineError, match="truth has no column 'Glasses'"):
        truth_labels(truth, glasses, "Glasses")
    hair = AttributeInfo("hair_color", ("black", "blond"), "exclusive")
    with pytest.raises(ClipengineError, match="must be class:COLUMN"):
        truth_labels(truth, hair, "red:Black_Hair|blond:Blond_Hair")
    with pytest.raises(ClipengineError, match="'!' applies to binary"):
        truth_labels(truth, hair, "!Black_Hair")
    words = pl.DataFrame({"image_id": ["a"], "Eyeglasses": ["maybe"]})
    with pytest.raises(ClipengineError, match="holds 'maybe'"):
        truth_labels(words, glasses, "Eyeglasses")
    with pytest.raises(ClipengineError, match="expected attr=COLUMN"):
        parse_mapping("eyeglasses")
    with pytest.raises(ClipengineError, match="--map names attribute 'hat'"):
        label_quality({"naive": NAIVE}, truth, {"hat": "Wearing_Hat"}, schema=SCHEMA)
    elsewhere = NAIVE.with_columns(pl.lit("/x/none.jpg").alias("path"))
    with pytest.raises(ClipengineError, match="no metadata row matched"):
        label_quality({"naive": elsewhere}, truth, schema=SCHEMA)


def test_bad_celeba_file(tmp_path):
    path = tmp_path / "attrs.txt"
    path.write_text("2\nA B\nx.jpg 1 -1\ny.jpg 1\n")
    with pytest.raises(ClipengineError, match="line 4 has 1 values but the header names 2"):
        read_truth(path)


def test_cli_eval_metadata_files_side_by_side(truth_file, tmp_path, capsys):
    from clipengine.cli import main

    for name, frame in (("naive", NAIVE), ("mean", MEAN)):
        write_parquet(tmp_path / f"{name}.parquet", frame,
                      metadata=metadata_record(SCHEMA.with_strategy(name), "tiny-0123", 100.0))
    with pytest.raises(SystemExit) as code:
        main(["eval", str(tmp_path / "naive.parquet"), str(tmp_path / "mean.parquet"), "--truth", str(truth_file),
              "--out", str(tmp_path / "q")])
    assert code.value.code == 0
    out = capsys.readouterr().out
    assert "| eyeglasses | 6 | 0.500 | 1.000 |" in out
    assert (tmp_path / "q" / "label_quality.csv").is_file() and (tmp_path / "q" / "label_quality.md").is_file()
    write_parquet(tmp_path / "other.parquet", MEAN, metadata=metadata_record(SCHEMA, "another-model", 100.0))
    with pytest.raises(SystemExit) as code:
        main(["eval", str(tmp_path / "naive.parquet"), str(tmp_path / "other.parquet"), "--truth", str(truth_file)])
    assert code.value.code == 2
    assert "different models" in capsys.readouterr().err


def test_eval_embeddings_dir_runs_both_strategies(tiny_clip, sample_photos, tmp_path):
    from clipengine.annotate.evaluate import evaluate_embeddings_dir
    from clipengine.config import EncodeConfig
    from clipengine.encode.stage import encode_items

    emb = tmp_path / "emb"
    encode_items(pl.DataFrame({"path": [str(p) for p in sample_photos]}), emb,
                 EncodeConfig(model=tiny_clip.model_config, device="cpu", backend="torch", precision="fp32",
                              progress=False, workers=1))
    truth = tmp_path / "truth.csv"
    names = [p.name for p in sample_photos]
    truth.write_text("path,Eyeglasses,Male\n" + "".join(f"{n},{i % 2},{1 - i % 2}\n" for i, n in enumerate(names)))
    report = evaluate_embeddings_dir(emb, truth, schema="celeba", strategies=["naive", "mean", "max"])
    assert report.strategies == ["naive", "mean", "max"] and report.matched_rows == 5
    assert report.get("eyeglasses", "naive").n == 5 and report.get("male", "max").n == 5
    assert "young" in report.skipped and "hair_color" in report.skipped


# ---- threshold calibration -------------------------------------------------------------------


def test_fit_threshold_by_hand():
    from clipengine.annotate.thresholds import fit_threshold

    p = np.array([0.9, 0.8, 0.45, 0.4, 0.3, 0.1])
    y = np.array([1, 1, 1, 0, 0, 0], bool)
    assert fit_threshold(p, y) == pytest.approx(0.425)
    assert fit_threshold(p, np.ones(6, bool)) == 0.5  # one class only: keep argmax


@pytest.mark.parametrize("seed", range(5))
def test_fit_threshold_is_the_best_balanced_accuracy(seed):
    from clipengine.annotate.thresholds import fit_threshold

    rng = np.random.default_rng(seed)
    y = rng.random(200) < 0.3
    p = np.round(np.clip(rng.normal(0.3 + 0.2 * y, 0.15), 0, 1), 2)  # rounded: many ties

    def balanced(t):
        pred = p >= t
        return (np.mean(pred[y]) + np.mean(~pred[~y])) / 2

    best = max(balanced(t) for t in np.append(np.unique(p), 2.0))
    assert balanced(fit_threshold(p, y)) == pytest.approx(best)


def biased_binary(n=400, seed=0):
    """Positives score P(yes) in 0.35..0.48 and negatives 0.05..0.3: argmax says "no" to everything."""
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < 0.4
    p_yes = np.where(truth, rng.uniform(0.35, 0.48, n), rng.uniform(0.05, 0.3, n))
    label = np.where(p_yes >= 0.5, "yes", "no")
    frame = pl.DataFrame({
        "path": [f"{i}.jpg" for i in range(n)], "eyeglasses": label,
        "eyeglasses_prob": np.where(p_yes >= 0.5, p_yes, 1 - p_yes).astype(np.float32),
        "eyeglasses_margin": np.abs(2 * p_yes - 1).astype(np.float32),
    })
    truth_frame = pl.DataFrame({"path": frame["path"], "Eyeglasses": np.where(truth, 1, -1)})
    return frame, truth_frame


def test_calibration_fixes_a_biased_binary_attribute_on_held_out_rows():
    from clipengine.annotate.evaluate import calibrate_thresholds
    from clipengine.annotate.thresholds import apply_thresholds

    schema = parse_schema(
        "attributes:\n  eyeglasses:\n    truth: Eyeglasses\n    classes:\n"
        "      'yes': {prompts: [glasses]}\n      'no': {prompts: [bare eyes]}\n"
    )
    frame, truth = biased_binary()
    (result,) = calibrate_thresholds(frame, truth, schema=schema, fit_fraction=0.5, seed=1)
    assert result.attribute == "eyeglasses" and result.n_fit == 200 and result.n_test == 200
    assert 0.3 <= result.threshold <= 0.35
    assert result.default_balanced_accuracy == pytest.approx(0.5)
    assert result.calibrated_accuracy == 1.0 and result.calibrated_f1 == 1.0
    relabelled = apply_thresholds(frame, {"eyeglasses": result.threshold}, schema)
    report = label_quality({"calibrated": relabelled}, truth, schema=schema)
    assert report.get("eyeglasses", "calibrated").accuracy == 1.0


def test_cli_eval_calibrate_writes_thresholds(tmp_path, capsys):
    from clipengine.cli import main

    schema = parse_schema(
        "attributes:\n  eyeglasses:\n    truth: Eyeglasses\n    classes:\n"
        "      'yes': {prompts: [glasses]}\n      'no': {prompts: [bare eyes]}\n"
    )
    frame, truth = biased_binary(seed=3)
    write_parquet(tmp_path / "m.parquet", frame, metadata=metadata_record(schema, "m", 100.0))
    truth.write_csv(tmp_path / "truth.csv")
    with pytest.raises(SystemExit) as code:
        main(["eval", str(tmp_path / "m.parquet"), "--truth", str(tmp_path / "truth.csv"), "--calibrate"])
    assert code.value.code == 0
    assert "Threshold calibration" in capsys.readouterr().out
    saved = json.loads((tmp_path / "thresholds.json").read_text())
    assert 0.3 <= saved["mean"][0]["threshold"] <= 0.35
