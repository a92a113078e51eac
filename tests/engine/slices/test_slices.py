"""The slice stage: feature typing, validation, planted and null data, results, files, CLI."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from clipengine.artifacts import SLICE_RECORD_KEYS
from clipengine.errors import ClipengineError
from clipengine.slices.find import find_slices, write_slices


def pedestrians(m=6000, seed=0, planted=None, rate=0.1, lift=0.35):
    rng = np.random.default_rng(seed)
    frame = pl.DataFrame(
        {
            "gender": rng.choice(["female", "male"], m),
            "age": rng.choice(["child", "adult", "senior"], m),
            "box_height": rng.exponential(300.0, m),
            "occluded": rng.random(m) < 0.3,
            "camera": rng.integers(0, 4, m),
        }
    )
    p = np.full(m, rate)
    if planted is not None:
        p[planted(frame)] = lift
    return frame.with_columns(error=pl.Series((rng.random(m) < p).astype(np.int64)))


def test_planted_two_predicate_slice_is_the_top_slice():
    frame = pedestrians(planted=lambda f: ((f["gender"] == "female") & (f["age"] == "child")).to_numpy())
    result = find_slices(frame, error="error")
    assert result.predicates[0] == {"gender": "female", "age": "child"}
    assert result.significant[0] and result.q_value[0] < 1e-6
    assert result.ci_low[0] < result.error_mean_[0] < result.ci_high[0]
    mask = result.row_mask(0)
    expected = ((frame["gender"] == "female") & (frame["age"] == "child")).to_numpy()
    assert np.array_equal(mask, expected)
    assert result.size[0] == expected.sum()
    assert result.error_sum[0] == frame["error"].to_numpy()[expected].sum()


def test_planted_three_predicate_slice_with_a_binned_feature_and_continuous_errors():
    rng = np.random.default_rng(5)
    m = 8000
    frame = pedestrians(m=m, seed=5)
    hidden = ((frame["gender"] == "male") & (frame["occluded"]) & (frame["box_height"] <= 60.0)).to_numpy()
    error = rng.exponential(0.2, m) + np.where(hidden, 1.0, 0.0)
    frame = frame.with_columns(error=pl.Series(error), box_height=pl.Series(np.where(frame["box_height"] < 60, 30.0, 500.0) + rng.random(m)))
    result = find_slices(frame, error="error", bins={"box_height": [200.0]}, min_sup=20)
    top = result.predicates[0]
    assert top == {"gender": "male", "box_height": "(-inf, 200.0]", "occluded": True}
    assert not result.binary_errors and result.significant[0]
    assert np.array_equal(result.row_mask(0), hidden)


@pytest.mark.parametrize("binary", [True, False])
def test_null_data_gives_no_significant_slice_in_95_percent_of_seeds(binary):
    false_alarms = 0
    seeds = range(20)
    for seed in seeds:
        rng = np.random.default_rng(100 + seed)
        frame = pedestrians(m=3000, seed=100 + seed)
        if not binary:
            frame = frame.with_columns(error=pl.Series(rng.exponential(1.0, 3000)))
        result = find_slices(frame, error="error", min_sup=20)
        false_alarms += not result.nothing_significant
    assert false_alarms <= 1  # ≥ 95 % of seeds report nothing


def test_feature_typing_binning_nulls_and_skips():
    m = 1000
    rng = np.random.default_rng(2)
    frame = pl.DataFrame(
        {
            "color": pl.Series(rng.choice(["red", "green", None], m).tolist(), dtype=pl.String),
            "kind": pl.Series(rng.choice(["a", "b"], m)).cast(pl.Categorical),
            "flag": rng.random(m) < 0.5,
            "count": rng.integers(0, 5, m),
            "height": np.linspace(0.0, 100.0, m),
            "constant": np.ones(m),
            "ident": [f"id{i}" for i in range(m)],
            "error": (np.linspace(0.0, 100.0, m) > 75) & (rng.random(m) < 0.6) | (rng.random(m) < 0.1),
        }
    )
    # the whole table searched, so that the top slice is the one the errors were planted in
    result = find_slices(frame, error="error", bins=4, binning="width", max_q=1.0, k=50, min_sup=5, family="lattice")
    assert result.predicates[0] == {"height": "(75.0, 100.0]"}
    assert result.skipped_features == {"constant": "one value", "ident": f"{m} levels > max_levels 256"}
    assert result.features == ["color", "kind", "flag", "count", "height"]
    values = {}
    for predicates in result.predicates:
        for name, value in predicates.items():
            values.setdefault(name, set()).add(value)
    assert values["height"] <= {"[0.0, 25.0]", "(25.0, 50.0]", "(50.0, 75.0]", "(75.0, 100.0]"}
    assert values.get("count", set()) <= {0, 1, 2, 3, 4}
    assert values.get("color", set()) <= {"red", "green", None}
    dropped = find_slices(frame, error="error", max_q=1.0, k=50, min_sup=5, drop_nulls=True, family="lattice")
    assert all(p.get("color", "x") is not None for p in dropped.predicates)


def test_null_level_row_mask():
    frame = pl.DataFrame({"color": ["red", None, "blue", None] * 50, "error": [0, 1, 0, 1] * 50})
    result = find_slices(frame, error="error", min_sup=5, k=1)
    assert result.predicates[0] == {"color": None}
    assert np.array_equal(result.row_mask(0), frame["color"].is_null().to_numpy())


def test_min_sup_as_fraction_and_count():
    frame = pedestrians(m=2000)
    assert find_slices(frame, error="error", min_sup=0.05).params["min_sup"] == 100
    assert find_slices(frame, error="error", min_sup=7).params["min_sup"] == 7
    assert find_slices(frame, error="error").params["min_sup"] == 20


@pytest.mark.parametrize(
    "change, kwargs, message",
    [
        (lambda f: f, {"error": "missing"}, "no error column 'missing' (columns: gender, age"),
        (lambda f: f.with_columns(error=pl.lit(-1.0)), {"error": "error"}, "has a negative value (-1.0) (and 5999 more)"),
        (lambda f: f.with_columns(error=pl.when(pl.col("camera") == 0).then(float("nan")).otherwise(pl.col("error"))),
         {"error": "error"}, "has a missing value (nan)"),
        (lambda f: f.with_columns(error=pl.when(pl.col("camera") == 0).then(float("inf")).otherwise(pl.col("error"))),
         {"error": "error"}, "has a value that is not finite (inf)"),
        (lambda f: f.with_columns(error=pl.when(pl.col("camera") == 0).then(None).otherwise(pl.col("error"))),
         {"error": "error"}, "has a missing value (None)"),
        (lambda f: f.with_columns(error=pl.lit("x")), {"error": "error"}, "must be numeric"),
        (lambda f: f, {"error": "error", "features": ["nope"]}, "feature column(s) 'nope' not found"),
        (lambda f: f, {"error": "error", "min_sup": 0}, "min_sup"),
        (lambda f: f, {"error": "error", "min_sup": 1.5}, "min_sup"),
        (lambda f: f, {"error": "error", "compat": "sliceline"}, "compat"),
        (lambda f: f, {"error": "error", "k": 0}, "k must be"),
        (lambda f: f.select("error"), {"error": "error"}, "no usable feature column"),
        (lambda f: f.head(0), {"error": "error"}, "no rows"),
    ],
)
def test_bad_input_is_a_one_line_error_naming_the_column(change, kwargs, message):
    frame = change(pedestrians())
    with pytest.raises(ClipengineError) as info:
        find_slices(frame, **kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_the_first_bad_row_and_the_count_are_named():
    frame = pedestrians(m=100).with_columns(error=pl.Series([0.0, float("nan"), float("nan"), float("nan")] + [0.0] * 96))
    with pytest.raises(ClipengineError, match=r"row 2 of error column 'error' has a missing value \(nan\) \(and 2 more\)"):
        find_slices(frame, error="error")


def test_no_error_at_all_gives_no_slice():
    frame = pedestrians(m=500).with_columns(error=pl.lit(0))
    result = find_slices(frame, error="error")
    assert len(result) == 0 and result.nothing_significant


def test_write_slices_is_deterministic_and_complete(tmp_path):
    frame = pedestrians(planted=lambda f: (f["gender"] == "female").to_numpy())
    result = find_slices(frame, error="error")
    write_slices(result, tmp_path / "a")
    write_slices(find_slices(frame, error="error"), tmp_path / "b")
    for name in ("slices.parquet", "slices.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    payload = json.loads((tmp_path / "a" / "slices.json").read_text())
    assert payload["slices"] == json.loads(json.dumps(result.to_records()))
    assert payload["n_rows"] == 6000 and "time" not in json.dumps(payload)
    table = pl.read_parquet(tmp_path / "a" / "slices.parquet")
    assert table["rank"].to_list() == list(range(1, len(result) + 1))
    assert table["slice"][0] == result.describe(0)
    assert tuple(result.to_records()[0]) == SLICE_RECORD_KEYS
    assert set(SLICE_RECORD_KEYS) - {"predicates", "bounds"} <= set(table.columns)


def test_cli_json_table_and_null_message(tmp_path):
    from clipengine.cli import cli

    planted = pedestrians(planted=lambda f: ((f["gender"] == "female") & (f["age"] == "child")).to_numpy())
    planted.write_parquet(tmp_path / "planted.parquet")
    pedestrians(seed=11).write_csv(tmp_path / "null.csv")
    runner = CliRunner()
    out = runner.invoke(cli, ["slices", str(tmp_path / "planted.parquet"), "--error", "error", "--json", "--k", "3",
                              "--out", str(tmp_path / "out")])
    assert out.exit_code == 0, out.output
    records = json.loads(out.stdout)
    assert records[0]["predicates"] == {"gender": "female", "age": "child"}
    assert (tmp_path / "out" / "slices.parquet").exists()
    out = runner.invoke(cli, ["slices", str(tmp_path / "planted.parquet"), "--error", "error",
                              "--features", "gender,age", "--min-sup", "0.01"])
    assert out.exit_code == 0 and "gender = female AND age = child" in out.output
    out = runner.invoke(cli, ["slices", str(tmp_path / "null.csv"), "--error", "error", "--min-sup", "20"])
    assert out.exit_code == 0 and "no slice is significant at q ≤ 0.05" in out.output


def test_cli_bad_column_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys

    pedestrians(m=200).write_csv(tmp_path / "t.csv")
    run = subprocess.run([sys.executable, "-m", "clipengine", "slices", str(tmp_path / "t.csv"), "--error", "err"],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip() == f"clipengine: error: {tmp_path / 't.csv'}: no error column 'err' " \
        "(columns: gender, age, box_height, occluded, camera, error)"
    assert "Traceback" not in run.stderr


def test_quantile_binning_keeps_a_heavy_point_mass_as_its_own_bin():
    rng = np.random.default_rng(8)
    gain = np.where(rng.random(4000) < 0.9, 0.0, rng.uniform(1.0, 1000.0, 4000))
    error = ((gain > 0) & (rng.random(4000) < 0.5)) | (rng.random(4000) < 0.05)
    frame = pl.DataFrame({"gain": gain, "other": rng.integers(0, 3, 4000), "error": error})
    from clipengine.slices.coding import code_features

    used, coded, _ = code_features(frame, ["gain"])
    labels = coded[0].labels
    assert labels[0] == "[0.0, 0.0]" and labels[1].startswith("(0.0, ")
    assert np.array_equal(coded[0].codes == 0, gain == 0)
    result = find_slices(frame, error="error")
    assert result.predicates[0]["gain"].startswith("(0.0, ")


# ---- memory limit and start-up ------------------------------------------------------------------------


def wide_ab(m=500, nf=120, seed=0):
    """issue 14's table: every feature takes the values a and b, random 0/1 errors."""
    rng = np.random.default_rng(seed)
    columns = {f"c{j}": rng.choice(["a", "b"], m) for j in range(nf)}
    return pl.DataFrame({**columns, "error": rng.integers(0, 2, m)})


