"""What clipengine refuses, tried as a careless user or an attacker would: real files, real processes."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import polars as pl
import pytest

from clipengine import artifacts
from clipengine.config import DatasetConfig
from clipengine.errors import ClipengineError

from tests.engine.run.test_run import make_config, make_photo_folder


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
