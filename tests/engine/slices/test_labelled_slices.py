"""Slices corrected by a labels file: find_slices, slice_run on a run directory, the CLI."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from clipengine.artifacts import SLICE_RECORD_KEYS
from clipengine.errors import ClipengineError
from clipengine.slices.corrected import LabelledSample
from clipengine.slices.find import find_slices

KINDS = np.array(["car", "bus", "bike"])


def noisy_table(m=6000, seed=0, flip=0.35):
    """``kind`` is a noisy prediction of the true kind (flipped more often on the model's errors); the
    true buses fail three times as often as the rest; ``night`` is exact."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(3, m, p=[0.6, 0.25, 0.15])
    night = rng.random(m) < 0.4
    error = (rng.random(m) < np.where(truth == 1, 0.3, 0.1) + 0.05 * night).astype(np.int64)
    flips = rng.random(m) < np.where(error > 0, min(2 * flip, 0.9), flip / 2)
    predicted = np.where(flips, (truth + rng.integers(1, 3, m)) % 3, truth)
    frame = pl.DataFrame({"path": [f"img{i:05d}.jpg" for i in range(m)], "kind": KINDS[predicted],
                          "night": night, "error": error})
    return frame, KINDS[truth]


def sample_of(truth, n=400, seed=1):
    rows = np.sort(np.random.default_rng(seed).choice(truth.size, n, replace=False))
    return LabelledSample(rows=rows, truth={"kind": truth[rows].astype(object)}, inclusion=np.full(n, n / truth.size))


def test_predicates_on_labelled_features_are_corrected_the_others_are_exact():
    frame, truth = noisy_table()
    plain = find_slices(frame, error="error", features=["kind", "night"], max_q=1.0)
    result = find_slices(frame, error="error", features=["kind", "night"], max_q=1.0, labels=sample_of(truth))
    assert np.all(np.isnan(plain.true_error_mean)) and plain.labels is None
    assert result.labels["features"] == ["kind"] and result.labels["estimated_on"] == "held-out rows"
    assert [r["predicates"] for r in result.to_records()] == [r["predicates"] for r in plain.to_records()]
    errors = frame["error"].to_numpy()
    corrected = missed = 0
    for i, predicates in enumerate(result.predicates):
        if "kind" not in predicates:
            assert result.true_error_mean[i] == result.error_mean_[i] and result.true_size[i] == result.size[i]
            assert result.true_note[i].startswith("exact")
            continue
        corrected += 1
        group = truth == predicates["kind"]
        if "night" in predicates:
            group &= frame["night"].to_numpy() == predicates["night"]
        missed += not result.true_ci_low[i] <= errors[group].mean() <= result.true_ci_high[i]
        assert abs(result.true_size[i] - group.sum()) < 0.25 * group.sum()
        assert result.confirmed[i] == bool(result.true_ci_low[i] > result.error_mean)
    assert corrected >= 3 and missed <= corrected // 4  # 95 % intervals


def test_the_true_bus_group_is_confirmed_where_the_noisy_slice_understates_it():
    frame, truth = noisy_table(m=20_000, seed=3)
    true_rate = frame["error"].to_numpy()[truth == "bus"].mean()
    covered = confirmed = 0
    for seed in range(10):  # ten labelled samples: a 95 % interval may miss once in a while
        result = find_slices(frame, error="error", features=["kind"], max_q=1.0, labels=sample_of(truth, 600, seed))
        bus = result.predicates.index({"kind": "bus"})
        assert result.ci_high[bus] < true_rate  # label noise dilutes the predicted slice's error rate
        covered += result.true_ci_low[bus] <= true_rate <= result.true_ci_high[bus]
        confirmed += result.confirmed[bus] is True
    assert covered >= 8 and confirmed >= 8


def test_records_and_parquet_carry_the_true_group_columns(tmp_path):
    from clipengine.slices.find import write_slices

    frame, truth = noisy_table(m=3000)
    result = find_slices(frame, error="error", features=["kind", "night"], labels=sample_of(truth, 300))
    write_slices(result, tmp_path)
    payload = json.loads((tmp_path / "slices.json").read_text())
    assert payload["format"] == 3 and payload["labels"]["labelled_items"] == 300
    assert tuple(payload["slices"][0]) == SLICE_RECORD_KEYS
    table = pl.read_parquet(tmp_path / "slices.parquet")
    for column in ("true_error_mean", "true_ci_low", "true_ci_high", "true_size", "confirmed"):
        assert column in table.columns
    assert table["true_error_mean"].to_list() == [r["true_error_mean"] for r in payload["slices"]]


def test_cli_corrects_a_table_with_item_keys_and_refuses_one_without(tmp_path):
    from clipengine.cli import cli

    frame, truth = noisy_table(m=3000)
    frame.write_parquet(tmp_path / "table.parquet")
    rows = np.random.default_rng(2).choice(frame.height, 300, replace=False)
    pl.DataFrame({"path": frame["path"].to_numpy()[rows], "true_kind": truth[rows]}).write_csv(tmp_path / "labels.csv")
    runner = CliRunner()
    out = runner.invoke(cli, ["slices", str(tmp_path / "table.parquet"), "--error", "error", "--labels",
                              str(tmp_path / "labels.csv"), "--json", "--max-q", "1"])
    assert out.exit_code == 0, out.output
    records = json.loads(out.stdout)
    assert records and all(set(SLICE_RECORD_KEYS) == set(r) for r in records)
    assert all("path" not in r["predicates"] for r in records)
    assert any(r["true_error_mean"] is not None and "kind" in r["predicates"] for r in records)
    out = runner.invoke(cli, ["slices", str(tmp_path / "table.parquet"), "--error", "error", "--labels",
                              str(tmp_path / "labels.csv"), "--max-q", "1"])
    assert out.exit_code == 0 and "corrected by 300 labelled items (kind; other predicates exact)" in out.output
    frame.drop("path").write_parquet(tmp_path / "nokeys.parquet")
    out = runner.invoke(cli, ["slices", str(tmp_path / "nokeys.parquet"), "--error", "error", "--labels",
                              str(tmp_path / "labels.csv")])
    assert isinstance(out.exception, ClipengineError) and "no 'path' column to match" in str(out.exception)


def _run_dir(tmp_path):
    """A run directory as the annotate and errors stages write it, schema included."""
    from clipengine.annotate.schemas import parse_schema
    from clipengine.annotate.stage import metadata_record
    from clipengine.artifacts import write_errors, write_metadata

    schema = parse_schema("name: road\ntemplates: ['a photo of a {}']\nattributes:\n  kind:\n    type: exclusive\n"
                          "    classes:\n      car: [car]\n      bus: [bus]\n      bike: [bike]\n")
    frame, truth = noisy_table(m=3000)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_metadata(run_dir / "metadata.parquet", frame.select("path", "kind"), metadata_record(schema, "m", 100.0))
    write_errors(run_dir, frame.select("path", "error", "night"))
    return run_dir, frame, truth


def test_slice_run_reads_the_labels_against_the_runs_schema(tmp_path):
    from clipengine.config import SliceConfig
    from clipengine.slices.find import slice_run

    run_dir, frame, truth = _run_dir(tmp_path)
    rows = np.arange(0, 3000, 10)
    (tmp_path / "labels.csv").write_text("path,true_kind\n" + "".join(
        f"{frame['path'][int(r)]},{truth[r]}\n" for r in rows))
    result = slice_run(run_dir, SliceConfig(max_q=1.0), ["kind", "night"], labels=tmp_path / "labels.csv")
    assert result.labels["labelled_items"] == rows.size
    assert json.loads((run_dir / "slices.json").read_text())["labels"]["features"] == ["kind"]
    (tmp_path / "bad.csv").write_text(f"path,true_kind\n{frame['path'][0]},truck\n")
    with pytest.raises(ClipengineError, match=r"row 1, column 'true_kind': 'truck' is not a class"):
        slice_run(run_dir, SliceConfig(), ["kind", "night"], labels=tmp_path / "bad.csv")


def test_cli_slices_a_run_directory_and_marks_slices_not_confirmed(tmp_path):
    from clipengine.cli import cli

    run_dir, frame, truth = _run_dir(tmp_path)
    rows = np.arange(0, 3000, 10)
    (tmp_path / "labels.csv").write_text("path,true_kind\n" + "".join(
        f"{frame['path'][int(r)]},{truth[r]}\n" for r in rows))
    out = CliRunner().invoke(cli, ["slices", str(run_dir), "--labels", str(tmp_path / "labels.csv"), "--max-q", "1",
                                   "--features", "kind,night", "--quiet", "--json"])
    assert out.exit_code == 0, out.output
    records = json.loads(out.stdout)
    overall = frame["error"].mean()
    for record in records:
        if record["true_ci_low"] is not None:
            assert record["confirmed"] == (record["true_ci_low"] > overall)
    assert any(r["confirmed"] is False for r in records)


def test_slices_see_the_model_s_label_where_a_person_labelled_the_item(tmp_path):
    """A run annotated with a labels file keeps the person's label in metadata.parquet; the slice stage
    (search and correction) uses the model's out-of-fold label there instead."""
    import json

    from clipengine import artifacts
    from clipengine.bindings.files import write_parquet
    from clipengine.slices.find import model_labels

    metadata = pl.DataFrame({"path": ["a", "b", "c", "d"], "weather": ["fog", "rain", "fog", "clear"],
                             "weather_source": ["model", "human", "model", "human"]})
    checks = {"weather": {"rows": [1, 3], "inclusion": [0.5, 0.5], "truth": ["rain", "clear"],
                          "zero_shot": ["fog", "fog"], "served": ["fog", "rain"]}}
    write_parquet(tmp_path / artifacts.METADATA, metadata,
                  metadata={artifacts.META_LABEL_CHECKS: json.dumps(checks), artifacts.META_ADAPTATION: "{}"})
    artifacts.write_errors(tmp_path, pl.DataFrame({"path": ["d", "c", "b"], "error": [1.0, 0.0, 1.0]}))
    frame, _, _ = artifacts.read_joined(tmp_path)
    assert frame["weather"].to_list() == ["rain", "fog", "clear"]  # b, c, d as stored
    assert model_labels(tmp_path, frame)["weather"].to_list() == ["fog", "fog", "rain"]
