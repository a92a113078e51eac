"""What clipengine refuses, tried as a careless user or an attacker would: real files, real processes."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest

from clipengine import artifacts
from clipengine.config import DatasetConfig
from clipengine.errors import ClipengineError

from tests.engine.run.test_run import make_config, make_photo_folder
from tests.filesystem import remove_tree


def _clipengine(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipengine", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_a_second_encode_on_one_folder_is_told_it_is_in_use(tmp_path, tiny_clip):
    photos = make_photo_folder(tmp_path, n=4)
    out = tmp_path / "emb"
    with artifacts.locked(out):  # a writer already at work on the folder (this test process)
        done = _clipengine("encode", photos, "--out", out, "--model", tiny_clip.config_path, "--weights",
                           tiny_clip.weights_path, "--quiet")
    assert done.returncode == 2
    import os

    assert done.stderr.strip().splitlines() == [
        f"clipengine: error: {out} is in use by clipengine pid {os.getpid()}; wait for it to finish"]
    assert not (out / artifacts.ITEMS).exists()


@pytest.mark.parametrize("command", ["annotate", "report"])
def test_other_writers_take_the_lock_too(tmp_path, command):
    folder = tmp_path / "run"
    folder.mkdir()
    with artifacts.locked(folder):
        done = _clipengine(command, folder, timeout=120)
    assert done.returncode == 2 and "is in use by clipengine pid" in done.stderr, done.stderr


def test_a_run_never_writes_over_the_user_s_errors_table(tmp_path, tiny_clip):
    photos = make_photo_folder(tmp_path, n=6)
    table = pl.read_csv(photos / "errors.csv")
    user_file = photos / artifacts.ERRORS
    table.write_parquet(user_file)
    before = user_file.read_bytes()
    config = make_config(tmp_path, tiny_clip, data=photos)
    config = replace(config, out=photos, data=DatasetConfig(errors=user_file))
    from clipengine.run.job import run_job

    with pytest.raises(ClipengineError, match=rf"{photos} holds your input {user_file}, which this run would "
                                              r"overwrite.*give another output folder"):
        run_job(config)
    assert user_file.read_bytes() == before
    assert not (photos / artifacts.MANIFEST).exists()


def test_encode_never_writes_over_a_boxes_table_in_its_output_folder(tmp_path):
    out = tmp_path / "emb"
    out.mkdir()
    boxes = out / artifacts.ITEMS
    pl.DataFrame({"path": ["a.jpg"], "x0": [0], "y0": [0], "x1": [1], "y1": [1]}).write_parquet(boxes)
    (tmp_path / "a.jpg").write_bytes(b"x")
    done = _clipengine("encode", tmp_path / "a.jpg", "--out", out, "--boxes", boxes, "--model", "conse", timeout=120)
    assert done.returncode == 2 and "holds your input" in done.stderr, done.stderr


# ---- shared: a finished run with hostile data, and read-only storage ------------------------------
HOSTILE_CLASSES = ("<b>round</b>", "square|x")
SHAPES_SCHEMA = """name: shapes
attributes:
  shape:
    classes:
      "<b>round</b>": {prompts: ["a photo of a round thing"]}
      "square|x": {prompts: ["a photo of a square thing"]}
