import json
import os

import numpy as np
import polars as pl
import pytest

from clipengine.bindings import files


def test_write_json_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "manifest.json"
    files.write_json(target, {"a": 1})
    files.write_json(target, {"b": [1, 2]})
    assert json.loads(target.read_text()) == {"b": [1, 2]}
    assert [p.name for p in target.parent.iterdir()] == ["manifest.json"]


def test_failed_write_keeps_previous_content(tmp_path):
    target = tmp_path / "data.txt"
    files.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["data.txt"]


def test_save_npy_keeps_exact_name(tmp_path):
    target = tmp_path / "embeddings.npy.part"
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    files.save_npy(target, array)
    np.testing.assert_array_equal(np.load(target), array)


def test_parquet_metadata_round_trip(tmp_path):
    target = tmp_path / "metadata.parquet"
    frame = pl.DataFrame({"path": ["a", "b"], "x": [1, 2]})
    files.write_parquet(target, frame, metadata={"clipengine.schema_hash": "abc"})
    assert pl.read_parquet(target).equals(frame)
    assert files.read_parquet_metadata(target) == {"clipengine.schema_hash": "abc"}


def test_written_files_have_the_permissions_open_would_give(tmp_path):
    target = tmp_path / "report.html"
    files.write_text(target, "<html></html>")
    with open(tmp_path / "plain.html", "w") as handle:
        handle.write("<html></html>")
    assert (target.stat().st_mode & 0o777) == ((tmp_path / "plain.html").stat().st_mode & 0o777)
