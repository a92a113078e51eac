"""The whole job: stages, manifest, resume after a stop or SIGKILL anywhere, incremental reruns, CLI."""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from clipengine.config import CoverageConfig, DatasetConfig, EncodeConfig, RunConfig, SliceConfig
from clipengine.errors import ClipengineError
from clipengine.run.job import STAGES, Hooks, run_job

from tests.fixtures_datasets import CARLA_EXPECTED, make_carla

SCHEMA = """name: place
templates: ["a photo of a {}", "a picture of a {}"]
attributes:
  scene:
    type: exclusive
    classes:
      urban: ["city street", "town square"]
      rural: ["field", "farm"]
  tone:
    type: exclusive
    classes:
      bright: ["bright scene"]
      dark: ["dark scene"]
"""
N_IMAGES = 24
DETERMINISTIC = ["items.parquet", "skipped.parquet", "errors.parquet", "metadata.parquet", "metadata_naive.parquet",
                 "slices.parquet", "slices.json", "label_quality.csv", "label_quality.md", "coverage.json",
                 "coverage.parquet"]


def make_photo_folder(root: Path, n: int = N_IMAGES, *, start: int = 0) -> Path:
    """n images (red-ish ones fail more often) + errors.csv with a metadata column and truth."""
    data = root / "photos"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    rows = []
    for i in range(start + n):
        red = i % 3 == 0
        name = f"{'city' if i % 2 else 'field'}/img{i:03d}.png"
        if i >= start:
            pixels = rng.integers(0, 120, (36, 44, 3), dtype=np.uint8)
            pixels[..., 0] += 120 if red else 0
            (data / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(data / name)
        error = int(red or i % 7 == 0)
        rows.append(f"{name},{error},{'wet' if i % 4 == 0 else 'dry'},{'urban' if i % 2 else 'rural'}")
    (data / "errors.csv").write_text("path,error,road,true_scene\n" + "\n".join(rows) + "\n")
    return data


@pytest.fixture(scope="module")
def tiny_encoder(tiny_clip):
    from clipengine.encode.encoders import create_encoder

    return create_encoder(EncodeConfig(model=tiny_clip.model_config, backend="torch", device="cpu", precision="fp32"))


def make_config(tmp_path, tiny_clip, *, data, out="run", **changes) -> RunConfig:
    schema = tmp_path / "place.yaml"
    schema.write_text(SCHEMA)
    config = RunConfig(
        dataset="folder", root=data, out=tmp_path / out, schema=str(schema),
        encode=EncodeConfig(model=tiny_clip.model_config, backend="torch", device="cpu", precision="fp32",
                            batch_size=4, shard_size=4, progress=False),
        slices=SliceConfig(min_sup=2), auto_model=False, quiet=True,
    )
    return replace(config, **changes)


def snapshot(run_dir: Path) -> dict:
    out = {}
    for name in DETERMINISTIC:
        path = run_dir / name
        if name.endswith(".parquet"):
            out[name] = pl.read_parquet(path)
        else:
            out[name] = path.read_bytes()
    out["embeddings.npy"] = np.load(run_dir / "embeddings.npy")
    return out


def assert_same_results(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if name == "embeddings.npy":
            np.testing.assert_allclose(a[name], b[name], atol=1e-5)
        elif isinstance(a[name], pl.DataFrame):
            assert a[name].equals(b[name]), name
        else:
            assert a[name] == b[name], name


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_clip, tiny_encoder):
    """One uninterrupted run of the photo folder; its results are what every resumed run must give."""
    tmp = tmp_path_factory.mktemp("reference")
    data = make_photo_folder(tmp)
    result = run_job(make_config(tmp, tiny_clip, data=data), encoder=tiny_encoder)
    return result, snapshot(result.run_dir), data


def test_uninterrupted_run_writes_every_artifact(reference):
    result, _, _ = reference
    run_dir = result.run_dir
    assert result.ran == list(STAGES)
    for name in DETERMINISTIC + ["embeddings.npy", "model.json", "summary.md", "manifest.json"]:
        assert (run_dir / name).is_file(), name
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["stages"]) == set(STAGES)
    assert all(s["status"] == "done" and s["seconds"] >= 0 for s in manifest["stages"].values())
    assert manifest["stages"]["encode"]["encoded"] == N_IMAGES
    assert manifest["schema"]["name"] == "place" and len(manifest["schema"]["hash"]) >= 12
    assert manifest["inputs"][0]["file"].endswith("errors.csv") and len(manifest["inputs"][0]["sha256"]) == 64
    assert manifest["model"]["model_id"].startswith("tiny-clip")
    assert "numpy" in manifest["versions"]
    errors = pl.read_parquet(run_dir / "errors.parquet")
    assert errors.columns == ["path", "error", "road"]
    metadata = pl.read_parquet(run_dir / "metadata.parquet")
    assert metadata.columns[:3] == ["path", "scene", "scene_prob"]
    slices = json.loads((run_dir / "slices.json").read_text())
    assert set(slices["features"]) <= {"scene", "tone", "road"}
    assert slices["n_rows"] == N_IMAGES
    summary = (run_dir / "summary.md").read_text()
    assert "## Top slices" in summary and "| scene |" in summary  # label quality table from true_scene
    lq = pl.read_csv(run_dir / "label_quality.csv")
    assert {"naive_accuracy", "mean_accuracy"} <= set(lq.columns)