"""
SPECIAL = {"inf": float("inf"), "-inf": float("-inf")}


def _hostile_folder(root: Path) -> Path:
    """24 images; errors.csv with a numeric feature holding ±inf (those rows all fail) and a
    ground-truth column whose classes carry Markdown/HTML."""
    import numpy as np
    from PIL import Image

    photos = root / "photos"
    photos.mkdir(parents=True)
    rng = np.random.default_rng(5)
    rows = []
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(photos / f"img{i:02d}.png")
        speed = "inf" if i % 8 == 0 else "-inf" if i % 8 == 4 else f"{i * 1.5}"
        rows.append(f'img{i:02d}.png,{int(i % 4 == 0 or i == 7)},{speed},"{HOSTILE_CLASSES[i % 2]}"')
    (photos / "errors.csv").write_text("path,error,speed,true_shape\n" + "\n".join(rows) + "\n")
    return photos


def _run_args(photos: Path, out: Path, schema: Path, tiny_clip, *extra) -> list:
    return ["run", "--dataset", "folder", "--root", photos, "--out", out, "--schema", schema,
            "--model", tiny_clip.config_path, "--weights", tiny_clip.weights_path, "--backend", "torch",
            "--device", "cpu", "--precision", "fp32", "--min-sup", "2", "--quiet", *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_clip):
    """(photos, run folder, schema file) of one finished ``clipengine run`` of the hostile folder."""
    tmp = tmp_path_factory.mktemp("finished")
    photos = _hostile_folder(tmp)
    schema = tmp / "shapes.yaml"
    schema.write_text(SHAPES_SCHEMA)
    done = _clipengine(*_run_args(photos, tmp / "run", schema, tiny_clip), timeout=600)
    assert done.returncode == 0, done.stderr
    return photos, tmp / "run", schema


def _on_read_only(folder: Path, *args, timeout=300) -> subprocess.CompletedProcess:
    """``clipengine *args`` with ``folder`` on read-only storage: a read-only bind mount in a private
    mount namespace when run as root (chmod does not stop root), else the write permission removed."""
    import os
    import shutil

    command = [sys.executable, "-m", "clipengine", *map(str, args)]
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for path in modes:
            path.chmod(modes[path] & ~0o222)
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a folder read-only as root")
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" || exit 97; shift; exec "$@"'
    done = subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", str(folder), *command],
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode == 97 or "unshare:" in done.stderr:
        pytest.skip(f"cannot mount a folder read-only here: {done.stderr.strip()[:200]}")
    return done


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("clipengine: error:"), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


# ---- 5: image formats ---------------------------------------------------------------------------
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n%%EOF\n"


def test_a_postscript_file_named_jpg_never_reaches_ghostscript(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    from clipengine.encode.decode import SkippedImage, load_image
    from clipengine.encode.geometry import ImageSpec

    marker = tmp_path / "ghostscript-ran"
    fake_gs = tmp_path / "gs"
    fake_gs.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake_gs.chmod(0o755)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", str(fake_gs))  # Pillow would run this to render EPS
    (tmp_path / "photo.jpg").write_bytes(EPS)
    with pytest.raises(SkippedImage) as skip:
        load_image(tmp_path / "photo.jpg", None, ImageSpec(32))
    assert skip.value.reason.startswith("not an image")
    assert not marker.exists()


@pytest.mark.parametrize("fmt,mode,name", [
    ("JPEG", "RGB", "a.jpg"), ("PNG", "RGBA", "a.png"), ("WEBP", "RGB", "a.webp"), ("BMP", "RGB", "a.bmp"),
    ("TIFF", "RGB", "a.tif"), ("GIF", "P", "a.gif"), ("PPM", "RGB", "a.ppm"), ("PPM", "L", "a.pgm"),
    ("PPM", "1", "a.pbm"), ("PNG", "RGB", "misnamed.jpg"),  # by content, not by name
])
def test_the_formats_an_image_pipeline_needs_are_read(tmp_path, fmt, mode, name):
    import numpy as np
    from PIL import Image

    from clipengine.encode.decode import load_image
    from clipengine.encode.geometry import ImageSpec

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).convert(mode)
    image.save(tmp_path / name, format=fmt)
    assert load_image(tmp_path / name, None, ImageSpec(32)).shape == (32, 32, 3)


@pytest.mark.parametrize("fmt", ["ICO", "PCX", "TGA", "DDS"])
def test_other_formats_pillow_knows_are_not_images_here(tmp_path, fmt):
    import numpy as np
    from PIL import Image

    from clipengine.encode.decode import SkippedImage, load_image
    from clipengine.encode.geometry import ImageSpec

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "x.png", format=fmt)
    with Image.open(tmp_path / "x.png") as opened:  # Pillow itself would read it
        assert opened.format == fmt
    with pytest.raises(SkippedImage, match="^not an image"):
        load_image(tmp_path / "x.png", None, ImageSpec(32))


# ---- 6: bounded YAML --------------------------------------------------------------------------
def _laughs(levels: int = 8, width: int = 10) -> str:
    """Nested aliases: a few hundred bytes standing for width**levels nodes."""
    lines = ["l0: &l0 [" + ", ".join(["ha"] * width) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text,message", [
    (_laughs(), r"key 'l5' expands to 1,111,111 YAML nodes .* at most 250,000"),
    ("a: &a [1, *a]\n", "an alias refers to the anchor that contains it"),
    ("[" * 500 + "]" * 500, "nested more than 64 levels deep"),
    ("a: &a " + "[" * 40 + "1" + "]" * 40 + "\nb: " + "[" * 40 + "*a" + "]" * 40 + "\n", "nests more than 64 levels"),
    ("a: &a {x: 1, y: 2}\n" + "".join(f"m{i}: &m{i} {{<<: [" + ", ".join([f"*{'a' if i == 0 else f'm{i - 1}'}"] * 9)
                                      + "]}\n" for i in range(7)), "YAML nodes once its aliases are repeated"),
    ("a: 1\nb: 2\na: 3\n", "line 3: duplicate key 'a'"),
])
def test_yaml_past_a_bound_is_refused_at_once_in_one_line(text, message):
    import time

    from clipengine.yamlfile import parse_yaml

    started = time.perf_counter()
    with pytest.raises(ClipengineError, match=message) as error:
        parse_yaml(text, source="bad.yaml")
    assert str(error.value).startswith("bad.yaml: ") and "\n" not in str(error.value)
    assert time.perf_counter() - started < 5


def test_yaml_within_bounds_is_plain_data():
    from clipengine.yamlfile import parse_yaml

    assert parse_yaml("base: &b {x: 1}\nuse: {<<: *b, y: [*b, *b]}\n", source="ok") == {
        "base": {"x": 1}, "use": {"x": 1, "y": [{"x": 1}, {"x": 1}]}}
    with pytest.raises(ClipengineError, match="not valid YAML"):
        parse_yaml("a: !!python/object/apply:os.system ['true']\n", source="code.yaml")


def test_a_schema_of_nested_aliases_fails_fast_naming_its_key(tmp_path):
    from clipengine.annotate.schemas import load_schema

    text = _laughs(7) + "attributes:\n  hair:\n    templates: ['a photo of {}']\n    classes:\n      a: *l6\n      b: [x]\n"
    (tmp_path / "bomb.yaml").write_text(text)
    with pytest.raises(ClipengineError, match=r"bomb.yaml: line 6: key 'l5' expands to 1,111,111 YAML nodes"):
        load_schema(tmp_path / "bomb.yaml")


def test_the_expanded_prompts_of_a_schema_are_bounded_before_they_are_built():
    from clipengine.annotate.schemas import MAX_PROMPTS, parse_schema

    templates = [f"a photo {i} of {{}}" for i in range(400)]
    fills = [f"thing{i}" for i in range(MAX_PROMPTS // 400 + 1)]
    text = ("attributes:\n  shape:\n    templates: [" + ", ".join(f"'{t}'" for t in templates) + "]\n"
            "    classes:\n      round: [" + ", ".join(fills) + "]\n      square: [box]\n")
    assert len(text) < 12_000  # an 11 KB file
    with pytest.raises(ClipengineError, match=rf"attribute 'shape', class 'round': {len(templates) * len(fills):,} "
                                              rf"prompts \(400 templates × {len(fills)} fill-ins \+ 0 written out\) take "
                                              rf"the schema past {MAX_PROMPTS:,} prompts"):
        parse_schema(text, source="big.yaml")
    with pytest.raises(ClipengineError, match="'shape', class 'round': a prompt of 5,000 characters"):
        parse_schema("attributes:\n  shape:\n    classes:\n      round: {prompts: ['" + "x" * 5000 + "']}\n"
                     "      square: {prompts: [box]}\n", source="long.yaml")


def test_run_config_of_nested_aliases_is_one_line(tmp_path):
    # the anchors inside a real option: `classes` is joined into one string, 10**7 "ha" long
    laughs = "\n".join("  - " + line.split(": ", 1)[1] for line in _laughs(7).splitlines())
    (tmp_path / "job.yaml").write_text("dataset: carla\nclasses:\n" + laughs + "\n")
    done = _clipengine("run", "--config", tmp_path / "job.yaml", timeout=120)
    assert done.returncode == 2
    assert "job.yaml: line 8: key 'classes' → item 6 expands to 1,111,111 YAML nodes" in _one_error_line(done)


# ---- 7: schema names and the cache --------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../../escaped", "/etc/x", "a/b"])
def test_a_schema_name_never_reaches_a_cache_path(name):
    import os

    from clipengine import envs
    from clipengine.annotate.class_embeddings import cache_path
    from clipengine.annotate.schemas import parse_schema

    schema = parse_schema(f"name: '{name}'\nattributes:\n  a: {{classes: {{x: {{prompts: [p]}}, y: {{prompts: [q]}}}}}}\n")
    assert schema.name == name  # a display name, kept as written
    for model_id in ("tiny-123", "..", "../x", "a/../../b"):
        path = cache_path(model_id, schema)
        root = os.path.realpath(envs.cache_dir() / "class-embeddings")
        assert os.path.realpath(path).startswith(root + os.sep) and os.path.realpath(path.parent) != root
        assert name.strip("./") not in str(path)


def test_a_schema_name_with_a_nul_is_one_line():
    from clipengine.annotate.schemas import parse_schema

    with pytest.raises(ClipengineError, match=r"'name' must be one line of at most 200 printable characters"):
        parse_schema('name: "a\\0b"\nattributes:\n  a: {classes: {x: {prompts: [p]}, y: {prompts: [q]}}}\n',
                     source="nul.yaml")


# ---- 8: names that are not UTF-8, deep trees ---------------------------------------------------------
def _deep_folder(root: Path, depth: int) -> Path:
    import os

    from PIL import Image

    folder = root / "deep"
    path = os.fspath(folder)
    for _ in range(depth):  # os.makedirs recurses once per level
        path = os.path.join(path, "d")
        os.mkdir(path) if os.path.isdir(os.path.dirname(path)) else os.makedirs(path)
    Image.new("RGB", (8, 8), "red").save(os.path.join(path, "x.png"))
    return folder


@pytest.fixture
def deep_folder():
    """A folder with an image 1,200 levels down, outside pytest's temporary folders (whose clean-up,
    shutil.rmtree, recurses once per level), removed here without recursion."""
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="clipengine-deep-"))
    try:
        yield _deep_folder(top, 1200)
    finally:
        remove_tree(top)


def test_a_non_utf8_name_and_a_deep_tree_become_skips_not_a_traceback(tmp_path, deep_folder, tiny_clip):
    import os

    from PIL import Image

    from clipengine.encode.inputs import find_image_files

    photos = deep_folder
    Image.new("RGB", (8, 8), "blue").save(photos / "top.png")
    Image.new("RGB", (8, 8), "green").save(os.fsdecode(bytes(photos) + b"/caf\xe9.png"))
    listing = find_image_files(photos)
    assert [Path(f).name for f in listing.files] == ["x.png", "top.png"] and len(Path(listing.files[0]).relative_to(photos).parts) == 1201
    assert listing.left_out == [(str(photos) + "/caf\\xe9.png", "bad file name: not UTF-8")]

    out = tmp_path / "emb"
    done = _clipengine("encode", photos, "--out", out, "--model", tiny_clip.config_path, "--weights",
                       tiny_clip.weights_path, "--quiet")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert pl.read_parquet(out / artifacts.ITEMS).height == 2
    skipped = pl.read_parquet(out / artifacts.SKIPPED)
    assert skipped.select("path", "reason").rows() == [(str(photos) + "/caf\\xe9.png", "bad file name: not UTF-8")]


# ---- 10: ±inf levels as people see them ----------------------------------------------------------
def test_summary_and_report_show_infinite_values_as_their_own_levels(finished_run):
    import re

    _, run, _ = finished_run
    summary = (run / artifacts.SUMMARY).read_text()
    # their own slices of 3 items each: not a bin such as (100.0, inf]
    assert re.search(r"\| speed = -inf \| 3 \|", summary) and re.search(r"\| speed = inf \| 3 \|", summary)
    html = (run / artifacts.REPORT).read_text()
    start = html.index('<tr><th scope="row">-inf</th>')
    rows = re.findall(r'<tr><th scope="row">([^<]*)</th><td class="n">(\d+)</td>', html[start:start + 5000])
    rows = rows[:next(i for i, (label, _) in enumerate(rows) if label == "inf") + 1]
    assert rows[0] == ("-inf", "3") and rows[-1] == ("inf", "3")
    middle = [label for label, _ in rows[1:-1]]
    assert len(middle) >= 2 and all(re.fullmatch(r"[\[(]-?\d[\d.e+-]*, -?\d[\d.e+-]*\]", label) for label in middle)
    assert sum(int(n) for _, n in rows) == 24  # every item in exactly one level


# ---- 11: name clashes, checked before any work --------------------------------------------------------
def test_a_schema_attribute_named_error_is_refused():
    from clipengine.annotate.schemas import parse_schema

    with pytest.raises(ClipengineError, match="attribute 'error': the name collides with a metadata column"):
        parse_schema("attributes:\n  error: {classes: {x: {prompts: [p]}, y: {prompts: [q]}}}\n", source="s.yaml")


def test_given_column_clash_fails_at_start_naming_both(tmp_path, tiny_clip):
    photos = make_photo_folder(tmp_path, n=4)
    table = pl.read_csv(photos / "errors.csv").with_columns(
        pl.col("road").alias("scene"), pl.col("road").alias("given_scene"))  # the schema has `scene`
    table.write_csv(photos / "errors.csv")
    config = make_config(tmp_path, tiny_clip, data=photos)
    from clipengine.run.job import run_job

    with pytest.raises(ClipengineError, match=r"errors.csv: column 'scene' is also an attribute of the schema, so it "
                                              r"would be sliced on as 'given_scene', but the table has a column "
                                              r"'given_scene' too"):
        run_job(config)
    assert not (config.out / artifacts.EMBEDDINGS).exists()  # refused before encoding


def test_the_slices_stage_names_the_clash_too(tmp_path):
    from clipengine.artifacts import joined_features, joined_names

    assert joined_features(["tone"], ["road", "tone", "tone_prob"]) == ["tone", "road", "given_tone", "given_tone_prob"]
    with pytest.raises(ClipengineError, match="'tone_prob' is also a column of the schema's attribute 'tone'"):
        joined_names(["tone"], ["path", "error", "tone_prob", "given_tone_prob"])
    run = tmp_path / "run"
    run.mkdir()
    pl.DataFrame({"path": ["a", "b"], "tone": ["x", "y"], "tone_prob": [0.9, 0.8], "tone_margin": [0.8, 0.6]}
                 ).write_parquet(run / artifacts.METADATA)
    pl.DataFrame({"path": ["a", "b"], "error": [0.0, 1.0], "tone": [1, 2], "given_tone": [3, 4]}
                 ).write_parquet(run / artifacts.ERRORS)
    with pytest.raises(ClipengineError, match="column 'tone' is also an attribute"):
        artifacts.read_joined(run)


# ---- 12: one file, one item; links that leave the folder ------------------------------------------------
def test_two_spellings_of_one_path_are_one_item(tmp_path):
    from clipengine.datasets import create_dataset

    photos = make_photo_folder(tmp_path, n=4)
    text = (photos / "errors.csv").read_text().splitlines()
    (photos / "errors.csv").write_text("\n".join([text[0], "./" + text[1], *text[2:]]) + "\n")
    items = create_dataset("folder", photos, DatasetConfig()).list_items()
    assert items["path"][0] == text[1].split(",")[0] and not items["path"].str.starts_with("./").any()
    (photos / "errors.csv").write_text("\n".join([*text, "./" + text[1].replace(".png", ".png").replace("/", "//")]) + "\n")
    with pytest.raises(ClipengineError, match=r"is listed twice, rows 1 and 5 \('.*' and '\./.*//.*' name one file\)"):
        create_dataset("folder", photos, DatasetConfig()).list_items()


def test_two_spellings_of_one_boxed_file_are_one_file(tmp_path):
    from PIL import Image

    from clipengine.encode.inputs import items_from_input

    (tmp_path / "in").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "in" / "a.png")
    (tmp_path / "boxes.csv").write_text("path,x0,y0,x1,y1\n./a.png,0,0,5,5\na.png,1,1,9,9\nsub/../a.png,2,2,8,8\n")
    items, _ = items_from_input(tmp_path / "in", boxes=tmp_path / "boxes.csv")
    assert items["path"].unique().to_list() == [str(tmp_path / "in" / "a.png")]
    (tmp_path / "boxes.csv").write_text("path,x0,y0,x1,y1\n./a.png,0,0,5,5\na.png,0,0,5,5\n")
    items, _ = items_from_input(tmp_path / "in", boxes=tmp_path / "boxes.csv")
    with pytest.raises(ClipengineError, match="duplicate items"):
        artifacts.check_items(items)


@pytest.fixture
def linked_folder(tmp_path):
    """ROOT with two images, a link to an image outside it, a link to a folder outside it, a link
    inside it and a link to ROOT itself (a loop when followed)."""
    import os

    from PIL import Image

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    for path in (root / "a.png", root / "sub" / "b.png", outside / "secret.png", outside / "other.png"):
        Image.new("RGB", (8, 8)).save(path)
    os.symlink(outside / "secret.png", root / "leak.png")
    os.symlink(outside, root / "away")
    os.symlink("a.png", root / "alias.png")
    os.symlink(root, root / "sub" / "loop")
    return root, outside


def test_links_leading_out_of_the_folder_are_left_out_unless_followed(linked_folder):
    from clipengine.encode.inputs import find_image_files

    root, outside = linked_folder
    listing = find_image_files(root)
    assert [Path(f).relative_to(root).as_posix() for f in listing.files] == ["a.png", "alias.png", "sub/b.png"]
    assert [(Path(p).name, r.split(":")[0]) for p, r in listing.left_out] == [("away", "outside the folder"),
                                                                               ("leak.png", "outside the folder")]
    assert all("--follow-links" in r for _, r in listing.left_out)
    followed = find_image_files(root, follow_links=True)  # the loop back to ROOT is walked once
    assert [Path(f).relative_to(root).as_posix() for f in followed.files] == [
        "a.png", "alias.png", "away/other.png", "away/secret.png", "leak.png", "sub/b.png"]
    assert followed.left_out == []


def test_the_folder_dataset_leaves_out_links_leading_out_of_root(linked_folder):
    from clipengine.datasets import create_dataset

    root, _ = linked_folder
    (root / "errors.csv").write_text("path,error\na.png,0\nleak.png,1\naway/other.png,1\nsub/b.png,0\n")
    dataset = create_dataset("folder", root, DatasetConfig())
    assert dataset.list_items()["path"].to_list() == ["a.png", "sub/b.png"]
    assert dataset.load_errors()["path"].to_list() == ["a.png", "sub/b.png"]
    left = [s for s in dataset.skipped if "outside" in s["reason"]]
    assert len(left) == 1 and left[0]["count"] == 2 and "--follow-links" in left[0]["reason"]
    followed = create_dataset("folder", root, DatasetConfig(follow_links=True))
    assert followed.list_items()["path"].to_list() == ["a.png", "leak.png", "away/other.png", "sub/b.png"]
    assert followed.fingerprint(followed.list_items()) != dataset.fingerprint(dataset.list_items())


# ---- 13: one line where a traceback was ------------------------------------------------------------
def test_a_finished_run_on_read_only_storage_is_checked_without_writing(finished_run, tiny_clip):
    photos, run, schema = finished_run
    before = _snapshot(run)
    done = _on_read_only(run, *_run_args(photos, run, schema, tiny_clip))
    assert done.returncode == 0, done.stderr
    assert "all stages up to date" in done.stdout and "read-only, nothing written" in done.stdout
    assert "Traceback" not in done.stderr
    changed = _on_read_only(run, *_run_args(photos, run, schema, tiny_clip, "--k", "3"))
    assert changed.returncode == 2
    assert f"{run} is read-only and its slices stage would have to run" in _one_error_line(changed)
    assert _snapshot(run) == before


def test_encode_and_report_on_read_only_storage_are_one_line(finished_run, tiny_clip, tmp_path):
    photos, run, _ = finished_run
    locked_away = tmp_path / "read-only"
    locked_away.mkdir()
    done = _on_read_only(locked_away, "encode", photos, "--out", locked_away / "emb", "--model",
                         tiny_clip.config_path, "--weights", tiny_clip.weights_path, "--quiet")
    assert done.returncode == 2 and "cannot write there" in _one_error_line(done)
    done = _on_read_only(run, "report", run)
    assert done.returncode == 2 and "cannot write there" in _one_error_line(done)


def test_weights_that_are_not_named_tensors_are_one_line(tmp_path, recwarn):
    import pickle
    import zipfile

    import torch

    from clipengine.encode.models import load_state_dict

    torch.save({1: torch.zeros(2)}, tmp_path / "int-keys.pt")
    with pytest.raises(ClipengineError, match=r"int-keys.pt: holds no state dict of tensors \(entry '1'"):
        load_state_dict(tmp_path / "int-keys.pt")

    class Code:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"x": torch.zeros(2)}, tmp_path / "plain.pt")  # a torch zip whose pickle entry calls code
    with zipfile.ZipFile(tmp_path / "plain.pt") as plain, zipfile.ZipFile(tmp_path / "code.pt", "w") as crafted:
        for name in plain.namelist():
            crafted.writestr(name, pickle.dumps(Code(), protocol=4) if name.endswith("data.pkl") else plain.read(name))
    recwarn.clear()
    with pytest.raises(ClipengineError, match="refusing to load a checkpoint that executes pickled code"):
        load_state_dict(tmp_path / "code.pt")
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)], [str(w.message) for w in recwarn]


def test_a_header_only_errors_table_lists_no_item(tmp_path):
    from clipengine.datasets import create_dataset

    photos = make_photo_folder(tmp_path, n=2)
    (photos / "errors.csv").write_text("path,error,road\n")
    with pytest.raises(ClipengineError, match="errors.csv: lists no item"):
        create_dataset("folder", photos, DatasetConfig()).list_items()


# ---- 14: data in Markdown; what is deterministic ---------------------------------------------------------
def test_label_quality_md_shows_hostile_class_names_as_written(finished_run):
    import re

    _, run, _ = finished_run
    markdown = (run / artifacts.LABEL_QUALITY_MD).read_text()
    assert "<b>" not in markdown and r"\<b\>round\</b\>" in markdown and r"square\|x" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    header_cells = {}
    for line in rows:  # every row of a table has as many cells as its header
        cells = len(re.split(r"(?<!\\)\|", line)) - 2
        if line.startswith("| attribute") or line.startswith("| class"):
            header_cells["current"] = cells
        assert cells == header_cells["current"], line


@pytest.mark.slow
def test_only_manifest_summary_and_report_differ_between_two_runs(finished_run, tiny_clip, tmp_path):
    """The README's claim: every other artifact is the same bytes for the same inputs and settings."""
    import shutil

    photos, run, schema = finished_run
    again = tmp_path / "again"
    again.mkdir()
    for name in artifacts.ENCODE_OUTPUTS:  # the rows are reused (no image goes through the model again)
        shutil.copy2(run / name, again / name)
    done = _clipengine(*_run_args(photos, again, schema, tiny_clip), timeout=600)
    assert done.returncode == 0, done.stderr
    with_times = {artifacts.MANIFEST, artifacts.SUMMARY, artifacts.REPORT, artifacts.LOCK}
    files = sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file() and p.name not in with_times)
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file() and p.name not in with_times)
    assert {str(f) for f in files} >= {artifacts.METADATA, artifacts.SLICES_JSON, artifacts.LABEL_QUALITY_MD}
    assert any(f.parts[0] == artifacts.THUMBS_DIR for f in files)
    assert [f for f in files if (run / f).read_bytes() != (again / f).read_bytes()] == []
    assert (run / artifacts.REPORT).read_bytes() != (again / artifacts.REPORT).read_bytes()  # the run's name


