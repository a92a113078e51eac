import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from PIL import Image

from clipengine.bindings import cpu_supports_bf16

from tests.bindings.reference import cosine, open_clip_reference


def _config(saved, **overrides):
    from clipengine.config import EncodeConfig

    settings = dict(model=saved.model_config, backend="torch", device="cpu", precision="fp32", progress=False, workers=1)
    settings.update(overrides)
    return EncodeConfig(**settings)


@pytest.fixture()
def photo_dir(sample_photos, tmp_path):
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for i, path in enumerate(sample_photos):
        shutil.copy(path, (folder / "nested" if i % 2 else folder) / path.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _run_cli(args):
    from clipengine.cli import cli

    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_encode_cli_end_to_end(tiny_clip, photo_dir, tmp_path):
    out = tmp_path / "emb"
    output = _run_cli(["encode", str(photo_dir), "--out", str(out), "--model", str(tiny_clip.config_path),
                       "--weights", str(tiny_clip.weights_path), "--backend", "torch", "--precision", "fp32", "--exact-decode", "--quiet"])
    assert "encoded 5 items" in output and "skipped 1" in output
    embeddings = np.load(out / "embeddings.npy")
    items = pl.read_parquet(out / "items.parquet")
    skipped = pl.read_parquet(out / "skipped.parquet")
    record = json.loads((out / "model.json").read_text())
    assert embeddings.shape == (5, 32) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    paths = items["path"].to_list()
    assert paths == sorted(paths, key=lambda p: os.path.relpath(p, photo_dir)) and len(paths) == 5
    assert skipped["path"].to_list() == [str(photo_dir / "broken.jpg")] and skipped["reason"][0]
    assert record["backend"] == "torch" and record["precision"] == "fp32" and record["embed_dim"] == 32
    assert record["image_forward"] == "fused CPU forward"
    from clipengine import envs

    assert record.get("cpu_streams", 1) == envs.num_threads()  # batches split into at most one stream per thread
    assert not (out / "shards").exists()
    # the same rows as open_clip's own preprocess + eager forward on the same weights
    reference, _ = open_clip_reference(tiny_clip, paths)
    assert cosine(embeddings, reference).min() >= 0.99999

    # the text tower of the same model, found from the folder
    text_out = _run_cli(["encode-text", "a cat", "a dog", "--like", str(out), "--json"])
    rows = json.loads(text_out)
    from clipengine.encode.encoders import text_encoder_from_dir

    expected = text_encoder_from_dir(out, device="cpu").encode_texts(["a cat", "a dog"])
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), expected, atol=1e-6)


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no bf16 instructions")
def test_torch_bf16_on_a_bf16_cpu_runs_the_fused_forward(tiny_clip, photo_dir, tmp_path):
    out = tmp_path / "emb"
    _run_cli(["encode", str(photo_dir), "--out", str(out), "--model", str(tiny_clip.config_path),
              "--weights", str(tiny_clip.weights_path), "--backend", "torch", "--precision", "bf16",
              "--exact-decode", "--quiet"])
    record = json.loads((out / "model.json").read_text())
    assert (record["backend"], record["precision"], record["image_forward"]) == ("torch", "bf16", "fused CPU forward")
    assert "auto_choice" not in record  # nothing was left to choose
    paths = pl.read_parquet(out / "items.parquet")["path"].to_list()
    reference, _ = open_clip_reference(tiny_clip, paths)
    assert cosine(np.load(out / "embeddings.npy"), reference).min() >= 0.999


def test_superset_rerun_encodes_only_new_items(tiny_clip, sample_photos, tmp_path):
    from clipengine.encode.stage import encode_items

    out = tmp_path / "emb"
    first = encode_items(pl.DataFrame({"path": [str(p) for p in sample_photos[:3]]}), out, _config(tiny_clip))
    assert (first.encoded, first.newly_encoded, first.reused) == (3, 3, 0)
    before = np.load(out / "embeddings.npy")
    items = pl.DataFrame({"path": [str(p) for p in reversed(sample_photos)]})
    second = encode_items(items, out, _config(tiny_clip))
    assert (second.encoded, second.newly_encoded, second.reused) == (5, 2, 3)
    after = np.load(out / "embeddings.npy")
    assert pl.read_parquet(out / "items.parquet")["path"].to_list() == items["path"].to_list()
    np.testing.assert_array_equal(after[2:], before[::-1])  # reused rows, now in the new order
    # another model (another identity) never reuses these rows
    from tests.fixtures_models import TINY_ARCHITECTURE, save_random_model

    other = save_random_model(TINY_ARCHITECTURE, tmp_path / "other", "tiny-clip", seed=3)
    third = encode_items(items, out, _config(other))
    assert (third.newly_encoded, third.reused) == (5, 0)


