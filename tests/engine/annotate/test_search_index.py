"""The int8 search index beside embeddings.npy: built once, memory-mapped, rebuilt when stale."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from clipengine.annotate import search_index
from clipengine.annotate.search import INDEX_MIN_ROWS, choose_path, search_embeddings
from clipengine.annotate.search_index import open_search_index
from clipengine.artifacts import SEARCH_INDEX_DIR
from clipengine.errors import ClipengineError
from clipengine.kernels.quantized import quantize_rows


def write_embeddings(folder, seed, n=2000, dim=32):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    np.save(folder / "embeddings.npy", emb)
    return np.load(folder / "embeddings.npy", mmap_mode="r")


def test_built_once_then_memory_mapped(tmp_path, capsys):
    emb = write_embeddings(tmp_path, 0)
    index = open_search_index(tmp_path, emb, progress=True)
    assert "building the int8 search index (once)" in capsys.readouterr().err
    for name in ("codes.npy", "scales.npy", "residuals.npy", "index.json"):
        assert (tmp_path / SEARCH_INDEX_DIR / name).is_file()
    assert isinstance(index.codes, np.memmap) and index.codes.shape == (2000, 32)
    fresh = quantize_rows(np.asarray(emb))
    np.testing.assert_array_equal(index.codes, fresh.codes)
    np.testing.assert_array_equal(index.residuals, fresh.residuals)
    assert index.max_norm == fresh.max_norm
    record = tmp_path / SEARCH_INDEX_DIR / "index.json"
    before = record.stat().st_mtime_ns
    again = open_search_index(tmp_path, emb, progress=True)
    assert record.stat().st_mtime_ns == before and "building" not in capsys.readouterr().err
    np.testing.assert_array_equal(again.scales, index.scales)
    assert not [p for p in (tmp_path / SEARCH_INDEX_DIR).iterdir() if p.name.endswith(".tmp")]


def test_stale_index_is_rebuilt_never_used(tmp_path):
    emb = write_embeddings(tmp_path, 0)
    open_search_index(tmp_path, emb, progress=False)
    emb = write_embeddings(tmp_path, 1)  # new content, same shape
    index = open_search_index(tmp_path, emb, progress=False)
    np.testing.assert_array_equal(index.codes, quantize_rows(np.asarray(emb)).codes)
    key = json.loads((tmp_path / SEARCH_INDEX_DIR / "index.json").read_text())["key"]
    assert key == search_index.index_key(tmp_path / "embeddings.npy", emb)


@pytest.mark.parametrize("damage", ["record", "codes", "format"])
def test_damaged_index_is_rebuilt(tmp_path, damage):
    emb = write_embeddings(tmp_path, 2)
    open_search_index(tmp_path, emb, progress=False)
    folder = tmp_path / SEARCH_INDEX_DIR
    if damage == "record":
        (folder / "index.json").write_text("{not json")
    elif damage == "codes":
        np.save(folder / "codes.npy", np.zeros((5, 32), np.int8))
    else:
        record = json.loads((folder / "index.json").read_text())
        record["format"] = -1
        (folder / "index.json").write_text(json.dumps(record))
    key = search_index.index_key(tmp_path / "embeddings.npy", emb)
    assert search_index.load_search_index(folder, key) is None
    index = open_search_index(tmp_path, emb, progress=False)
    np.testing.assert_array_equal(index.codes, quantize_rows(np.asarray(emb)).codes)


def test_unwritable_folder_falls_back(tmp_path, monkeypatch, capsys):
    emb = write_embeddings(tmp_path, 3)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(search_index, "build_search_index", refuse)
    assert open_search_index(tmp_path, emb) is None
    assert "cannot write the search index" in capsys.readouterr().err


def test_read_only_folder_keeps_its_index_in_the_cache_dir(tmp_path, monkeypatch):
    emb = write_embeddings(tmp_path, 5)
    build = search_index.build_search_index

    def refuse_the_data_folder(folder, *args, **kwargs):
        if Path(folder) == tmp_path / SEARCH_INDEX_DIR:
            raise PermissionError(13, "Permission denied")
        return build(folder, *args, **kwargs)

    monkeypatch.setattr(search_index, "build_search_index", refuse_the_data_folder)
    index = open_search_index(tmp_path, emb, progress=False)
    cached = search_index.index_folders(tmp_path)[1]
    assert index is not None and (cached / "index.json").is_file()
    assert not (tmp_path / SEARCH_INDEX_DIR / "index.json").exists()
    np.testing.assert_array_equal(index.codes, quantize_rows(np.asarray(emb)).codes)
    monkeypatch.setattr(search_index, "build_search_index", None)  # the second open only reads
    assert open_search_index(tmp_path, emb, progress=False) is not None


def test_non_finite_rows_are_a_clear_error(tmp_path):
    emb = np.ones((10, 4), np.float32)
    emb[7, 2] = np.nan
    np.save(tmp_path / "embeddings.npy", emb)
    with pytest.raises(ClipengineError, match=r"embeddings.npy: embeddings rows 0..9 hold NaN"):
        open_search_index(tmp_path, np.load(tmp_path / "embeddings.npy", mmap_mode="r"), progress=False)
    assert not (tmp_path / SEARCH_INDEX_DIR / "index.json").exists()
    assert not [p for p in (tmp_path / SEARCH_INDEX_DIR).iterdir() if p.name.endswith(".tmp")]


def test_search_embeddings_int8_equals_float32(tmp_path):
    emb = write_embeddings(tmp_path, 4, n=5000, dim=48)
    items = pl.DataFrame({"path": [f"img{i}.jpg" for i in range(5000)]})
    rng = np.random.default_rng(5)
    queries = rng.standard_normal((3, 48)).astype(np.float32)
    index = open_search_index(tmp_path, emb, progress=False)
    a = search_embeddings(emb, items, ["x", "y", "z"], queries, 10, quantized=index)
    b = search_embeddings(emb, items, ["x", "y", "z"], queries, 10)
    assert a.columns == b.columns and a["row"].to_list() == b["row"].to_list()
    assert a["path"].to_list() == b["path"].to_list()
    np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), rtol=1e-6, atol=1e-6)


def test_choose_path():
    assert choose_path(INDEX_MIN_ROWS, "cpu") == "int8"
    assert choose_path(INDEX_MIN_ROWS - 1, "cpu") == "float32"
    assert choose_path(10, "cpu", "int8") == "int8"
    assert choose_path(10**7, "cuda") == "float32"
    assert choose_path(10**7, "cpu", "none") == "float32"
    assert choose_path(0, "cpu", "int8") == "float32"
    assert os.sep not in SEARCH_INDEX_DIR