# ---- 15: weights help, 1-bit images -------------------------------------------------------------------
def test_offline_without_weights_names_conse_too():
    from clipengine.config import ModelConfig
    from clipengine.encode.models import resolve_model

    with pytest.raises(ClipengineError, match=r"or, offline without CLIP weights, --model conse") as error:
        resolve_model(ModelConfig(model="ViT-B-32"), offline=True)
    assert "\n" not in str(error.value)


def test_a_one_bit_image_is_resized_as_grey_with_the_model_s_filter(tmp_path):
    """A deliberate difference from open_clip (listed in clipengine.encode.decode): open_clip resizes
    mode "1" nearest-neighbour, clipengine as grey with the model's filter."""
    import numpy as np
    from PIL import Image

    from clipengine.encode.decode import load_image
    from clipengine.encode.geometry import ImageSpec

    from tests.engine.encode.test_decode import open_clip_pixels

    blocks = np.random.default_rng(3).integers(0, 2, (18, 24)).astype(np.uint8) * 255
    stripes = np.kron(blocks, np.ones((5, 5), np.uint8))  # (90, 120) black and white 5-pixel blocks
    Image.fromarray(stripes).convert("1").save(tmp_path / "bits.png")
    Image.fromarray(stripes).convert("1").convert("L").save(tmp_path / "grey.png")
    spec = ImageSpec(32, fast_jpeg=False, fast_resize=False)
    ours = load_image(tmp_path / "bits.png", None, spec)
    np.testing.assert_array_equal(ours, load_image(tmp_path / "grey.png", None, spec))
    np.testing.assert_array_equal(ours, open_clip_pixels(tmp_path / "grey.png", 32))
    nearest = open_clip_pixels(tmp_path / "bits.png", 32)
    assert set(np.unique(nearest)) <= {0, 255} and len(np.unique(ours)) > 2  # open_clip keeps only black and white