def test_a_file_rewritten_in_place_is_encoded_again(tiny_clip, sample_photos, tmp_path):
    from clipengine.encode.stage import encode_items

    folder = tmp_path / "photos"
    folder.mkdir()
    paths = [shutil.copy(p, folder / f"{i}{Path(p).suffix}") for i, p in enumerate(sample_photos[:3])]
    items = pl.DataFrame({"path": [str(p) for p in paths]})
    out = tmp_path / "emb"
    encode_items(items, out, _config(tiny_clip))
    before = np.load(out / "embeddings.npy")
    assert np.load(out / "item_stats.npy").shape == (3, 2)
    # the same path now holds another photo (new size and mtime)
    Image.open(sample_photos[4]).convert("RGB").save(paths[1], format=Image.open(paths[0]).format or "PNG")
    again = encode_items(items, out, _config(tiny_clip))
    assert (again.newly_encoded, again.reused) == (1, 2)
    after = np.load(out / "embeddings.npy")
    np.testing.assert_array_equal(after[[0, 2]], before[[0, 2]])
    assert not np.allclose(after[1], before[1])
    fresh = encode_items(items, tmp_path / "fresh", _config(tiny_clip))
    np.testing.assert_allclose(after, np.load(fresh.out_dir / "embeddings.npy"), atol=1e-6)


def test_a_shard_of_a_since_rewritten_file_is_not_reused(tiny_clip, sample_photos, tmp_path):
    from clipengine.artifacts import SHARDS_DIR
    from clipengine.encode.stage import encode_items

    out = tmp_path / "emb"
    items = pl.DataFrame({"path": [str(p) for p in sample_photos[:2]]})
    encode_items(items, out, _config(tiny_clip))
    shard_dir = out / SHARDS_DIR  # an interrupted job's shard whose stats no longer match the file
    shard_dir.mkdir()
    (shard_dir / "state.json").write_text(
        json.dumps(json.loads(pl.read_parquet_metadata(out / "items.parquet")["clipengine.identity"])))
    np.savez(shard_dir / "shard-000000.npz", keys=np.asarray([str(sample_photos[2])]),
             rows=np.ones((1, 32), np.float32), stats=np.asarray([[1, 1]], np.int64))
    more = pl.DataFrame({"path": [str(p) for p in sample_photos[:3]]})
    again = encode_items(more, out, _config(tiny_clip))
    assert (again.newly_encoded, again.reused) == (1, 2)
    assert not np.allclose(np.load(out / "embeddings.npy")[2], 1.0)


def test_boxes_are_items(tiny_clip, sample_photos, tmp_path):
    from clipengine.encode.decode import load_image
    from clipengine.encode.encoders import create_encoder
    from clipengine.encode.geometry import ImageSpec
    from clipengine.encode.inputs import items_from_input
    from clipengine.encode.stage import encode_items

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(sample_photos[0], folder / "astronaut.jpg")  # 512×512
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x0,y0,x1,y1\nastronaut.jpg,100,50,300,250\nastronaut.jpg,0,0,512,512\nastronaut.jpg,900,900,950,950\n")
    items, left_out = items_from_input(folder, boxes=boxes)
    assert not left_out
    assert items.columns == ["path", "box"] and len(items) == 3
    config = _config(tiny_clip, box_margin=0.05)
    result = encode_items(items, tmp_path / "emb", config)
    assert (result.encoded, result.skipped) == (2, 1)
    skipped = pl.read_parquet(tmp_path / "emb" / "skipped.parquet")
    assert skipped.columns == ["path", "box", "reason"] and skipped["box"][0].to_list() == [900.0, 900.0, 950.0, 950.0]
    encoded = pl.read_parquet(tmp_path / "emb" / "items.parquet")
    assert encoded["box"].to_list() == [[100.0, 50.0, 300.0, 250.0], [0.0, 0.0, 512.0, 512.0]]
    encoder = create_encoder(config)
    crop = load_image(folder / "astronaut.jpg", [100, 50, 300, 250], ImageSpec(32), box_margin=0.05)
    expected = encoder.encode_images(crop[None])
    np.testing.assert_allclose(np.load(tmp_path / "emb" / "embeddings.npy")[0], expected[0], atol=1e-5)


