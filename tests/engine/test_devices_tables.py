"""Device choice, Numba's thread setting, and the readers of users' tables."""

from __future__ import annotations

import numba
import numpy as np
import polars as pl
import pytest

from clipengine.devices import numba_threads, parse_device, resolve_device
from clipengine.errors import ClipengineError
from clipengine.tables import check_error_column, read_table


@pytest.mark.parametrize("text, parsed", [("auto", ("auto", None)), ("CPU", ("cpu", None)), ("cuda", ("cuda", None)),
                                          ("cuda:1", ("cuda", 1))])
def test_device_names_parse(text, parsed):
    assert parse_device(text) == parsed


@pytest.mark.parametrize("text", ["graphics", "cuda:", "cuda:x", "cuda:-1", ""])
def test_bad_device_names_get_one_line(text):
    with pytest.raises(ClipengineError, match="--device must be auto, cpu, cuda or cuda:N"):
        parse_device(text)


@pytest.mark.parametrize("runtime", ["torch", "cupy"])
def test_without_a_visible_gpu_auto_is_the_cpu_and_cuda_is_refused(monkeypatch, runtime):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert resolve_device("auto", runtime=runtime) == "cpu"
    assert resolve_device("cpu", runtime=runtime) == "cpu"
    with pytest.raises(ClipengineError, match="--device cuda:1: no usable CUDA GPU"):
        resolve_device("cuda:1", runtime=runtime)


def test_numba_threads_are_restored_after_a_kernel_call():
    before = numba.get_num_threads()
    with numba_threads(1) as used:
        assert used == 1 and numba.get_num_threads() == 1
    assert numba.get_num_threads() == before


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet", ".data"])
def test_read_table_by_suffix(tmp_path, suffix):
    frame = pl.DataFrame({"path": ["a.jpg", "b.jpg"], "error": [0, 1]})
    path = tmp_path / f"t{suffix}"
    if suffix == ".tsv":
        frame.write_csv(path, separator="\t")
    elif suffix == ".parquet":
        frame.write_parquet(path)
    else:
        frame.write_csv(path)
    assert read_table(path).equals(frame)


def test_read_table_errors_are_one_line(tmp_path):
    with pytest.raises(ClipengineError, match=r"^errors file .*nope.csv does not exist$"):
        read_table(tmp_path / "nope.csv", what="errors")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(ClipengineError, match=r"^cannot read table file .*bad.parquet: ") as caught:
        read_table(bad)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("values, message", [
    ([0.0, None], "row 2 of error column 'error' has a missing value"),
    ([0.0, float("nan")], "row 2 of error column 'error' has a missing value"),
    ([float("inf"), 0.0], "row 1 of error column 'error' has a value that is not finite"),
    ([0.5, -1.0], "row 2 of error column 'error' has a negative value"),
    ([1e308, 1e308], "too large to add up"),
])
def test_error_values_are_checked_by_one_set_of_rules(values, message):
    with pytest.raises(ClipengineError, match=message):
        check_error_column(pl.DataFrame({"error": values}, schema={"error": pl.Float64}), "error", source="t.csv")


def test_a_header_only_table_lists_no_item():
    with pytest.raises(ClipengineError, match="t.csv: lists no item"):
        check_error_column(pl.DataFrame({"path": [], "error": []}, schema={"path": pl.String, "error": pl.Float64}),
                           "error", source="t.csv")


def test_good_errors_come_back_as_float64():
    values = check_error_column(pl.DataFrame({"error": [True, False]}), "error", source="t")
    assert values.dtype == np.float64 and values.tolist() == [1.0, 0.0]