def test_yaml_options_odd_files_need():
    from clipengine.yamlfile import parse_yaml

    assert parse_yaml("country: no\nspeed: [30, 1e3]\n", source="odd.yaml", text_scalars=True) == {
        "country": "no", "speed": ["30", "1e3"]}
    with pytest.raises(ClipengineError, match="odd.yaml: not valid YAML: line 2: anchors and aliases are not allowed"):
        parse_yaml("a: &x 1\nb: *x\n", source="odd.yaml", aliases=False)
    with pytest.raises(ClipengineError, match="nested more than 64 levels"):
        parse_yaml("a: " + "[" * 300 + "]" * 300, source="odd.yaml", text_scalars=True, aliases=False)


def test_errors_too_large_to_add_up_are_one_line_without_a_warning():
    import warnings

    from clipengine.tables import check_error_column

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow warning would print two more lines
        with pytest.raises(ClipengineError, match="holds values too large to add up"):
            check_error_column(pl.DataFrame({"error": [1e308, 1e308]}), "error", source="t.csv")


def test_an_error_naming_data_with_line_breaks_is_still_one_line(tmp_path):
    (tmp_path / "t.csv").write_text('error,"a\nb","c\x1ed"\n1,x,1\n0,x,1\n')  # \x1e: a record separator
    done = _clipengine("slices", tmp_path / "t.csv", "--error", "error", "--quiet", timeout=120)
    assert done.returncode == 2
    assert r"no usable feature column (a\nb: one value; c\x1ed: one value)" in _one_error_line(done)