_SLOW_RUN = textwrap.dedent(
    """
    import sys, time
    import polars as pl
    from clipengine.config import EncodeConfig, ModelConfig
    from clipengine.encode.encoders import create_encoder
    from clipengine.encode.stage import encode_items

    model, weights, listing, out = sys.argv[1:5]
    config = EncodeConfig(model=ModelConfig(model=model, weights=weights), backend="torch", device="cpu",
                          precision="fp32", batch_size=2, shard_size=4, workers=1, progress=False)
    real = create_encoder(config)

    class Slow:
        image_size, embed_dim, model_record = real.image_size, real.embed_dim, real.model_record

        def encode_images(self, images):
            time.sleep(0.15)
            return real.encode_images(images)

    items = pl.DataFrame({"path": open(listing).read().split()})
    print("READY", flush=True)
    encode_items(items, out, config, encoder=Slow())
    """
)


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tiny_clip, sample_photos, tmp_path):

    from clipengine.encode.stage import encode_items

    paths = _numbered_photos(sample_photos, tmp_path / "many", 40)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(paths))
    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_RUN, str(tiny_clip.config_path), str(tiny_clip.weights_path), str(listing), str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "CLIPENGINE_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "shards").glob("shard-*.npz"))) < 2:
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.05)
    time.sleep(0.2)  # land somewhere inside a later batch or shard write
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(list((out / "shards").glob("shard-*.npz")))
    assert 2 <= done_before < 10 and not (out / "embeddings.npy").exists()

    items = pl.DataFrame({"path": paths})
    resumed = encode_items(items, out, _config(tiny_clip, batch_size=2, shard_size=4))
    assert resumed.reused >= 8 and resumed.reused + resumed.newly_encoded == 40
    whole = encode_items(items, tmp_path / "whole", _config(tiny_clip, batch_size=2, shard_size=4))
    assert whole.newly_encoded == 40
    assert pl.read_parquet(out / "items.parquet")["path"].to_list() == paths
    np.testing.assert_allclose(np.load(out / "embeddings.npy"), np.load(tmp_path / "whole" / "embeddings.npy"), atol=1e-6)
    assert not (out / "shards").exists()