def test_second_run_does_no_work(reference, tiny_clip, tiny_encoder):
    result, before, data = reference
    bookkeeping = ("manifest.json", ".lock")  # the job's own records: they note the rerun
    mtimes = {p.name: p.stat().st_mtime_ns for p in result.run_dir.iterdir() if p.is_file() and p.name not in bookkeeping}
    config = make_config(result.run_dir.parent, tiny_clip, data=data)

    class NoEncoding:
        image_size, embed_dim = tiny_encoder.image_size, tiny_encoder.embed_dim
        model_record = tiny_encoder.model_record

        def encode_images(self, images):
            raise AssertionError("a rerun must not encode")

        encode_texts = encode_images

    again = run_job(config, encoder=NoEncoding())
    assert again.ran == [] and again.reused == list(STAGES)
    after = {p.name: p.stat().st_mtime_ns for p in result.run_dir.iterdir() if p.is_file() and p.name not in bookkeeping}
    assert after == mtimes
    assert_same_results(before, snapshot(result.run_dir))


def test_coverage_stage_covers_the_schema_attributes_and_the_dataset_features(reference):
    result, _, _ = reference
    run_dir = result.run_dir
    manifest = json.loads((run_dir / "manifest.json").read_text())
    # the slices' features: the schema's attributes, then the dataset's own column (errors.csv's road)
    assert manifest["features"] == ["scene", "tone", "road"]
    coverage = json.loads((run_dir / "coverage.json").read_text())
    assert list(coverage["features"]) == ["scene", "tone", "road"] and coverage["rows"] == N_IMAGES
    # the attributes' values are the schema's classes, in its order; the dataset column's those it holds
    assert coverage["features"]["scene"] == ["urban", "rural"] and coverage["features"]["tone"] == ["bright", "dark"]
    assert coverage["features"]["road"] == ["dry", "wet"]
    assert [entry["t"] for entry in coverage["coverage"]] == [1, 2]
    assert manifest["stages"]["coverage"]["coverage"] == [{k: e[k] for k in ("t", "covered", "valid")}
                                                         for e in coverage["coverage"]]
    joined = pl.read_parquet(run_dir / "metadata.parquet").join(pl.read_parquet(run_dir / "errors.parquet"), on="path")
    pairs = pl.read_parquet(run_dir / "coverage.parquet").filter(pl.col("t") == 2)
    for a, b in itertools.combinations(["scene", "tone", "road"], 2):
        counted = joined.group_by(a, b).len()
        expected = {(x, y): n for x, y, n in counted.iter_rows()}
        got = pairs.filter((pl.col("feature_1") == a) & (pl.col("feature_2") == b))
        assert {(x, y): n for x, y, n in got.select("value_1", "value_2", "count").iter_rows() if n} == expected
        errors = joined.group_by(a, b).agg(pl.col("error").sum())
        assert {(x, y): e for x, y, e in errors.iter_rows()} == {
            (x, y): e for x, y, e, n in got.select("value_1", "value_2", "errors", "count").iter_rows() if n}


