"""Executors: the Ray executor on a real local Ray cluster against the local executor, same data,
same tiny model; a worker killed mid-shard; an interrupted job resumed from its shard files; labels
made in the actors; shards on a pyarrow filesystem URI; a shard whose worker always dies."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

pytestmark = pytest.mark.ray

N_PHOTOS = 30
ITEMS_PER_SHARD = 6


# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    # the encoder factories below travel to the workers by value (this module is not importable there)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """30 small photo files from scikit-image's samples (JPEG and PNG, varied sizes and crops) and
    one corrupt JPEG, as an items frame; a few items are object boxes."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("ray-photos")
    sources = [Image.fromarray(getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea", "camera", "rocket")]
    rng = np.random.default_rng(0)
    paths, boxes = [], []
    for i in range(N_PHOTOS):
        image = sources[i % len(sources)]
        side = int(rng.integers(60, 160))
        image = image.resize((side + int(rng.integers(0, 60)), side))
        path = folder / f"photo-{i:02d}.{'png' if i % 3 == 0 else 'jpg'}"
        image.save(path)
        paths.append(str(path))
        boxes.append([5.0, 5.0, 50.0, 40.0] if i % 7 == 3 else None)
    broken = folder / "photo-broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths.insert(11, str(broken))
    boxes.insert(11, None)
    return pl.DataFrame({"path": paths, "box": boxes}, schema={"path": pl.String, "box": pl.List(pl.Float64)})


def _config(tiny_clip):
    from clipengine.config import EncodeConfig

    return EncodeConfig(model=tiny_clip.model_config, backend="torch", device="cpu", precision="fp32",
                        batch_size=4, workers=1, progress=False)


@pytest.fixture(scope="module")
def local_run(tiny_clip, items, tmp_path_factory):
    from clipengine.executors import load_executor

    out = tmp_path_factory.mktemp("local-run")
    result = load_executor("local")(items, out, _config(tiny_clip))
    return out, result


def _assert_same_outputs(got, expected):
    np.testing.assert_allclose(np.load(got / "embeddings.npy"), np.load(expected / "embeddings.npy"), atol=1e-5)
    for name in ("items.parquet", "skipped.parquet"):
        assert pl.read_parquet(got / name).equals(pl.read_parquet(expected / name)), name
    assert json.loads((got / "model.json").read_text()) == json.loads((expected / "model.json").read_text())
    assert not (got / "shards-ray").exists()


# ---- encoder factories run inside the Ray actors ---------------------------------------------------
class CrashOnce:
    """Creates the real encoder; the first ``encode_images`` call of the job kills its own process
    (SIGKILL, as an OOM killer or a lost node would) if the flag file is still there."""

    def __init__(self, flag: str):
        self.flag = flag

    def __call__(self, config):
        from clipengine.encode.encoders import create_encoder

        encoder = create_encoder(config)
        original, flag = encoder.encode_images, self.flag

        def encode_images(images):
            try:
                os.rename(flag, flag + ".fired")  # exactly one actor call wins the rename
            except FileNotFoundError:
                return original(images)
            os.kill(os.getpid(), 9)

        encoder.encode_images = encode_images
        return encoder


class FailAfter:
    """Creates the real encoder; encoding fails (a Python error, not retried) after ``calls`` calls."""

    def __init__(self, calls: int):
        self.calls = calls

    def __call__(self, config):
        from clipengine.encode.encoders import create_encoder

        encoder = create_encoder(config)
        original, state = encoder.encode_images, {"calls": 0}

        def encode_images(images):
            state["calls"] += 1
            if state["calls"] > self.calls:
                raise RuntimeError("interrupted by the test")
            return original(images)

        encoder.encode_images = encode_images
        return encoder


# ---- tests --------------------------------------------------------------------------------------
def test_ray_executor_matches_local(ray_cluster, tiny_clip, items, local_run, tmp_path):
    from clipengine.executors import create_executor

    local_dir, local_result = local_run
    encode = create_executor("ray", items_per_shard=ITEMS_PER_SHARD, num_workers=1)
    result = encode(items, tmp_path / "ray-run", _config(tiny_clip))
    _assert_same_outputs(tmp_path / "ray-run", local_dir)
    assert (result.encoded, result.skipped) == (local_result.encoded, local_result.skipped) == (N_PHOTOS, 1)
    assert result.newly_encoded == N_PHOTOS and result.reused == 0
    skipped = pl.read_parquet(tmp_path / "ray-run" / "skipped.parquet")
    assert skipped["path"][0].endswith("photo-broken.jpg") and skipped["reason"][0].split(":")[0] in ("corrupt", "truncated", "not an image")

    # a finished directory is reused by the other executor: nothing goes through the model again
    again = create_executor("local")(items, tmp_path / "ray-run", _config(tiny_clip))
    assert again.newly_encoded == 0 and again.reused == N_PHOTOS
    _assert_same_outputs(tmp_path / "ray-run", local_dir)


def test_ray_actors_finish_decoding_on_their_device_as_the_local_stage_does(ray_cluster, tiny_clip, items, tmp_path):
    """--decode device: the decode tasks read the files (JPEG bytes travel), each actor decodes them on its
    device (the CPU here, the same code as on a GPU); the outputs and model.json are the local stage's."""
    import dataclasses

    from clipengine.executors import create_executor

    config = dataclasses.replace(_config(tiny_clip), decode="device")
    local = create_executor("local")(items, tmp_path / "local", config)
    result = create_executor("ray", items_per_shard=ITEMS_PER_SHARD, num_workers=1)(items, tmp_path / "ray", config)
    _assert_same_outputs(tmp_path / "ray", tmp_path / "local")
    assert (result.encoded, result.skipped) == (local.encoded, local.skipped) == (N_PHOTOS, 1)
    record = json.loads((tmp_path / "ray" / "model.json").read_text())
    assert record["decode"].startswith("device: JPEGs decoded by torchvision (libjpeg) and resized on cpu")


def test_ray_refuses_a_gpu_index(tiny_clip, items, tmp_path):
    """Ray gives each actor its own GPU: --device cuda:N cannot be honoured and says so before any work."""
    import dataclasses

    pytest.importorskip("ray")
    from clipengine.errors import ClipengineError
    from clipengine.executors import create_executor

    config = dataclasses.replace(_config(tiny_clip), device="cuda:1")
    with pytest.raises(ClipengineError, match="--device cuda:1 with --executor ray"):
        create_executor("ray", num_workers=1)(items, tmp_path / "ray", config)
    assert not (tmp_path / "ray" / "shards-ray").exists()


def test_interrupted_job_resumes_and_a_killed_worker_loses_nothing(ray_cluster, tiny_clip, items, local_run,
                                                                     tmp_path):
    """A finished local run over the first 8 items; a Ray job over all items that fails in its third
    shard; the same job again, whose first actor call SIGKILLs its own process: the job encodes
    exactly what neither the finished run nor the finished shards hold, once, and nothing is lost."""
    from clipengine.artifacts import RAY_SHARDS_DIR as SHARDS_DIR
    from clipengine.encode.encoders import create_encoder
    from clipengine.executors import load_executor
    from clipengine.executors.ray import ShardStore, encode_items

    out = tmp_path / "run"
    config = _config(tiny_clip)
    encoder = create_encoder(config)  # the model record; the actors build their own
    assert load_executor("local")(items.head(8), out, config, encoder=encoder).encoded == 8
    # shard 0 (items 0-5) is all done, shard 1 has 4 to encode; batches of 4: fail on the 4th call
    with pytest.raises(Exception, match="interrupted by the test"):
        encode_items(items, out, config, encoder=encoder, items_per_shard=ITEMS_PER_SHARD, num_workers=1,
                     encoder_factory=FailAfter(3))
    store = ShardStore(out / SHARDS_DIR, json.loads((out / SHARDS_DIR / "state.json").read_text()))
    finished = [store.index(path.name) for path in sorted((out / SHARDS_DIR).glob("shard-*.npz"))]
    assert 1 <= len(finished) < len(items) // ITEMS_PER_SHARD - 1
    finished_rows = sum(len(shard.keys) for shard in finished)
    assert pl.read_parquet(out / "items.parquet").height == 8  # the finished set is untouched so far

    flag = tmp_path / "kill-flag"
    flag.write_text("kill the first actor call")
    result = encode_items(items, out, config, encoder=encoder, items_per_shard=ITEMS_PER_SHARD, num_workers=1,
                          encoder_factory=CrashOnce(str(flag)))
    assert not flag.exists() and (tmp_path / "kill-flag.fired").exists()  # an actor did die mid-shard
    assert result.reused == 8 + finished_rows
    assert result.newly_encoded == N_PHOTOS - 8 - finished_rows
    assert (result.encoded, result.skipped) == (N_PHOTOS, 1)
    _assert_same_outputs(out, local_run[0])
    assert pl.read_parquet(out / "items.parquet")["path"].is_unique().all()


def test_ray_encodes_again_a_file_rewritten_in_place(ray_cluster, tiny_clip, items, tmp_path):
    import shutil

    from PIL import Image

    from clipengine.executors import create_executor

    folder = tmp_path / "photos"
    folder.mkdir()
    paths = [shutil.copy(p, folder / Path(p).name) for p in items["path"].head(6).to_list()]
    own = pl.DataFrame({"path": [str(p) for p in paths]})
    encode = create_executor("ray", items_per_shard=ITEMS_PER_SHARD, num_workers=1)
    first = encode(own, tmp_path / "run", _config(tiny_clip))
    before = np.load(tmp_path / "run" / "embeddings.npy")
    assert first.newly_encoded == 6 and np.load(tmp_path / "run" / "item_stats.npy").shape == (6, 2)
    Image.open(paths[0]).rotate(90).save(paths[2])  # another picture under the same name
    again = encode(own, tmp_path / "run", _config(tiny_clip))
    after = np.load(tmp_path / "run" / "embeddings.npy")
    assert (again.newly_encoded, again.reused) == (1, 5)
    np.testing.assert_array_equal(np.delete(after, 2, axis=0), np.delete(before, 2, axis=0))
    assert not np.allclose(after[2], before[2])


def test_a_shard_is_finished_only_while_its_files_are_unchanged():
    from clipengine.shards import ShardIndex

    keys = ["a", "b", "c"]
    stats = np.array([[10, 1], [20, 2], [30, 3]], np.int64)
    shard = ShardIndex(["a", "c"], {"b": "corrupt"}, "", np.array([[10, 1], [30, 3]], np.int64))
    assert shard.files_unchanged(keys, stats, range(3))
    assert not shard.files_unchanged(keys, np.array([[10, 1], [20, 2], [31, 4]], np.int64), range(3))


def _assert_same_metadata(got, expected):
    """Same rows and key columns, labels exact, probabilities and margins within 1e-5, same Parquet
    metadata (model id, schema hash, strategies, logit scale)."""
    from clipengine.bindings.files import read_parquet_metadata

    a, b = pl.read_parquet(got), pl.read_parquet(expected)
    assert a.columns == b.columns and a.height == b.height > 0
    for column in a.columns:
        if a[column].dtype == pl.Float32:
            np.testing.assert_allclose(a[column].to_numpy(), b[column].to_numpy(), atol=1e-5, err_msg=column)
        else:
            assert a[column].equals(b[column]), column
    meta_a, meta_b = read_parquet_metadata(got), read_parquet_metadata(expected)
    assert {k: v for k, v in meta_a.items() if k.startswith("clipengine.")} == {
        k: v for k, v in meta_b.items() if k.startswith("clipengine.")}


def test_run_job_with_ray_executor_gives_the_local_results(ray_cluster, tiny_clip, tmp_path):
    """The whole run on Ray (labels made in the actors, shards under a file:// URI elsewhere) gives the
    local run's metadata, slices and report inputs."""
    from clipengine.run.job import run_job

    from tests.engine.run.test_run import (
        DETERMINISTIC,
        assert_same_results,
        make_config,
        make_photo_folder,
        snapshot,
    )

    data = make_photo_folder(tmp_path, n=12)
    local = run_job(make_config(tmp_path, tiny_clip, data=data, out="local"))
    shards = (tmp_path / "elsewhere" / "shards").as_uri()
    on_ray = run_job(make_config(tmp_path, tiny_clip, data=data, out="ray", executor="ray", ray_workers=1,
                                 ray_shards=shards))
    stages = on_ray.manifest["stages"]
    assert on_ray.ran[0] == "encode" and stages["encode"]["newly_encoded"] == 12
    assert stages["annotate"]["in_pass"] is True and "in_pass" not in local.manifest["stages"]["annotate"]
    for name in ("metadata.parquet", "metadata_naive.parquet"):
        _assert_same_metadata(on_ray.run_dir / name, local.run_dir / name)
    got, expected = snapshot(on_ray.run_dir), snapshot(local.run_dir)
    for name in ("metadata.parquet", "metadata_naive.parquet"):
        del got[name], expected[name]
    assert_same_results(got, expected)  # slices.json, slices.parquet, label quality: equal
    assert "slices.json" in DETERMINISTIC and "slices.json" in got
    assert not (tmp_path / "ray" / "shards-ray").exists() and not (tmp_path / "elsewhere" / "shards").exists()


class DieOnShard:
    """Creates the real encoder; encoding kills its own process every time (a shard no worker survives)."""

    def __call__(self, config):
        from clipengine.encode.encoders import create_encoder

        encoder = create_encoder(config)

        def encode_images(images):
            os.kill(os.getpid(), 9)

        encoder.encode_images = encode_images
        return encoder


def _place_schema(tmp_path):
    from clipengine.annotate.schemas import load_schema

    from tests.engine.run.test_run import SCHEMA

    path = tmp_path / "place.yaml"
    path.write_text(SCHEMA)
    return load_schema(str(path))


def test_actors_label_their_shards_and_unlabelled_shards_are_labelled_on_the_driver(ray_cluster, tiny_clip, items,
                                                                                     local_run, tmp_path):
    """Shards under a file:// URI in another folder carry the label arrays the actors made; a job
    interrupted, one shard rewritten without labels (as a job that did not annotate writes it), then
    resumed: the metadata files equal the annotate stage's on the local executor's embeddings."""
    from clipengine.annotate.stage import annotate_dir, resolve_schema
    from clipengine.config import AnnotateConfig
    from clipengine.encode.encoders import create_encoder
    from clipengine.executors import InPassAnnotation
    from clipengine.executors.ray import ShardFailed, ShardStore, encode_items

    config = _config(tiny_clip)
    encoder = create_encoder(config)
    schema = _place_schema(tmp_path)
    strategies = {"metadata.parquet": "max", "metadata_naive.parquet": "naive"}
    annotation = InPassAnnotation(
        targets=tuple((name, resolve_schema(AnnotateConfig(strategy=s), schema)) for name, s in strategies.items()),
        text_encoder=lambda record: encoder, config=AnnotateConfig(device="cpu", progress=False))
    out, folder = tmp_path / "run", tmp_path / "elsewhere" / "shards"
    options = {"encoder": encoder, "items_per_shard": ITEMS_PER_SHARD, "num_workers": 1, "shards": folder.as_uri(),
               "annotation": annotation}
    with pytest.raises(ShardFailed, match=r"shard shard-\d{6}-\w+\.npz: encoding failed: RuntimeError: interrupted"):
        encode_items(items, out, config, encoder_factory=FailAfter(4), **options)
    assert not (out / "shards-ray").exists()
    store = ShardStore(folder.as_uri(), json.loads((folder / "state.json").read_text()))
    names = sorted(path.name for path in folder.glob("shard-*.npz"))
    assert 1 <= len(names) < len(items) // ITEMS_PER_SHARD
    for name in names:  # labelled in the actor: (K, A) arrays beside the (K, D) rows
        shard = store.read(name)
        assert shard["labels_0"].shape == shard["probs_1"].shape == (len(shard["keys"]), 2)
        assert str(shard["labels_key"])
    old = store.read(names[0])
    store.write(names[0], {key: old[key] for key in ("keys", "rows", "stats", "skipped_keys", "skipped_reasons")})
    assert "labels_0" not in store.read(names[0])
    done_rows = sum(len(store.index(name).keys) for name in names)

    result = encode_items(items, out, config, **options)
    assert (result.newly_encoded, result.reused) == (N_PHOTOS - done_rows, done_rows)
    _assert_same_outputs(out, local_run[0])
    assert not folder.exists()
    for name, strategy in strategies.items():
        expected = tmp_path / f"local-{name}"
        annotate_dir(local_run[0], AnnotateConfig(schema=str(tmp_path / "place.yaml"), strategy=strategy,
                                                  device="cpu", progress=False), expected, text_encoder=encoder)
        _assert_same_metadata(out / name, expected)


def test_a_shard_whose_worker_always_dies_fails_the_job_naming_it(ray_cluster, tiny_clip, items, tmp_path):
    from clipengine.encode.encoders import create_encoder
    from clipengine.executors.ray import ShardFailed, encode_items

    config = _config(tiny_clip)
    with pytest.raises(ShardFailed, match=r"^shard shard-000000-\w+\.npz: its encode worker died 2 times "
                                          r"\(retries allowed: 1\)"):
        encode_items(items.head(4), tmp_path / "run", config, encoder=create_encoder(config), items_per_shard=4,
                     num_workers=1, max_retries=1, encoder_factory=DieOnShard())
    assert not (tmp_path / "run" / "items.parquet").exists()


# ---- without a cluster ------------------------------------------------------------------------------
def test_shard_location_errors_are_one_line(tiny_clip, items, tmp_path):
    from clipengine.errors import ClipengineError
    from clipengine.executors.ray import encode_items
    from clipengine.shards import ShardStore

    with pytest.raises(ClipengineError, match=r"^--ray-shards foo://bucket/x: cannot open it \(Unrecognized "
                                              r"filesystem type in URI: foo://bucket/x\)$"):
        encode_items(items, tmp_path / "out", _config(tiny_clip), shards="foo://bucket/x")
    with pytest.raises(ClipengineError, match=r"^--ray-shards hdfs://nohost:1/x: cannot open it \([^\n]+\)$"):
        ShardStore("hdfs://nohost:1/x", {}, option="--ray-shards")  # no Hadoop client here: pyarrow cannot load it
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ClipengineError, match=r"^shard folder .*a-file/shards: cannot write there"):
        ShardStore(str(blocker / "shards"), {}).prepare()


def test_cli_ray_shards_unknown_scheme_is_one_line(tmp_path):
    import subprocess

    from tests.engine.run.test_run import make_photo_folder

    data = make_photo_folder(tmp_path, n=4)
    done = subprocess.run([sys.executable, "-m", "clipengine", "run", "--dataset", "folder", "--root", str(data),
                           "--out", str(tmp_path / "run"), "--model", "conse", "--executor", "ray",
                           "--ray-shards", "foo://bucket/x", "--quiet"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "clipengine: error: --ray-shards foo://bucket/x: cannot open it (Unrecognized filesystem type in URI: "
        "foo://bucket/x)"]


@pytest.mark.parametrize("commit", ["rename", "marker"])
def test_shard_store_commits_whole_shards(tmp_path, commit):
    """Both commit protocols on pyarrow's local filesystem: a shard exists only once committed; an
    uncommitted object (an upload cut off before its marker) is not a shard; clear() removes only the
    store's own files."""
    from clipengine.shards import ShardStore

    identity = {"model_id": "m", "precision": "fp32", "embed_dim": 2}
    uri = (tmp_path / "shards").as_uri()
    store = ShardStore(uri, identity, commit=commit).open()
    store.prepare()
    arrays = {"keys": np.asarray(["a", "b"]), "rows": np.eye(2, dtype=np.float32),
              "stats": np.zeros((2, 2), np.int64), "skipped_keys": np.asarray(["c"]), "skipped_reasons": np.asarray(["corrupt: x"])}
    assert store.index("shard-000000-x.npz") is None
    if commit == "marker":
        (tmp_path / "shards" / "shard-000000-x.npz.cut").write_bytes(b"PK half an upload")
        assert store.index("shard-000000-x.npz") is None
    assert store.names() == set()
    store.write("shard-000000-x.npz", arrays)
    assert store.names() == {"shard-000000-x.npz"}
    index = store.index("shard-000000-x.npz")
    assert (index.keys, index.skipped, index.labels_key) == (["a", "b"], {"c": "corrupt: x"}, "")
    np.testing.assert_array_equal(store.read("shard-000000-x.npz")["rows"], np.eye(2))
    assert store.count_attempt("job1", "encode", "shard-000000-x.npz") == 1
    assert store.count_attempt("job1", "encode", "shard-000000-x.npz") == 2
    assert ShardStore(uri, {**identity, "model_id": "other"}, commit=commit).index("shard-000000-x.npz") is None
    (tmp_path / "shards" / "notes.txt").write_text("someone else's file")
    ShardStore(uri, {**identity, "model_id": "other"}, commit=commit).open()  # another model: shards dropped
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["notes.txt"]

def test_missing_ray_says_how_to_install(monkeypatch, tiny_clip, items, tmp_path):
    from clipengine.errors import ClipengineError
    from clipengine.executors import load_executor

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    with pytest.raises(ClipengineError, match=r"pip install 'clipengine\[ray\]'"):
        load_executor("ray")(items, tmp_path / "out", _config(tiny_clip))


def test_executor_registry_and_options():
    from clipengine.errors import ClipengineError
    from clipengine.executors import EXECUTORS, create_executor, load_executor

    assert set(EXECUTORS) == {"local", "ray"}
    with pytest.raises(ClipengineError, match="'spark'"):
        load_executor("spark")
    with pytest.raises(ClipengineError, match="--ray-address: only with --executor ray"):
        create_executor("local", address="auto", gpus_per_worker=None)
    assert create_executor("local", address=None) is load_executor("local")


def test_plan_resources():
    from clipengine.errors import ClipengineError
    from clipengine.executors.ray import plan_resources

    cpu_only = plan_resources({"CPU": 8.0}, gpus_per_worker=None, cpus_per_worker=2.0, cpus_for_decode=1.0,
                              num_workers=None)
    assert (cpu_only["num_workers"], cpu_only["gpus_per_worker"], cpu_only["threads_per_worker"]) == (3, 0.0, 2)
    gpus = plan_resources({"CPU": 32.0, "GPU": 4.0}, gpus_per_worker=None, cpus_per_worker=1.0, cpus_for_decode=2.0,
                          num_workers=None)
    assert (gpus["num_workers"], gpus["gpus_per_worker"], gpus["cpus_per_worker"]) == (4, 1.0, 1.0)
    half = plan_resources({"CPU": 32.0, "GPU": 2.0}, gpus_per_worker=0.5, cpus_per_worker=1.0, cpus_for_decode=1.0,
                          num_workers=None)
    assert half["num_workers"] == 4
    with pytest.raises(ClipengineError, match="needs more than the Ray cluster's 2 CPUs"):
        plan_resources({"CPU": 2.0}, gpus_per_worker=None, cpus_per_worker=1.0, cpus_for_decode=1.0, num_workers=2)
    with pytest.raises(ClipengineError, match="has 0 GPU"):
        plan_resources({"CPU": 2.0}, gpus_per_worker=1.0, cpus_per_worker=1.0, cpus_for_decode=1.0, num_workers=None)
