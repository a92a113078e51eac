"""search against brute force over the stored embeddings, through the real text tower."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest

from clipengine.annotate.search import search, search_embeddings
from clipengine.errors import ClipengineError


@pytest.fixture(scope="module")
def emb_dir(tiny_clip, sample_photos, tmp_path_factory):
    from clipengine.config import EncodeConfig
    from clipengine.encode.stage import encode_items

    out = tmp_path_factory.mktemp("emb-search")
    paths = [str(p) for p in sample_photos]
    # whole images plus two crops each: 15 items with boxes (null = whole image)
    items = pl.DataFrame(
        {"path": paths * 3, "box": [None] * 5 + [[0.0, 0.0, 20.0, 20.0]] * 5 + [[10.0, 5.0, 60.0, 50.0]] * 5},
        schema={"path": pl.String, "box": pl.List(pl.Float64)},
    )
    encode_items(items, out, EncodeConfig(model=tiny_clip.model_config, device="cpu", backend="torch", precision="fp32",
                                          progress=False, workers=1))
    return out


def test_search_equals_brute_force(tiny_clip, emb_dir):
    import open_clip
    import torch

    queries = ["a child holding an umbrella", "an astronaut", "a cup of coffee"]
    frame = search(emb_dir, queries, k=7, device="cpu")
    assert frame.columns == ["query", "rank", "path", "box", "score", "row"]
    assert frame.height == 21
    model = tiny_clip.build_reference()
    with torch.no_grad():
        text = torch.nn.functional.normalize(model.encode_text(open_clip.tokenize(queries)), dim=-1).numpy()
    embeddings = np.load(emb_dir / "embeddings.npy")
    items = pl.read_parquet(emb_dir / "items.parquet")
    for q, query in enumerate(queries):
        scores = embeddings @ text[q]
        order = np.argsort(-scores, kind="stable")[:7]
        hits = frame.filter(pl.col("query") == query)
        assert hits["rank"].to_list() == list(range(1, 8))
        assert hits["row"].to_list() == order.tolist()
        assert hits["path"].to_list() == items["path"][order].to_list()
        np.testing.assert_allclose(hits["score"].to_numpy(), scores[order], atol=1e-5)


def test_search_embeddings_chunked_equals_unchunked():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1000, 8)).astype(np.float32)
    items = pl.DataFrame({"path": [f"img{i}.jpg" for i in range(1000)]})
    q = rng.standard_normal((2, 8)).astype(np.float32)
    a = search_embeddings(emb, items, ["x", "y"], q, 5, chunk_rows=17)
    b = search_embeddings(emb, items, ["x", "y"], q, 5, chunk_rows=100_000)
    assert a.equals(b) and a.columns == ["query", "rank", "path", "score", "row"]


def test_bad_queries(emb_dir):
    with pytest.raises(ClipengineError, match="non-empty"):
        search(emb_dir, ["  "], device="cpu")
    with pytest.raises(ClipengineError, match="-k must be"):
        search(emb_dir, "x", k=0, device="cpu")


def test_cli_search_json(emb_dir, capsys, tmp_path):
    from clipengine.cli import main

    with pytest.raises(SystemExit) as code:
        main(["search", str(emb_dir), "an astronaut", "-k", "3", "--json", "--device", "cpu"])
    assert code.value.code == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in records] == [1, 2, 3]
    assert records[0]["score"] >= records[1]["score"] >= records[2]["score"]
    with pytest.raises(SystemExit) as code:
        main(["search", str(emb_dir), "an astronaut", "-k", "2", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "an astronaut" and len(lines) == 3
    own_dir = shutil.copytree(emb_dir, tmp_path / "emb")  # the module's emb_dir stays without an index
    with pytest.raises(SystemExit) as code:
        main(["search", str(own_dir), "an astronaut", "-k", "3", "--json", "--device", "cpu", "--index", "int8"])
    assert code.value.code == 0 and (own_dir / "search_index" / "index.json").is_file()
    screened = json.loads(capsys.readouterr().out)
    assert [r["row"] for r in screened] == [r["row"] for r in records]
    np.testing.assert_allclose([r["score"] for r in screened], [r["score"] for r in records], atol=1e-6)


def test_search_through_the_int8_index_equals_brute_force(tiny_clip, emb_dir):
    queries = ["a child holding an umbrella", "an astronaut"]
    plain = search(emb_dir, queries, k=7, device="cpu", index="none")
    assert not (emb_dir / "search_index").exists()
    screened = search(emb_dir, queries, k=7, device="cpu", index="int8", progress=False)
    assert (emb_dir / "search_index" / "index.json").is_file()
    assert screened.columns == plain.columns
    assert screened["row"].to_list() == plain["row"].to_list()
    assert screened["path"].to_list() == plain["path"].to_list()
    np.testing.assert_allclose(screened["score"].to_numpy(), plain["score"].to_numpy(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ClipengineError, match="index must be"):
        search(emb_dir, "x", index="fast", device="cpu")


def test_choose_path_keeps_the_float32_rows_on_the_gpu_unless_int8_is_asked():
    from clipengine.annotate.search import INDEX_MIN_ROWS, choose_path

    assert choose_path(INDEX_MIN_ROWS, "cpu") == "int8"
    assert choose_path(INDEX_MIN_ROWS - 1, "cpu") == "float32"
    assert choose_path(10 * INDEX_MIN_ROWS, "cuda") == "float32"
    assert choose_path(10 * INDEX_MIN_ROWS, "cuda:1") == "float32"
    assert choose_path(5, "cuda", "int8") == "int8" and choose_path(5, "cpu", "int8") == "int8"
    assert choose_path(10 * INDEX_MIN_ROWS, "cpu", "none") == "float32"
    assert choose_path(0, "cpu", "int8") == "float32"
