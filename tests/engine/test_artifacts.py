"""The run directory's contract: one writer and one reader per artifact, behaving as documented."""

from __future__ import annotations

import json
import multiprocessing
import os

import numpy as np
import polars as pl
import pytest

from clipengine import artifacts
from clipengine.errors import ClipengineError


def _items(n: int, tmp_path, *, boxes: bool = False) -> pl.DataFrame:
    files = []
    for i in range(n):
        path = tmp_path / f"img{i}.jpg"
        path.write_bytes(b"x" * (i + 1))
        files.append(str(path))
    frame = pl.DataFrame({"path": files})
    if boxes:
        frame = frame.with_columns(pl.Series("box", [[0.0, 0.0, 1.0 + i, 2.0] for i in range(n)],
                                             dtype=pl.List(pl.Float64)))
    return frame


def _record(dim: int = 4) -> dict:
    return {"model_id": "m1", "precision": "fp32", "embed_dim": dim, "image_size": 8}


def test_write_encoded_streams_blocks_in_order_and_read_finished_takes_them_back(tmp_path):
    items = _items(7, tmp_path)
    keys = artifacts.check_items(items)
    stats = artifacts.file_stats(artifacts.item_files(items))
    rows = np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32)
    encoded = [0, 1, 3, 4, 6]
    blocks = [rows[[0, 1]], rows[[3]], rows[[4, 6]]]
    digest = artifacts.write_encoded(tmp_path / "out", items, encoded=encoded, blocks=iter(blocks),
                                     skipped=[(5, "corrupt: x"), (2, "missing file")], stats=stats,
                                     record=_record(), dtype="float32")
    out = tmp_path / "out"
    np.testing.assert_array_equal(np.load(out / artifacts.EMBEDDINGS), rows[encoded])
    assert pl.read_parquet(out / artifacts.ITEMS)["path"].to_list() == [items["path"][i] for i in encoded]
    skipped = pl.read_parquet(out / artifacts.SKIPPED)
    assert skipped["path"].to_list() == [items["path"][2], items["path"][5]]  # by position
    assert skipped["reason"].to_list() == ["missing file", "corrupt: x"]
    model = json.loads((out / artifacts.MODEL).read_text())
    assert (model["n_items"], model["n_skipped"]) == (5, 2)
    assert artifacts.read_parquet_metadata(out / artifacts.ITEMS)[artifacts.META_EMBEDDINGS_SHA256] == digest

    finished = artifacts.read_finished(out, artifacts.identity_of(_record()), keys, stats)
    assert sorted(finished.rows) == sorted(keys[i] for i in encoded)
    for key, row in finished.rows.items():
        np.testing.assert_array_equal(finished.embeddings[row], rows[keys.index(key)])


def test_read_finished_trusts_nothing_that_does_not_match(tmp_path):
    items = _items(3, tmp_path)
    keys = artifacts.check_items(items)
    stats = artifacts.file_stats(artifacts.item_files(items))
    out = tmp_path / "out"
    rows = np.ones((3, 4), np.float32)
    artifacts.write_encoded(out, items, encoded=[0, 1, 2], blocks=[rows], skipped=[], stats=stats,
                            record=_record(), dtype="float32")
    identity = artifacts.identity_of(_record())
    assert len(artifacts.read_finished(out, identity, keys, stats).rows) == 3
    # another model
    assert artifacts.read_finished(out, {**identity, "model_id": "m2"}, keys, stats).rows == {}
    # a file rewritten since: only its row is dropped
    changed = stats.copy()
    changed[1, 1] += 1
    assert sorted(artifacts.read_finished(out, identity, keys, changed).rows) == [keys[0], keys[2]]
    # embeddings.npy replaced behind items.parquet's back (an interrupted finalization)
    np.save(out / artifacts.EMBEDDINGS, np.zeros((3, 4), np.float32))
    assert artifacts.read_finished(out, identity, keys, stats).rows == {}