def test_a_lattice_over_the_memory_limit_is_refused_in_one_line_naming_what_fits():
    frame = wide_ab()
    with pytest.raises(ClipengineError) as info:
        find_slices(frame, error="error", max_memory=60_000_000)
    message = str(info.value)
    assert "\n" not in message and "lattice level 3" in message and "--max-memory" in message
    assert "--max-level 2" in message and "fewer features (--features)" in message
    suggested = int(message.split("--min-sup ")[1].split(",")[0])
    assert suggested > 5  # the default ⌈500/100⌉ did not fit
    for option in ({"max_level": 2}, {"min_sup": suggested}):
        result = find_slices(frame, error="error", max_memory=60_000_000, **option)
        assert result.n_evaluated > 0


def test_cli_refusal_exits_2_and_max_memory_is_parsed(tmp_path):
    import subprocess
    import sys

    wide_ab(nf=100).write_csv(tmp_path / "ab.csv")
    run = subprocess.run([sys.executable, "-m", "clipengine", "slices", str(tmp_path / "ab.csv"), "--error", "error",
                          "--max-memory", "40M", "--quiet"], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().startswith("clipengine: error: slice search needs ≈")
    assert "0.04 GB memory limit" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    from clipengine.cli.options import parse_memory

    def _parse_memory(text):
        return parse_memory(None, None, text)

    assert _parse_memory("8G") == 8_000_000_000 and _parse_memory("1.5gb") == 1_500_000_000
    assert _parse_memory("500M") == 500_000_000 and _parse_memory("123") == 123
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(Exception, match="not a size"):
            _parse_memory(bad)


def test_slices_command_imports_no_scipy_stats_and_no_torch(tmp_path):
    """A warm `clipengine slices` pays for what it uses: scipy.stats and scipy.special (their imports
    are several times the search on Adult-sized tables) and torch are not imported for 0/1 errors, nor
    scipy.linalg for Numba's BLAS check (:mod:`clipengine.bindings.numba_start`)."""
    import subprocess
    import sys

    pedestrians(m=300).write_csv(tmp_path / "t.csv")
    probe = ("import sys, runpy; sys.argv = ['clipengine', 'slices', sys.argv[1], '--error', 'error', '--quiet'];"
             "import atexit; atexit.register(lambda: print('MODULES', 'scipy.stats' in sys.modules,"
             " 'scipy.special' in sys.modules, 'torch' in sys.modules, 'numba' in sys.modules,"
             " 'scipy.linalg' in sys.modules, file=sys.stderr));"
             "runpy.run_module('clipengine', run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "t.csv")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "rows, mean error" in run.stdout
    assert "MODULES False False False True False" in run.stderr  # 0/1 errors: no scipy distribution needed


@pytest.mark.parametrize("dtype", [pl.Int64, pl.Int16, pl.UInt8, pl.UInt32])
def test_integer_columns_coded_by_counting_as_polars_codes_them(dtype):
    from clipengine.slices.coding import code_categorical as _code_categorical
    from clipengine.slices.coding import code_feature as _code_feature

    rng = np.random.default_rng(9)
    low = -4 if dtype.is_signed_integer() else 3
    series = pl.Series("x", rng.choice(np.arange(low, low + 14, 3), 5000), dtype=dtype)
    fast = _code_feature(series, "x", 10, "quantile")
    reference = _code_categorical(series)
    assert fast.labels == reference.labels and all(type(v) is int for v in fast.labels)
    assert np.array_equal(fast.codes, reference.codes) and fast.codes.dtype == np.uint8
    wide = pl.Series("y", [0, 1 << 20, 5] * 10, dtype=pl.Int64)  # a wide range: the Polars path
    assert _code_feature(wide, "y", 10, "quantile").labels == [0, 5, 1 << 20]


@pytest.mark.parametrize("binary", [True, False])
def test_slice_sums_are_a_plain_numpy_reference_bit_for_bit(binary):
    from clipengine.slices.find import _slice_sums

    rng = np.random.default_rng(11)
    domains = np.array([3, 4, 2])
    codes = np.stack([rng.integers(0, d, 5000) for d in domains]).astype(np.uint8)  # (f, m)
    col_feature = np.repeat(np.arange(3, dtype=np.int32), domains)
    errors = (rng.random(5000) < 0.3).astype(np.float64)
    if not binary:
        errors *= rng.uniform(0.1, 5.0, 5000)
    test = rng.random(5000) < 0.5
    columns = np.array([[0, 3, -1], [4, 8, -1], [2, 6, 7]], np.int32)  # global column ids, -1 unused
    whole, held_out = _slice_sums(codes, col_feature, columns, errors, test, binary)
    offsets = np.concatenate(([0], np.cumsum(domains)))
    for i, slice_columns in enumerate(columns):
        mask = np.ones(5000, bool)
        for c in slice_columns[slice_columns >= 0]:
            j = col_feature[c]
            mask &= codes[j] == c - offsets[j]
        e, h = errors[mask], errors[mask & test]
        np.testing.assert_array_equal(whole[i], [e.size, e.sum(), np.dot(e, e), e.max()])
        np.testing.assert_array_equal(held_out[i], [h.size, h.sum(), np.dot(h, h)])
