"""``clipengine run --baseline``: the compare stage — written, fingerprinted by both runs' files, in the
summary and the report — on two nights over the same images with different error tables."""

import json
from dataclasses import replace

import polars as pl
import pytest

from clipengine.config import DatasetConfig, EncodeConfig
from clipengine.errors import ClipengineError
from clipengine.run.job import COMPARE_STAGE, STAGES, run_job

from tests.engine.run.test_run import make_config, make_photo_folder


@pytest.fixture(scope="module")
def encoder(tiny_clip):
    from clipengine.encode.encoders import create_encoder

    return create_encoder(EncodeConfig(model=tiny_clip.model_config, backend="torch", device="cpu", precision="fp32"))


def night(tmp_path, tiny_clip, data, name: str, errors_file=None, baseline=None):
    config = make_config(tmp_path, tiny_clip, data=data, out=name)
    return replace(config, data=DatasetConfig(errors=errors_file), baseline=baseline)


@pytest.fixture(scope="module")
def nights(tmp_path_factory, tiny_clip, encoder):
    """Night 1 on the folder's errors; night 2 on the same images, where every wet-road image fails."""
    tmp = tmp_path_factory.mktemp("nights")
    data = make_photo_folder(tmp)
    first = run_job(night(tmp, tiny_clip, data, "night1"), encoder=encoder)
    errors = pl.read_csv(data / "errors.csv")
    worse = errors.with_columns(pl.when(pl.col("road") == "wet").then(1).otherwise(pl.col("error")).alias("error"))
    worse.write_csv(tmp / "errors-night2.csv")
    config = night(tmp, tiny_clip, data, "night2", tmp / "errors-night2.csv", baseline=first.run_dir)
    second = run_job(config, encoder=encoder)
    return tmp, data, first, second, config


def test_the_compare_stage_runs_after_coverage_and_writes_compare_json(nights):
    _, _, first, second, _ = nights
    assert COMPARE_STAGE not in first.ran and COMPARE_STAGE not in first.manifest["stages"]
    assert second.ran == [*STAGES[:STAGES.index("coverage") + 1], COMPARE_STAGE, *STAGES[STAGES.index("coverage") + 1:]]
    document = json.loads((second.run_dir / "compare.json").read_text())
    assert document["old"]["run"] == str(first.run_dir) and document["new"]["run"] == str(second.run_dir)
    assert document["items"]["matched"] == 24 and document["mismatches"] == []
    flipped = document["items"]["newly_failing"]
    assert flipped > 0 and document["items"]["fixed"] == 0
    wet = next(r for r in document["slices"] if r["predicates"] == {"road": "wet"})
    assert wet["newly_failing"] == flipped and wet["new_error_mean"] == 1.0 and wet["test"] == "mcnemar-mid-p"
    stage = second.manifest["stages"][COMPARE_STAGE]
    assert stage["status"] == "done" and stage["baseline"] == str(first.run_dir)
    assert "## Since the baseline" in (second.run_dir / "summary.md").read_text()
    html = (second.run_dir / "report.html").read_text()
    assert 'id="baseline"' in html and "Items that turned into errors" in html
    assert 'id="baseline"' not in (first.run_dir / "report.html").read_text()


def test_the_comparison_is_redone_when_the_baseline_changes(nights, tiny_clip, encoder):
    tmp, data, first, second, config = nights
    again = run_job(config, encoder=encoder)
    assert again.ran == [] and COMPARE_STAGE in again.reused
    # the baseline's error table changes (a rerun of night 1 on night 2's errors): compare, summary, report redo
    rerun = run_job(night(tmp, tiny_clip, data, "night1", tmp / "errors-night2.csv"), encoder=encoder)
    assert "slices" in rerun.ran
    after = run_job(config, encoder=encoder)
    assert after.ran == [COMPARE_STAGE, "summary", "report"]
    document = json.loads((second.run_dir / "compare.json").read_text())
    assert document["items"]["newly_failing"] == 0 and document["items"]["changed"] == 0


def test_a_bad_baseline_fails_before_any_work(tmp_path, tiny_clip, encoder):
    data = make_photo_folder(tmp_path)
    with pytest.raises(ClipengineError, match="not a finished run"):
        run_job(night(tmp_path, tiny_clip, data, "run", baseline=tmp_path / "nothing"), encoder=encoder)
    assert not (tmp_path / "run" / "items.parquet").exists()
    with pytest.raises(ClipengineError, match="own directory"):
        run_job(night(tmp_path, tiny_clip, data, "run", baseline=tmp_path / "run"), encoder=encoder)


def test_run_command_takes_baseline_options():
    from click.testing import CliRunner

    from clipengine.cli import cli

    help_text = CliRunner().invoke(cli, ["run", "--help"]).output
    assert "--baseline" in help_text and "--min-diff" in help_text and "--min-psi" in help_text