def test_coverage_settings_and_the_odd_file_rerun_coverage_and_what_follows(reference, tiny_clip, tiny_encoder,
                                                                             tmp_path):
    result, _, data = reference
    shutil.copytree(result.run_dir, tmp_path / "run")
    config = make_config(tmp_path, tiny_clip, data=data)
    deeper = run_job(replace(config, coverage=CoverageConfig(t=3, min_count=2)), encoder=tiny_encoder)
    assert deeper.ran == ["coverage", "summary", "report"]
    coverage = json.loads((tmp_path / "run" / "coverage.json").read_text())
    assert [e["t"] for e in coverage["coverage"]] == [1, 2, 3] and coverage["params"]["min_count"] == 2

    odd = tmp_path / "odd.yaml"
    odd.write_text("features:\n  scene: [urban, rural]\n  road: [dry]\nexclude:\n  - {scene: urban, road: dry}\n")
    with_odd = replace(config, coverage=CoverageConfig(odd=odd))
    assert run_job(with_odd, encoder=tiny_encoder).ran == ["coverage", "summary", "report"]
    coverage = json.loads((tmp_path / "run" / "coverage.json").read_text())
    assert coverage["features"] == {"scene": ["urban", "rural"], "road": ["dry"]}
    joined = pl.read_parquet(tmp_path / "run" / "metadata.parquet").join(
        pl.read_parquet(tmp_path / "run" / "errors.parquet"), on="path")
    outside = joined.filter((pl.col("road") != "dry") | ((pl.col("scene") == "urban") & (pl.col("road") == "dry")))
    assert coverage["out_of_odd"] == outside.height > 0
    assert run_job(with_odd, encoder=tiny_encoder).ran == []
    odd.write_text("features:\n  scene: [urban, rural]\n  road: [dry, wet]\n")  # the same path, new content
    assert run_job(with_odd, encoder=tiny_encoder).ran == ["coverage", "summary", "report"]
    assert json.loads((tmp_path / "run" / "coverage.json").read_text())["out_of_odd"] == 0

    # a bad ODD file stops the run before any stage, with one line naming the key
    odd.write_text("features:\n  scene: [urban, rural]\nexclude:\n  - {wether: fog}\n")
    before = (tmp_path / "run" / "manifest.json").read_text()
    with pytest.raises(ClipengineError, match=r"'exclude\[0\]\.wether'"):
        run_job(with_odd, encoder=tiny_encoder)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"] == json.loads(before)["stages"]


class Stop(Exception):
    pass


class StopAt(Hooks):
    def __init__(self, stage, when):
        self.stage, self.when = stage, when

    def before(self, stage):
        if (stage, "before") == (self.stage, self.when):
            raise Stop(stage)

    def outputs_written(self, stage):
        if (stage, "outputs") == (self.stage, self.when):
            raise Stop(stage)


@pytest.mark.parametrize("stage", STAGES)
def test_resume_after_a_stop_at_every_stage_boundary(tmp_path, reference, tiny_clip, tiny_encoder, stage):
    _, expected, data = reference
    config = make_config(tmp_path, tiny_clip, data=data)
    # outputs written, manifest not yet updated: the worst moment to die
    with pytest.raises(Stop):
        run_job(config, encoder=tiny_encoder, hooks=StopAt(stage, "outputs"))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"][stage]["status"] == "running"
    resumed = run_job(config, encoder=tiny_encoder)
    assert resumed.ran[0] == stage  # earlier stages reused, this one redone
    assert set(resumed.reused) == set(STAGES[: STAGES.index(stage)])
    assert_same_results(expected, snapshot(resumed.run_dir))


KILL_SCRIPT = r"""
import os, signal, sys
sys.path[:0] = {paths!r}
from pathlib import Path
from clipengine.config import EncodeConfig, ModelConfig, RunConfig, SliceConfig
from clipengine.encode.encoders import create_encoder
from clipengine.run.job import Hooks, run_job

model = ModelConfig(model={model!r}, weights=Path({weights!r}))
encode = EncodeConfig(model=model, backend="torch", device="cpu", precision="fp32", batch_size=4, shard_size=4,
                      progress=False)
encoder = create_encoder(encode)
kill_after_batches = {kill_after_batches!r}
kill_at_stage = {kill_at_stage!r}

class Dying:
    image_size, embed_dim, model_record = encoder.image_size, encoder.embed_dim, encoder.model_record
    batches = 0
    def encode_images(self, images):
        if kill_after_batches is not None and self.batches == kill_after_batches:
            os.kill(os.getpid(), signal.SIGKILL)
        self.batches += 1
        return encoder.encode_images(images)
    def encode_texts(self, texts):
        return encoder.encode_texts(texts)

class KillAt(Hooks):
    def outputs_written(self, stage):
        if stage == kill_at_stage:
            os.kill(os.getpid(), signal.SIGKILL)

config = RunConfig(dataset="folder", root=Path({data!r}), out=Path({out!r}), schema={schema!r}, encode=encode,
                   slices=SliceConfig(min_sup=2), auto_model=False, quiet=True)
run_job(config, encoder=Dying(), hooks=KillAt())
"""