def _numbered_photos(sample_photos, folder: Path, count: int) -> list[str]:
    """``count`` distinct JPEGs in ``folder``: crops of the sample photos at random offsets."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        source = np.asarray(Image.open(sample_photos[i % len(sample_photos)]).convert("RGB"))
        y, x = rng.integers(0, 100, 2)
        path = folder / f"img{i:03d}.jpg"
        Image.fromarray(source[y:y + 300, x:x + 350]).save(path)
        paths.append(str(path))
    return paths


def test_an_interrupt_keeps_every_batch_encoded_before_it(tiny_clip, sample_photos, tmp_path):
    """Ctrl-C (or SIGTERM through the CLI) between shard commits: the rows of the batches already encoded
    are committed on the way out, and the rerun encodes only the rest."""
    from clipengine.encode.encoders import create_encoder
    from clipengine.encode.stage import encode_items

    paths = _numbered_photos(sample_photos, tmp_path / "many", 12)
    items = pl.DataFrame({"path": paths})
    config = _config(tiny_clip, batch_size=2, shard_size=1000, shard_seconds=3600.0)
    real = create_encoder(config)

    class InterruptedAtTheFourthBatch:
        image_size, embed_dim, model_record = real.image_size, real.embed_dim, real.model_record
        calls = 0

        def encode_images(self, images):
            self.calls += 1
            if self.calls == 4:
                raise KeyboardInterrupt
            return real.encode_images(images)

    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        encode_items(items, out, config, encoder=InterruptedAtTheFourthBatch())
    assert len(list((out / "shards").glob("shard-*.npz"))) == 1 and not (out / "embeddings.npy").exists()

    resumed = encode_items(items, out, config, encoder=real)
    assert (resumed.reused, resumed.newly_encoded) == (6, 6)
    encode_items(items, tmp_path / "whole", config, encoder=real)
    np.testing.assert_allclose(np.load(out / "embeddings.npy"), np.load(tmp_path / "whole" / "embeddings.npy"), atol=1e-6)


_TERMINATED_RUN = textwrap.dedent(
    """
    import sys, time
    import polars as pl
    from clipengine.config import EncodeConfig, ModelConfig
    from clipengine.encode.encoders import create_encoder
    from clipengine.encode.stage import encode_items
    from clipengine.errors import Terminated
    from clipengine.interrupts import stop_on_sigterm

    model, weights, listing, out = sys.argv[1:5]
    config = EncodeConfig(model=ModelConfig(model=model, weights=weights), backend="torch", device="cpu",
                          precision="fp32", batch_size=2, shard_size=1000, shard_seconds=3600.0, workers=1,
                          progress=False)
    real = create_encoder(config)

    class Slow:
        image_size, embed_dim, model_record = real.image_size, real.embed_dim, real.model_record

        def encode_images(self, images):
            rows = real.encode_images(images)
            print("BATCH", flush=True)
            time.sleep(0.3)
            return rows

    stop_on_sigterm()
    try:
        encode_items(pl.DataFrame({"path": open(listing).read().split()}), out, config, encoder=Slow())
    except Terminated:
        print("TERMINATED", flush=True)
    """
)


def test_sigterm_through_the_cli_handler_keeps_what_was_encoded(tiny_clip, sample_photos, tmp_path):
    """The CLI's SIGTERM handler turns a scheduler's stop into an interrupt: no shard was due (one per
    hour), yet the batches encoded before the signal are on disk and the rerun reuses them."""
    from clipengine.encode.stage import encode_items

    paths = _numbered_photos(sample_photos, tmp_path / "many", 40)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(paths))
    out = tmp_path / "terminated"
    process = subprocess.Popen(
        [sys.executable, "-c", _TERMINATED_RUN, str(tiny_clip.config_path), str(tiny_clip.weights_path), str(listing),
         str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "CLIPENGINE_NUM_THREADS": "1"},
    )
    batches = 0
    while batches < 3:
        line = process.stdout.readline()
        assert line, process.stderr.read()
        batches += line.strip() == "BATCH"
    process.send_signal(signal.SIGTERM)
    rest, errors = process.communicate(timeout=60)
    assert process.returncode == 0 and "TERMINATED" in rest, errors
    assert len(list((out / "shards").glob("shard-*.npz"))) == 1

    resumed = encode_items(pl.DataFrame({"path": paths}), out, _config(tiny_clip, batch_size=2))
    # the third batch printed before its pause, so the first two had returned: at least their 4 rows
    assert resumed.reused >= 4 and resumed.reused + resumed.newly_encoded == 40


def test_half_finished_outputs_are_not_trusted(tiny_clip, sample_photos, tmp_path):
    from clipengine.encode.stage import encode_items

    out = tmp_path / "emb"
    items = pl.DataFrame({"path": [str(p) for p in sample_photos[:2]]})
    encode_items(items, out, _config(tiny_clip))
    # a kill between embeddings.npy and items.parquet of a later run leaves a mismatched pair
    np.save(out / "embeddings.npy", np.zeros((2, 32), np.float32))
    again = encode_items(items, out, _config(tiny_clip))
    assert again.newly_encoded == 2 and np.abs(np.load(out / "embeddings.npy")).sum() > 0


def test_bad_items_are_named(tiny_clip, tmp_path):
    from clipengine.encode.stage import encode_items
    from clipengine.errors import ClipengineError

    with pytest.raises(ClipengineError, match="duplicate"):
        encode_items(pl.DataFrame({"path": ["a.jpg", "a.jpg"]}), tmp_path / "x", _config(tiny_clip))
    with pytest.raises(ClipengineError, match="'path' column"):
        encode_items(pl.DataFrame({"file": ["a.jpg"]}), tmp_path / "x", _config(tiny_clip))


def test_file_column_and_float16_output(tiny_clip, sample_photos, tmp_path):
    from clipengine.encode.stage import encode_items

    items = pl.DataFrame({"path": ["item-a", "item-b"], "file": [str(sample_photos[0]), str(sample_photos[1])],
                          "label": [3, 4]})
    result = encode_items(items, tmp_path / "emb", _config(tiny_clip, output_dtype="float16"))
    assert result.encoded == 2
    embeddings = np.load(tmp_path / "emb" / "embeddings.npy")
    assert embeddings.dtype == np.float16 and embeddings.shape == (2, 32)
    assert pl.read_parquet(tmp_path / "emb" / "items.parquet").equals(items)
    by_path = encode_items(pl.DataFrame({"path": [str(sample_photos[0])]}), tmp_path / "emb2", _config(tiny_clip))
    np.testing.assert_allclose(embeddings[0], np.load(by_path.out_dir / "embeddings.npy")[0], atol=2e-3)