def test_read_finished_without_item_stats_is_not_trusted(tmp_path):
    items = _items(2, tmp_path)
    keys = artifacts.check_items(items)
    stats = artifacts.file_stats(artifacts.item_files(items))
    out = tmp_path / "out"
    artifacts.write_encoded(out, items, encoded=[0, 1], blocks=[np.ones((2, 4), np.float32)], skipped=[],
                            stats=stats, record=_record(), dtype="float32")
    (out / artifacts.ITEM_STATS).unlink()
    assert artifacts.read_finished(out, artifacts.identity_of(_record()), keys, stats).rows == {}


def test_write_encoded_refuses_a_short_row_stream(tmp_path):
    items = _items(3, tmp_path)
    with pytest.raises(RuntimeError, match="got 2 rows for 3"):
        artifacts.write_encoded(tmp_path / "out", items, encoded=[0, 1, 2], blocks=[np.ones((2, 4), np.float32)],
                                skipped=[], stats=artifacts.file_stats(artifacts.item_files(items)),
                                record=_record(), dtype="float32")
    assert not (tmp_path / "out" / artifacts.ITEMS).exists()


def test_item_keys_tell_boxes_apart_and_duplicates_are_refused(tmp_path):
    items = _items(2, tmp_path, boxes=True)
    keys = artifacts.check_items(items)
    assert keys[0] != keys[1] and "\t" in keys[0]
    doubled = pl.concat([items, items.head(1)])
    with pytest.raises(ClipengineError, match="1 duplicate items"):
        artifacts.check_items(doubled)


def test_read_joined_renames_clashing_dataset_columns_and_keeps_metadata_order(tmp_path):
    labels = pl.DataFrame({"path": ["b", "a", "c"], "weather": ["fog", "rain", "fog"], "weather_prob": [0.9, 0.8, 0.7],
                           "weather_margin": [0.5, 0.4, 0.3]})
    errors = pl.DataFrame({"path": ["a", "b"], "error": [1.0, 0.0], "weather": ["x", "y"], "height": [3, 4],
                           "true_weather": ["rain", "fog"]})
    from clipengine.bindings.files import write_parquet

    write_parquet(tmp_path / artifacts.METADATA, labels)
    artifacts.write_errors(tmp_path, errors)
    frame, attributes, extra = artifacts.read_joined(tmp_path)
    assert frame["path"].to_list() == ["b", "a"]
    assert attributes == ["weather"]
    assert extra == ["given_weather", "height"]
    assert frame["given_weather"].to_list() == ["y", "x"]
    assert artifacts.joined_features(attributes, ["weather", "height"]) == ["weather", "given_weather", "height"]


def test_slices_of_an_older_format_are_refused_with_one_line(tmp_path):
    (tmp_path / artifacts.SLICES_JSON).write_text(json.dumps({"n_rows": 3, "slices": []}))
    with pytest.raises(ClipengineError, match="earlier clipengine.*run `clipengine run`"):
        artifacts.read_slices(tmp_path)
    artifacts.write_slices(tmp_path, pl.DataFrame({"rank": [1]}), {"n_rows": 3}, [{"predicates": {"a": "x"}}])
    summary, records = artifacts.read_slices(tmp_path)
    assert summary["format"] == artifacts.SLICES_FORMAT and records == [{"predicates": {"a": "x"}}]


def _hold_lock(run_dir, ready, release):
    with artifacts.locked(run_dir):
        ready.set()
        release.wait(30)


def test_a_second_writer_is_told_who_holds_the_run_directory(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(ClipengineError, match=rf"in use by clipengine pid {holder.pid}"):
            with artifacts.locked(tmp_path):
                pass
    finally:
        release.set()
        holder.join(30)
    with artifacts.locked(tmp_path):  # released with the process
        assert (tmp_path / artifacts.LOCK).read_text() == f"clipengine pid {os.getpid()}"
