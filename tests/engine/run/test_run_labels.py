"""The labels workflow through the commands: run, sample, label, run again with --labels; annotate and
eval with a labels file; a bad labels file fails before any work and loses nothing."""

from __future__ import annotations

import json
from dataclasses import replace

import polars as pl
import pytest
from click.testing import CliRunner

from clipengine import artifacts
from clipengine.cli import cli
from clipengine.config import AnnotateConfig, EncodeConfig
from clipengine.errors import ClipengineError
from clipengine.run.job import STAGES, run_job

from tests.engine.run.test_run import make_config, make_photo_folder


@pytest.fixture(scope="module")
def encoder(tiny_clip):
    from clipengine.encode.encoders import create_encoder

    return create_encoder(EncodeConfig(model=tiny_clip.model_config, backend="torch", device="cpu", precision="fp32"))


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory, tiny_clip, encoder):
    """A run, a sheet drawn from it by the command, the sheet filled from the truth, the run again."""
    tmp = tmp_path_factory.mktemp("labelled")
    data = make_photo_folder(tmp)
    config = make_config(tmp, tiny_clip, data=data)
    run_job(config, encoder=encoder)
    run_dir = config.out
    sheet = tmp / "sheet"
    result = CliRunner().invoke(cli, ["sample", str(run_dir), "--n", "16", "--seed", "3", "--out", str(sheet)])
    assert result.exit_code == 0, result.output
    assert "drew 16 of 24 items (uniform, seed 3)" in result.output
    truth = pl.read_csv(data / "errors.csv").select("path", "true_scene")
    table = pl.read_csv(sheet / artifacts.LABELS_CSV, infer_schema=False).drop("true_scene")
    filled = table.join(truth, on="path", how="left", maintain_order="left").select(
        "path", "inclusion_prob", "scene", "tone", "true_scene", "true_tone")
    labels = tmp / "labels.csv"
    filled.write_csv(labels)
    with_labels = replace(config, annotate=AnnotateConfig(labels=labels))
    second = run_job(with_labels, encoder=encoder)
    return with_labels, second, labels, truth


def test_a_run_with_labels_adapts_evaluates_and_records(labelled_run):
    config, result, labels, truth = labelled_run
    run_dir = config.out
    assert result.ran == ["annotate", "eval", "slices", "coverage", "summary", "report"]
    assert result.reused == ["encode", "errors"]
    manifest = json.loads((run_dir / artifacts.MANIFEST).read_text())
    assert manifest["labels"]["rows"] == 16 and len(manifest["labels"]["sha256"]) == 64
    record = manifest["stages"]["annotate"]["adaptation"]["scene"]
    assert record["n_labels"] == 16 and record["method"] in ("zero-shot", "prototype", "gda", "tip")
    assert "reason" in record and "tone" not in manifest["stages"]["annotate"]["adaptation"]
    assert manifest["stages"]["eval"]["reliability"]["scene"]["labels"] == 16
    metadata = pl.read_parquet(run_dir / artifacts.METADATA)
    human = metadata.filter(pl.col("scene_source") == "human")
    assert human.height == 16
    want = dict(zip(truth["path"].to_list(), truth["true_scene"].to_list()))
    assert all(want[p] == s for p, s in zip(human["path"].to_list(), human["scene"].to_list()))
    assert (metadata["tone_source"] == "model").all()
    quality = pl.read_csv(run_dir / artifacts.LABEL_QUALITY_CSV)
    overall = quality.filter((pl.col("attribute") == "scene") & (pl.col("class") == "(all)")).row(0, named=True)
    assert overall["reliable"] in ("yes", "no") and overall["labelled"] == 16 and overall["served"] == record["method"]
    assert overall["naive_accuracy"] is not None  # the ground-truth comparison beside the sample's
    assert overall["support"] == 24 - 16  # measured on the items no person labelled
    assert overall["zero_shot_accuracy_low"] <= overall["zero_shot_accuracy"] <= overall["zero_shot_accuracy_high"]
    summary = (run_dir / artifacts.SUMMARY).read_text()
    assert "## Label reliability (measured on your labelled sample)" in summary
    html = (run_dir / artifacts.REPORT).read_text()
    assert 'id="reliability-1"' in html
    slices = json.loads((run_dir / artifacts.SLICES_JSON).read_text())["slices"]
    if any("scene" in s["predicates"] for s in slices):
        assert 'href="#reliability-1"' in html  # a slice on scene links to its reliability


def test_the_same_labels_again_do_no_work_and_new_labels_rerun_annotate(labelled_run, encoder, tmp_path):
    config, _, labels, _ = labelled_run
    again = run_job(config, encoder=encoder)
    assert again.ran == [] and again.reused == list(STAGES)
    text = labels.read_text().splitlines()
    fields = text[1].split(",")
    fields[-1] = "dark"  # one more label: another file's content
    more = tmp_path / "labels.csv"
    more.write_text("\n".join([text[0], ",".join(fields), *text[2:]]) + "\n")
    changed = run_job(replace(config, annotate=AnnotateConfig(labels=more)), encoder=encoder)
    assert changed.ran[:2] == ["annotate", "eval"]
    restored = run_job(config, encoder=encoder)
    assert restored.ran[:2] == ["annotate", "eval"]


def test_a_bad_labels_file_fails_before_any_work_and_loses_nothing(labelled_run, encoder, tmp_path):
    config, _, _, _ = labelled_run
    run_dir = config.out
    before = {name: (run_dir / name).read_bytes() for name in (artifacts.MANIFEST, artifacts.METADATA,
                                                              artifacts.LABEL_QUALITY_CSV)}
    bad = tmp_path / "bad.csv"
    bad.write_text("path,true_scene\nfield/img000.png,rural\ncity/img001.png,downtown\n")
    with pytest.raises(ClipengineError, match=r"bad.csv: row 2, column 'true_scene': 'downtown' is not a class"):
        run_job(replace(config, annotate=AnnotateConfig(labels=bad)), encoder=encoder)
    for name, content in before.items():
        assert (run_dir / name).read_bytes() == content, name


def test_annotate_and_eval_commands_with_labels(labelled_run, tmp_path):
    config, _, labels, _ = labelled_run
    run_dir = config.out
    runner = CliRunner()
    out = tmp_path / "adapted.parquet"
    result = runner.invoke(cli, ["annotate", str(run_dir), "--schema", config.schema, "--labels", str(labels),
                                 "--adapt", "prototype", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert "scene: 16 labels; prototype as asked" in result.output
    adaptation, _, _ = artifacts.read_adaptation(out)
    assert adaptation["scene"]["method"] == "prototype" and adaptation["scene"]["requested"] == "prototype"
    result = runner.invoke(cli, ["eval", str(out), "--labels", str(labels), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "# Label reliability" in result.output and "| scene | 16 | prototype |" in result.output
    quality = pl.read_csv(tmp_path / artifacts.LABEL_QUALITY_CSV)
    assert set(quality["attribute"]) == {"scene"} and "adapted_precision_low" in quality.columns
    result = runner.invoke(cli, ["eval", str(out)])
    assert result.exit_code != 0 and "give ground truth (--truth) or a labelled sample (--labels)" in str(
        result.exception)