def run_and_kill(tmp_path, tiny_clip, data, *, kill_after_batches=None, kill_at_stage=None):
    (tmp_path / "place.yaml").write_text(SCHEMA)
    script = KILL_SCRIPT.format(
        paths=[str(Path(__file__).parent)], model=str(tiny_clip.model_config.model),
        weights=str(tiny_clip.model_config.weights), kill_after_batches=kill_after_batches,
        kill_at_stage=kill_at_stage, data=str(data), out=str(tmp_path / "run"), schema=str(tmp_path / "place.yaml"),
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ})
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def test_resume_after_sigkill_in_the_middle_of_encoding(tmp_path, reference, tiny_clip, tiny_encoder):
    _, expected, data = reference
    run_and_kill(tmp_path, tiny_clip, data, kill_after_batches=3)
    shards = list((tmp_path / "run" / "shards").glob("*"))
    assert shards, "the killed run left no finished shard"
    resumed = run_job(make_config(tmp_path, tiny_clip, data=data), encoder=tiny_encoder)
    encode = resumed.manifest["stages"]["encode"]
    assert encode["encoded"] == N_IMAGES and encode["newly_encoded"] == N_IMAGES - 12  # 3 batches of 4 kept
    assert_same_results(expected, snapshot(resumed.run_dir))


def test_resume_after_sigkill_between_outputs_and_manifest(tmp_path, reference, tiny_clip, tiny_encoder):
    _, expected, data = reference
    run_and_kill(tmp_path, tiny_clip, data, kill_at_stage="annotate")
    resumed = run_job(make_config(tmp_path, tiny_clip, data=data), encoder=tiny_encoder)
    assert resumed.reused == ["encode", "errors"] and resumed.ran[0] == "annotate"
    assert_same_results(expected, snapshot(resumed.run_dir))


def test_new_images_are_encoded_incrementally_and_settings_rerun_only_their_stages(tmp_path, tiny_clip, tiny_encoder):
    data = make_photo_folder(tmp_path, n=16)
    config = make_config(tmp_path, tiny_clip, data=data)
    run_job(config, encoder=tiny_encoder)
    make_photo_folder(tmp_path, n=8, start=16)  # 8 more images, errors.csv lists all 24
    grown = run_job(config, encoder=tiny_encoder)
    assert grown.manifest["stages"]["encode"]["newly_encoded"] == 8
    assert grown.manifest["stages"]["encode"]["encoded"] == 24
    changed = run_job(replace(config, slices=SliceConfig(min_sup=2, k=3)), encoder=tiny_encoder)
    assert changed.ran[:3] == ["slices", "summary", "report"][: len(changed.ran[:3])]
    assert "encode" in changed.reused and "annotate" in changed.reused
    assert len(json.loads((changed.run_dir / "slices.json").read_text())["slices"]) <= 3


def test_carla_run_slices_on_box_metadata(tmp_path, tiny_clip, tiny_encoder):
    root, dets = make_carla(tmp_path)
    config = replace(make_config(tmp_path, tiny_clip, data=root), dataset="carla", schema=None,
                     data=DatasetConfig(detections=dets), slices=SliceConfig(min_sup=1), report=False)
    result = run_job(config, encoder=tiny_encoder)
    errors = pl.read_parquet(result.run_dir / "errors.parquet")
    items = pl.read_parquet(result.run_dir / "items.parquet")
    assert items.select("path", "box").equals(errors.select("path", "box"))
    assert errors["error"].sum() == sum(CARLA_EXPECTED.values())
    summary = json.loads((result.run_dir / "slices.json").read_text())
    assert {"box_height", "distance", "gender"} <= set(summary["features"]) | set(summary["skipped_features"])
    assert result.manifest["schema"]["name"] == "pedestrian"
    assert "eval" not in result.ran  # no ground-truth attributes for carla


