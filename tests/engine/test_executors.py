"""Executors: the Ray executor on a real local Ray cluster against the local executor, same data,
same tiny model; a worker killed mid-shard; an interrupted job resumed from its shard files."""

from __future__ import annotations

import json
import os
import sys

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
        from clipengine.encode import create_encoder

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
        from clipengine.encode import create_encoder

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


def test_interrupted_job_resumes_and_a_killed_worker_loses_nothing(ray_cluster, tiny_clip, items, local_run,
                                                                     tmp_path):
    """A finished local run over the first 8 items; a Ray job over all items that fails in its third
    shard; the same job again, whose first actor call SIGKILLs its own process: the job encodes
    exactly what neither the finished run nor the finished shards hold, once, and nothing is lost."""
    from clipengine.encode import create_encoder
    from clipengine.executors import load_executor
    from clipengine.executors.ray import SHARDS_DIR, ShardStore, encode_items

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


def test_run_job_with_ray_executor_gives_the_local_results(ray_cluster, tiny_clip, tmp_path):
    from test_run import assert_same_results, make_config, make_photo_folder, snapshot

    from clipengine.run import run_job

    data = make_photo_folder(tmp_path, n=12)
    local = run_job(make_config(tmp_path, tiny_clip, data=data, out="local"))
    on_ray = run_job(make_config(tmp_path, tiny_clip, data=data, out="ray", executor="ray", ray_workers=1))
    assert on_ray.ran[0] == "encode" and on_ray.manifest["stages"]["encode"]["newly_encoded"] == 12
    assert_same_results(snapshot(on_ray.run_dir), snapshot(local.run_dir))


# ---- without a cluster ------------------------------------------------------------------------------
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