def test_fashion_mnist_run_end_to_end(tmp_path, tiny_clip, tiny_encoder):
    from clipengine import envs
    from clipengine.datasets.fashion_mnist import FILES

    if not (envs.fashion_mnist_dir() / FILES["test_images"]).is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    config = replace(make_config(tmp_path, tiny_clip, data=None), dataset="fashion-mnist", root=None, schema=None,
                     data=DatasetConfig(limit=40), slices=SliceConfig(min_sup=3))
    result = run_job(config, encoder=tiny_encoder)
    assert result.manifest["schema"]["name"] == "fashion"
    lq = pl.read_csv(result.run_dir / "label_quality.csv")
    assert "garment" in lq["attribute"].to_list()  # truth: the real garment classes
    assert pl.read_parquet(result.run_dir / "items.parquet")["path"][0] == "test/000000"
    # coverage over the schema's attributes (every garment class, given or not); ink left out with its reason
    from clipengine.annotate.schemas import load_schema

    coverage = json.loads((result.run_dir / "coverage.json").read_text())
    schema = load_schema("fashion")
    assert coverage["features"] == {a.name: list(a.class_names) for a in schema.attributes}
    assert "continuous" in coverage["skipped_features"]["ink"]
    page = (result.run_dir / "report.html").read_text(encoding="utf-8")
    pairs = len(schema.attributes) * (len(schema.attributes) - 1) // 2
    assert page.count('class="chart-figure heat-map"') == min(12, pairs) and 'id="coverage-levels"' in page
    assert "## Coverage" in (result.run_dir / "summary.md").read_text()


def test_bad_executor_and_dataset_errors(tmp_path, tiny_clip):
    data = make_photo_folder(tmp_path, n=4)
    with pytest.raises(ClipengineError, match="--executor 'spark' is not available"):
        run_job(replace(make_config(tmp_path, tiny_clip, data=data), executor="spark"))
    with pytest.raises(ClipengineError, match=r"photos/image_2 does not exist \(expected the KITTI layout"):
        run_job(replace(make_config(tmp_path, tiny_clip, data=data), dataset="carla"))


def test_cli_config_file_log_json_and_one_line_errors(tmp_path, tiny_clip):
    from click.testing import CliRunner

    from clipengine.cli import cli

    data = make_photo_folder(tmp_path, n=12)
    (tmp_path / "place.yaml").write_text(SCHEMA)
    job = tmp_path / "job.yaml"
    job.write_text(
        f"dataset: folder\nroot: {data}\nout: {tmp_path / 'run'}\nschema: {tmp_path / 'place.yaml'}\n"
        f"model: {tiny_clip.model_config.model}\nweights: {tiny_clip.model_config.weights}\n"
        "backend: torch\nprecision: fp32\nmin-sup: 2\nno_report: true\nt: 1\nmin-count: 3\n"
    )
    code = subprocess.run([sys.executable, "-m", "clipengine", "run", "--config", str(job), "--log-json", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert code.returncode == 0, code.stderr[-2000:]
    events = [json.loads(line) for line in code.stdout.splitlines()]
    assert events[-1]["event"] == "run" and events[-1]["status"] == "ok"
    assert {e["stage"] for e in events if e["event"] == "stage"} >= {"encode", "slices", "summary"}
    assert not (tmp_path / "run" / "report.html").exists()
    coverage = json.loads((tmp_path / "run" / "coverage.json").read_text())
    assert [e["t"] for e in coverage["coverage"]] == [1] and coverage["params"]["min_count"] == 3

    bad = subprocess.run([sys.executable, "-m", "clipengine", "run", "--config", str(job), "--ray-address", "auto"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "--ray-address: only with --executor ray" in bad.stderr
    job.write_text("dataset: folder\nbogus: 1\n")
    bad = subprocess.run([sys.executable, "-m", "clipengine", "run", "--config", str(job)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown option 'bogus'" in bad.stderr
    help_text = CliRunner().invoke(cli, ["run", "--help"])
    assert help_text.exit_code == 0 and "fashion-mnist" in help_text.output and "Example" in help_text.output
    assert "--odd" in help_text.output and "--min-count" in help_text.output


def test_default_model_falls_back_to_conse_offline_with_a_notice():
    from clipengine.config import ModelConfig
    from clipengine.encode.encoders import choose_model

    model, notice = choose_model(RunConfig())
    assert model == ModelConfig(model="conse")
    assert notice.startswith("notice: no weights for --model ViT-B-32") and "ConSE" in notice
    given = replace(RunConfig(), auto_model=False)
    assert choose_model(given) == (given.encode.model, None)


def test_celeba_run_evaluates_the_attributes_it_has_truth_for(tmp_path, tiny_clip, tiny_encoder):
    from tests.fixtures_datasets import make_celeba

    root, predictions = make_celeba(tmp_path)
    config = replace(make_config(tmp_path, tiny_clip, data=root), dataset="celeba", schema=None,
                     data=DatasetConfig(predictions=predictions), slices=SliceConfig(min_sup=1), report=False)
    result = run_job(config, encoder=tiny_encoder)
    assert result.manifest["schema"]["name"] == "celeba"
    lq = pl.read_csv(result.run_dir / "label_quality.csv")
    assert {"male", "young", "eyeglasses"} <= set(lq["attribute"].to_list())  # truth columns the fixture has
    assert result.manifest["stages"]["eval"]["matched_rows"] == 6
    errors = pl.read_parquet(result.run_dir / "errors.parquet")
    assert errors["error"].sum() == 2


def test_a_folder_whose_images_are_all_missing_fails_with_one_line(tmp_path, tiny_clip, tiny_encoder):
    data = tmp_path / "empty"
    data.mkdir()
    (data / "errors.csv").write_text("path,error\nnothere.png,1\nnorhere.png,0\n")
    with pytest.raises(ClipengineError, match="none of the 2 items could be decoded; reasons in .*skipped.parquet"):
        run_job(make_config(tmp_path, tiny_clip, data=data), encoder=tiny_encoder)
    skipped = pl.read_parquet(tmp_path / "run" / "skipped.parquet")
    assert skipped.height == 2


def test_quiet_and_log_json_do_not_change_fingerprints(reference, tiny_clip, tiny_encoder):
    result, _, data = reference
    config = make_config(result.run_dir.parent, tiny_clip, data=data)
    again = run_job(replace(config, quiet=False, log_json=True, slices=replace(config.slices)), encoder=tiny_encoder)
    assert again.ran == []


def test_labels_correct_the_slices_and_a_relabelled_item_reruns_them(reference, tmp_path, tiny_clip, tiny_encoder):
    import shutil

    done, _, data = reference
    shutil.copytree(done.run_dir, tmp_path / "run")  # encoded and annotated already
    config = make_config(tmp_path, tiny_clip, data=data, report=False,
                         slices=SliceConfig(min_sup=2, max_q=1.0, family="lattice"))
    first = run_job(config, encoder=tiny_encoder)
    assert "encode" in first.reused and "annotate" in first.reused
    paths = pl.read_parquet(first.run_dir / "metadata.parquet")["path"].to_list()
    labels = tmp_path / "labels.csv"
    rows = [f"{p},{'urban' if 'city' in p else 'rural'}" for p in paths[::2]]
    labels.write_text("path,true_scene\n" + "\n".join(rows) + "\n")
    labelled = replace(config, annotate=replace(config.annotate, labels=labels, adapt="none"))
    corrected = run_job(labelled, encoder=tiny_encoder)
    # the labels file feeds the annotate stage (labelled items keep their labels), eval and the slices
    assert corrected.ran == ["annotate", "eval", "slices", "coverage", "summary"]
    assert corrected.manifest["config"]["annotate"]["labels"] == str(labels)
    document = json.loads((corrected.run_dir / "slices.json").read_text())
    assert document["labels"]["labelled_items"] == len(rows) and document["labels"]["features"] == ["scene"]
    assert all("true_error_mean" in r and "confirmed" in r for r in document["slices"])
    summary = (corrected.run_dir / "summary.md").read_text()
    assert "true group: error rate" in summary and f"from {len(rows)} labelled items" in summary
    assert run_job(labelled, encoder=tiny_encoder).ran == []
    path, scene = rows[-1].rsplit(",", 1)
    flipped = f"{path},{'rural' if scene == 'urban' else 'urban'}"  # one item relabelled
    labels.write_text("path,true_scene\n" + "\n".join(rows[:-1] + [flipped]) + "\n")
    assert run_job(labelled, encoder=tiny_encoder).ran == ["annotate", "eval", "slices", "coverage", "summary"]
