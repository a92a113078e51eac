"""The coverage stage, the ODD file and ``clipengine coverage``: small tables with answers known by
construction or counted by brute force."""

import itertools
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import polars as pl
import pytest

from clipengine.artifacts import COVERAGE_JSON, COVERAGE_PARQUET
from clipengine.config import CoverageConfig
from clipengine.coverage.inputs import read_run_table
from clipengine.coverage.odd import load_odd, parse_odd
from clipengine.coverage.stage import measure_coverage, write_coverage
from clipengine.errors import ClipengineError

ISSUE_ODD = """\
features:
  weather: [clear, rain, fog, snow]
  time: [day, night]
  season: [winter, summer]
exclude:
  - {weather: snow, season: summer}
"""


def config(**kw):
    return CoverageConfig(progress=False, **kw)


def by_predicates(records):
    return {tuple(sorted(r["predicates"].items())): r for r in records}


# ---- the ODD file ---------------------------------------------------------------------------------


def test_the_issue_odd_loads_as_written(tmp_path):
    path = tmp_path / "odd.yaml"
    path.write_text(ISSUE_ODD)
    odd = load_odd(path)
    assert odd.features == {"weather": ("clear", "rain", "fog", "snow"), "time": ("day", "night"),
                            "season": ("winter", "summer")}
    assert odd.exclude == ({"weather": ("snow",), "season": ("summer",)},)
    assert odd.path == str(path)


def test_odd_values_are_read_as_written_text():
    odd = parse_odd("features:\n  flag: [yes, no, on, 1, 01, true, null]\n")
    assert odd.features["flag"] == ("yes", "no", "on", "1", "01", "true", "null")


BAD_ODD = [
    ("", "needs a 'features'"),
    ("- weather", "top level must be a mapping"),
    ("feature: {a: [x]}", "unknown key 'feature'"),
    ("name: x", "'features' is missing"),
    ("features: [a, b]", "'features' must map"),
    ("features: {weather: fog}", "'features.weather' must be a non-empty list"),
    ("features: {weather: []}", "'features.weather' must be a non-empty list"),
    ("features: {weather: [fog, fog]}", "'features.weather' lists 'fog' twice"),
    ("features: {weather: [[fog]]}", "'features.weather[0]' must be a value"),
    ("features: {weather: [fog], weather: [rain]}", "duplicate key 'weather'"),
    ("features: {weather: &w [fog]}\nexclude: [{weather: *w}]", "aliases are not allowed"),
    ("features: {weather: [fog]}\nexclude: {weather: fog}", "'exclude' must be a list"),
    ("features: {weather: [fog]}\nexclude: [fog]", "'exclude[0]' must map features"),
    ("features: {weather: [fog]}\nexclude: [{time: night}]", "'exclude[0].time'"),
    ("features: {weather: [fog]}\nexclude: [{weather: hail}]", "'exclude[0].weather': 'hail' is not a value"),
    ("features: {weather: [fog]\n", "not valid YAML: line 2"),
]


@pytest.mark.parametrize("text,message", BAD_ODD)
def test_bad_odd_files_give_one_line_naming_the_key(tmp_path, text, message):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ClipengineError) as error:
        load_odd(path)
    assert message in str(error.value)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_odd_file_size_is_bounded(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("features:\n  a: [" + ", ".join(f"v{i}" for i in range(200_000)) + "]\n")
    with pytest.raises(ClipengineError, match="at most 1048576"):
        load_odd(path)
    with pytest.raises(ClipengineError, match="not found"):
        load_odd(tmp_path / "absent.yaml")


# ---- the stage: known answers ------------------------------------------------------------------------


def test_nist_worked_example():
    """NIST's combinatorial coverage example (csrc.nist.gov, Automated Combinatorial Testing for Software:
    Combinatorial Coverage; Kuhn, Kacker, Lei): four tests over binary a, b, c, d cover 19 of the 24
    2-way variable-value combinations; ab=11, ac=11, ad=10, bc=01, bc=10 are missing; only bd and cd
    are covered with all four value pairs (2 of 6); per pair .75 .75 .75 .5 1 1."""
    tests = pl.DataFrame({"a": [0, 0, 1, 0], "b": [0, 1, 0, 1], "c": [0, 1, 0, 1], "d": [0, 0, 1, 1]})
    result = measure_coverage(tests, config=config(t=2))
    out = result.to_json()
    assert out["coverage"][1] == {"t": 2, "covered": 19, "valid": 24, "sets": 6, "complete_sets": 2}
    missing = {tuple(sorted(m["predicates"].items())) for m in out["missing"]}
    assert missing == {(("a", "1"), ("b", "1")), (("a", "1"), ("c", "1")), (("a", "1"), ("d", "0")),
                       (("b", "0"), ("c", "1")), (("b", "1"), ("c", "0"))}
    shares = {tuple(s["features"]): s["covered"] / s["valid"] for s in out["feature_sets"] if s["t"] == 2}
    assert shares == {("a", "b"): .75, ("a", "c"): .75, ("a", "d"): .75, ("b", "c"): .5, ("b", "d"): 1.0,
                      ("c", "d"): 1.0}


def test_expected_counts_tell_rare_from_missing():
    # 100 items: weather fog 40 / clear 60, time night 50 / day 50; fog never at night;
    # snow appears twice, both by day
    weather = ["fog"] * 40 + ["clear"] * 58 + ["snow"] * 2
    time = ["day"] * 40 + ["night"] * 50 + ["day"] * 8 + ["day"] * 2
    result = measure_coverage(pl.DataFrame({"weather": weather, "time": time}), config=config(t=2))
    missing = by_predicates(result.to_json()["missing"])
    fog_night = missing[(("time", "night"), ("weather", "fog"))]
    snow_night = missing[(("time", "night"), ("weather", "snow"))]
    assert fog_night["count"] == 0 and fog_night["expected"] == pytest.approx(100 * 0.40 * 0.50)
    assert snow_night["expected"] == pytest.approx(100 * 0.02 * 0.50)
    assert [m["predicates"] for m in result.to_json()["missing"]][0] == {"weather": "fog", "time": "night"}


def test_thin_combinations_are_listed_thinnest_first_with_error_rates():
    frame = pl.DataFrame({"a": ["x"] * 3 + ["y"] * 20 + ["x"] * 10 + ["y"] * 7,
                          "b": ["p"] * 3 + ["p"] * 20 + ["q"] * 10 + ["q"] * 7,
                          "error": [1] * 3 + [0] * 20 + [1] * 2 + [0] * 8 + [0] * 7})
    result = measure_coverage(frame, config=config(t=2, min_count=8))
    out = result.to_json()
    assert out["missing_total"] == 2 and out["errors"] == {"column": "error", "binary": True}
    first, second = out["missing"]
    assert first["predicates"] == {"a": "x", "b": "p"} and first["count"] == 3
    assert second["predicates"] == {"a": "y", "b": "q"} and second["count"] == 7
    # 3 items, 3 errors: rate 1 with a wide Wilson interval
    from clipengine.slices.stats import wilson_interval

    low, high = wilson_interval(np.array([3.0]), np.array([3.0]))
    assert first["errors"] == 3 and first["error_rate"] == 1.0
    assert first["ci_low"] == pytest.approx(low[0], abs=1e-6) and first["ci_high"] == pytest.approx(1.0)
    assert second["errors"] == 0 and second["error_rate"] == 0.0


def test_constraints_leave_the_denominator_and_out_of_odd_items_are_counted():
    odd = parse_odd(ISSUE_ODD)
    rows = [("clear", "day", "winter"), ("rain", "night", "summer"), ("snow", "day", "summer"),
            ("hail", "day", "winter"), ("fog", "dusk", "winter"), ("fog", "night", "winter")]
    frame = pl.DataFrame(rows, schema=["weather", "time", "season"], orient="row")
    result = measure_coverage(frame, config=config(t=3), odd=odd)
    out = result.to_json()
    # t = 2: 8 + 8 + 4 = 20 combinations, weather=snow AND season=summer excluded
    assert out["coverage"][1]["valid"] == 19
    # t = 3: 16 combinations, the 2 holding snow AND summer excluded
    assert out["coverage"][2]["valid"] == 14 and out["coverage"][0]["valid"] == 8
    assert out["out_of_odd"] == 3  # hail, dusk, and the excluded snow-summer item
    assert out["out_of_odd_values"] == {"weather": {"hail": 1}, "time": {"dusk": 1}}
    assert out["excluded_present"] == [{"predicates": {"weather": "snow", "season": "summer"}, "count": 1}]
    assert {e["row"] for e in out["out_of_odd_examples"]} == {2, 3, 4}
    assert all(tuple(sorted(m["predicates"].items())) != (("season", "summer"), ("weather", "snow"))
               for m in result.missing(10_000)[0])
    # a value outside the ODD makes the item unknown for that feature only: the hail item still counts
    # for time = day AND season = winter (with the clear-day-winter item)
    table = result.to_polars()
    row = table.filter((pl.col("feature_1") == "time") & (pl.col("value_1") == "day")
                       & (pl.col("feature_2") == "season") & (pl.col("value_2") == "winter"))
    assert row["count"].to_list() == [2]


def test_an_unknown_value_never_matches_an_exclusion():
    odd = parse_odd("features:\n  weather: [clear, fog]\n  time: [day, night]\n"
                    "exclude:\n  - {weather: clear, time: night}\n")
    frame = pl.DataFrame({"weather": ["hail", None, "clear", "fog"], "time": ["night", "night", "night", "day"]})
    out = measure_coverage(frame, config=config(t=2), odd=odd).to_json()
    assert out["out_of_odd"] == 2  # hail, and clear at night; the item without weather is not out of the ODD
    assert out["excluded_present"] == [{"predicates": {"weather": "clear", "time": "night"}, "count": 1}]
    assert out["out_of_odd_values"] == {"weather": {"hail": 1}}
    assert out["unknown"] == {"weather": 2, "time": 0}


def brute_coverage(frame, features, t, min_count, rules=()):
    """(covered, valid) per t by walking rows and combinations in plain Python."""
    domains = {f: sorted(set(frame[f].drop_nulls().to_list())) for f in features}
    out = []
    for k in range(1, t + 1):
        covered = valid = 0
        for subset in itertools.combinations(features, k):
            tally = Counter(tuple(row) for row in frame.select(subset).drop_nulls().iter_rows())
            for combination in itertools.product(*(domains[f] for f in subset)):
                given = dict(zip(subset, combination))
                if any(all(given.get(f) == v for f, v in rule.items()) for rule in rules):
                    continue
                valid += 1
                covered += tally[combination] >= min_count
        out.append((covered, valid))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_coverage_matches_brute_force_on_random_tables(seed):
    rng = np.random.default_rng(seed)
    columns = {}
    for j, d in enumerate([3, 2, 4, 2, 5]):
        values = np.array([f"v{i}" for i in range(d)], dtype=object)[rng.integers(0, d, 300)]
        values[rng.random(300) < 0.05] = None  # some items without a label
        columns[f"f{j}"] = values.tolist()
    frame = pl.DataFrame(columns)
    frame = frame.filter(~((pl.col("f0") == "v1") & (pl.col("f2") == "v3")))  # planted hole
    rules = [{"f1": "v0", "f3": "v1"}]
    odd = parse_odd("features:\n" + "".join(f"  f{j}: [{', '.join(f'v{i}' for i in range(d))}]\n"
                                            for j, d in enumerate([3, 2, 4, 2, 5]))
                    + "exclude:\n  - {f1: v0, f3: v1}\n")
    for min_count in (1, 4):
        result = measure_coverage(frame, config=config(t=3, min_count=min_count), odd=odd)
        got = [(c["covered"], c["valid"]) for c in result.coverage()]
        assert got == brute_coverage(frame, list(columns), 3, min_count, rules)
    assert result.to_json()["unknown"]["f0"] == frame["f0"].null_count()


def test_against_lists_both_directions():
    here = pl.DataFrame({"weather": ["fog", "fog", "rain", "clear"], "time": ["day", "day", "night", "day"]})
    there = pl.DataFrame({"weather": ["rain", "clear", "clear", "snow"], "time": ["night", "day", "night", "day"]})
    result = measure_coverage(here, config=config(t=2), against=there, against_source="there.parquet")
    against = result.to_json()["against"]
    assert against["source"] == "there.parquet" and against["rows"] == 4
    pair = against["coverage"][1]
    assert pair["this_not_other"] == 1 and pair["other_not_this"] == 2 and pair["common"] == 2
    this_only = [c["predicates"] for c in against["this_not_other"]["combinations"] if c["t"] == 2]
    other_only = [c["predicates"] for c in against["other_not_this"]["combinations"] if c["t"] == 2]
    assert this_only == [{"weather": "fog", "time": "day"}]
    assert {tuple(p.values()) for p in other_only} == {("clear", "night"), ("snow", "day")}
    # the values seen in either table are the domain: snow is missing here at t = 1
    assert {"weather": "snow"} in [m["predicates"] for m in result.to_json()["missing"]]
    assert against["this_not_other"]["combinations"][0]["count"] == 2
    assert against["this_not_other"]["combinations"][0]["count_other"] == 0


def labelled():
    # four items; weather and time with label probabilities; "given" is a certain column
    return pl.DataFrame({
        "weather": ["fog", "fog", "rain", "rain"], "weather_prob": [0.9, 0.4, 0.8, 0.6],
        "time": ["night", "night", "day", "night"], "time_prob": [0.5, 0.9, 1.0, 0.7],
        "given": ["a", "a", "a", "b"],
    })


def test_min_prob_makes_unsure_labels_unknown_for_their_feature_only():
    result = measure_coverage(labelled(), config=config(t=2, min_prob=0.55))
    table = result.to_polars()

    def count(**predicates):
        items = list(predicates.items())
        expr = (pl.col("feature_1") == items[0][0]) & (pl.col("value_1") == items[0][1])
        if len(items) == 2:
            expr &= (pl.col("feature_2") == items[1][0]) & (pl.col("value_2") == items[1][1])
        return table.filter(expr & (pl.col("t") == len(items)))["count"].item()

    # fog/night: item 0 has time 0.5 < 0.55 and item 1 weather 0.4 < 0.55: neither counts
    assert count(weather="fog", time="night") == 0
    assert count(weather="fog") == 1 and count(time="night") == 2
    # an unsure weather label still counts for combinations without weather
    assert count(time="night", given="a") == 1
    out = result.to_json()
    assert out["certain_features"] == ["given"]
    fog_night = by_predicates(out["missing"])[(("time", "night"), ("weather", "fog"))]
    assert fog_night["count"] == 0 and fog_night["count_by_labels"] == 2
    assert out["coverage"][1]["covered_by_labels"] > out["coverage"][1]["covered"]


def test_soft_counts_sum_products_of_label_probabilities():
    frame = labelled()
    result = measure_coverage(frame, config=config(t=2, soft=True))
    table = result.to_polars().filter((pl.col("t") == 2) & (pl.col("feature_1") == "weather")
                                      & (pl.col("feature_2") == "time"))
    soft = {(r["value_1"], r["value_2"]): r["count"] for r in table.to_dicts()}
    assert soft[("fog", "night")] == pytest.approx(0.9 * 0.5 + 0.4 * 0.9)
    assert soft[("rain", "night")] == pytest.approx(0.6 * 0.7)
    assert soft[("rain", "day")] == pytest.approx(0.8 * 1.0)
    # covered means an expected count ≥ min_count: with min_count 1, none of these is
    assert not any(table["covered"].to_list())
    given = result.to_polars().filter((pl.col("t") == 2) & (pl.col("feature_1") == "weather")
                                      & (pl.col("feature_2") == "given") & (pl.col("value_1") == "fog"))
    assert given.filter(pl.col("value_2") == "a")["count"].item() == pytest.approx(0.9 + 0.4)  # given is certain
    assert given.filter(pl.col("value_2") == "a")["count_by_labels"].item() == 2


def test_errors_that_are_not_binary_get_a_mean_and_t_interval():
    frame = pl.DataFrame({"a": ["x", "x", "x", "y"], "error": [0.5, 1.5, 1.0, 2.0]})
    result = measure_coverage(frame, config=config(t=1))
    row = result.to_polars().filter(pl.col("value_1") == "x").to_dicts()[0]
    assert row["errors"] == pytest.approx(3.0) and row["error_rate"] == pytest.approx(1.0)
    from scipy.stats import t as student

    half = student.ppf(0.975, 2) * np.std([0.5, 1.5, 1.0], ddof=1) / np.sqrt(3)
    assert row["ci_low"] == pytest.approx(1.0 - half) and row["ci_high"] == pytest.approx(1.0 + half)
    assert result.to_json()["errors"]["binary"] is False


def test_bad_inputs_give_one_line_errors():
    frame = pl.DataFrame({"a": ["x", "y"], "b": ["p", "q"], "c": [0.25, 1.5], "error": [0, 1]})
    cases = [
        (dict(features=["a", "zz"]), "'zz' not found"),
        (dict(features=["a", "c"]), "feature 'c': continuous numbers"),
        (dict(features=["a"], config=config(t=2)), "needs at least 2 features"),
        (dict(features=["a", "error"]), "error column 'error' cannot also be a feature"),
        (dict(features=["a", "b"], config=config(min_prob=0.5)), "--min-prob needs label probabilities"),
        (dict(features=["a", "b"], config=config(error="nope")), "error column 'nope' not found"),
        (dict(odd=parse_odd("features: {weather: [fog]}", source="ODD file 'o.yaml'")),
         "ODD file 'o.yaml': 'features.weather': no column 'weather'"),
        (dict(features=["a", "b"], odd=parse_odd("features: {a: [x], b: [p, q]}")), None),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("config", config())
        if message is None:
            measure_coverage(frame, **kwargs)
            continue
        with pytest.raises(ClipengineError) as error:
            measure_coverage(frame, **kwargs)
        assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ClipengineError, match="feature sets"):
        wide = pl.DataFrame({f"f{i}": [str(i % 7)] * 2 for i in range(400)})
        measure_coverage(wide, config=config(t=4))


def test_default_features_skip_keys_probabilities_and_wide_columns():
    frame = pl.DataFrame({"path": [f"{i}.jpg" for i in range(80)], "a": ["x", "y"] * 40, "a_prob": [0.9] * 80,
                          "a_margin": [0.5] * 80, "id": [str(i) for i in range(80)], "error": [0, 1] * 40})
    result = measure_coverage(frame, config=config(t=1, max_levels=64))
    assert result.features == ["a"] and list(result.skipped_features) == ["id"]  # path, _prob, _margin: not features


def test_write_coverage_files_are_the_result(tmp_path):
    frame = pl.DataFrame({"a": ["x", "y", "x"], "b": ["p", "p", "q"], "error": [1, 0, 0]})
    result = measure_coverage(frame, config=config(t=2))
    parquet, js = write_coverage(result, tmp_path / "out")
    assert parquet.name == COVERAGE_PARQUET and js.name == COVERAGE_JSON
    assert json.loads(js.read_text()) == json.loads(json.dumps(result.to_json()))
    table = pl.read_parquet(parquet)
    assert table.height == 4 + 4 and set(table["t"].to_list()) == {1, 2}
    from clipengine.artifacts import read_parquet_metadata

    assert json.loads(read_parquet_metadata(parquet)["clipengine.coverage"])["coverage"] == result.coverage()


def test_parquet_keeps_pairs_and_missing_beyond_table_rows():
    rng = np.random.default_rng(3)
    frame = pl.DataFrame({f"f{j}": rng.choice(["u", "v", "w"], 200).tolist() for j in range(5)})
    full = measure_coverage(frame, config=config(t=3)).to_polars()
    capped = measure_coverage(frame, config=config(t=3, table_rows=10)).to_polars()
    assert full.height == 5 * 3 + 10 * 9 + 10 * 27
    assert capped.filter(pl.col("t") <= 2).height == 5 * 3 + 10 * 9
    assert capped.filter(pl.col("t") == 3)["covered"].to_list() == [False] * capped.filter(pl.col("t") == 3).height


def test_read_run_table_joins_metadata_and_errors(tmp_path):
    metadata = pl.DataFrame({"path": ["a.jpg", "b.jpg", "c.jpg"], "weather": ["fog", "rain", "fog"],
                             "weather_prob": [0.9, 0.8, 0.7], "weather_margin": [0.5, 0.4, 0.3]})
    errors = pl.DataFrame({"path": ["c.jpg", "a.jpg"], "error": [1, 0], "weather": ["fog", "clear"]})
    metadata.write_parquet(tmp_path / "metadata.parquet")
    errors.write_parquet(tmp_path / "errors.parquet")
    frame = read_run_table(tmp_path)
    assert frame["path"].to_list() == ["a.jpg", "c.jpg"] and frame["error"].to_list() == [0, 1]
    assert frame["given_weather"].to_list() == ["clear", "fog"]
    with pytest.raises(ClipengineError, match="no metadata.parquet"):
        read_run_table(tmp_path / "nothing")


# ---- the command -----------------------------------------------------------------------------------


@pytest.fixture
def table(tmp_path):
    weather = ["fog"] * 40 + ["clear"] * 58 + ["hail"] * 2
    time = ["day"] * 40 + ["night"] * 50 + ["day"] * 10
    path = tmp_path / "t.parquet"
    pl.DataFrame({"weather": weather, "time": time, "season": ["winter", "summer"] * 50,
                  "error": [0, 1] * 50}).write_parquet(path)
    (tmp_path / "odd.yaml").write_text(ISSUE_ODD)
    return path


def test_cli_json_contract(table, tmp_path, capsys):
    from clipengine.cli import main

    with pytest.raises(SystemExit) as code:
        main(["coverage", str(table), "--odd", str(tmp_path / "odd.yaml"), "--t", "2", "--limit", "2", "--json",
              "--out", str(tmp_path / "out")])
    assert code.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert [c["t"] for c in out["coverage"]] == [1, 2]
    assert all({"t", "covered", "valid"} <= set(c) for c in out["coverage"])
    assert all({"predicates", "expected"} <= set(m) for m in out["missing"])
    assert len(out["missing"]) == 2 and out["missing_total"] > 2
    assert isinstance(out["out_of_odd"], int) and out["out_of_odd"] == 2
    counts = [m["count"] for m in out["missing"]]
    assert counts == sorted(counts)
    written = json.loads((tmp_path / "out" / COVERAGE_JSON).read_text())
    assert written["missing_total"] == out["missing_total"] and len(written["missing"]) == 2
    assert (tmp_path / "out" / COVERAGE_PARQUET).is_file()


def test_cli_text_lists_missing_in_words(table, tmp_path, capsys):
    from clipengine.cli import main

    with pytest.raises(SystemExit) as code:
        main(["coverage", str(table), "--odd", str(tmp_path / "odd.yaml"), "--quiet"])
    assert code.value.code == 0
    out = capsys.readouterr().out
    assert "weather = fog AND time = night" in out and "out of the ODD: 2 items" in out


def test_cli_errors_are_one_line_with_exit_code_2(table, tmp_path, capsys):
    from clipengine.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("features: {weather: [fog, fog]}\n")
    # the installed entry point, as a user runs it
    run = subprocess.run([sys.executable, "-m", "clipengine", "coverage", str(table), "--odd", str(bad)],
                         capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "'features.weather' lists 'fog' twice" in lines[0] and "Traceback" not in run.stderr
    for args, message in ((["--features", "weather,nope"], "'nope' not found"), (["--t", "5"], "--t")):
        with pytest.raises(SystemExit) as code:
            main(["coverage", str(table), *args])
        assert code.value.code == 2
        assert message in capsys.readouterr().err


def _run_dir_with_manifest(folder, features):
    """A run directory as ``clipengine run`` leaves it for coverage: metadata, errors (a continuous and a
    categorical dataset column) and the manifest's feature list."""
    from clipengine.bindings.files import write_json

    rng = np.random.default_rng(3)
    n = 60
    paths = [f"img{i:03d}.png" for i in range(n)]
    weather = rng.choice(["fog", "rain", "clear"], n)
    light = rng.choice(["day", "night"], n)
    pl.DataFrame({"path": paths, "weather": weather, "weather_prob": rng.uniform(0.4, 1, n),
                  "weather_margin": rng.uniform(0, 0.5, n), "light": light, "light_prob": rng.uniform(0.4, 1, n),
                  "light_margin": rng.uniform(0, 0.5, n)}).write_parquet(folder / "metadata.parquet")
    pl.DataFrame({"path": paths, "error": rng.integers(0, 2, n), "road": rng.choice(["wet", "dry"], n),
                  "ink": rng.uniform(0, 1, n), "true_weather": weather}).write_parquet(folder / "errors.parquet")
    if features is not None:
        write_json(folder / "manifest.json", {"format": 1, "features": features})
    return folder


def test_a_run_directory_is_covered_over_the_features_its_manifest_records(tmp_path, capsys):
    from clipengine.cli import main
    from clipengine.coverage.inputs import run_features

    run_dir = _run_dir_with_manifest(tmp_path, ["weather", "light", "road", "ink"])
    assert run_features(run_dir) == ["weather", "light", "road", "ink"]
    with pytest.raises(SystemExit) as code:
        main(["coverage", str(run_dir), "--json"])
    assert code.value.code == 0
    out = json.loads(capsys.readouterr().out)
    # the dataset's categorical column is covered, its continuous one left out with the reason
    assert list(out["features"]) == ["weather", "light", "road"]
    assert "continuous numbers" in out["skipped_features"]["ink"]
    frame = read_run_table(run_dir)
    assert out["coverage"][1]["covered"] == sum(len(set(zip(frame[a].to_list(), frame[b].to_list())))
                                                for a, b in itertools.combinations(["weather", "light", "road"], 2))
    # named features stay strict; without the manifest's record, the labelled attributes
    with pytest.raises(SystemExit) as code:
        main(["coverage", str(run_dir), "--features", "weather,ink", "--json"])
    assert code.value.code == 2
    (run_dir / "manifest.json").unlink()
    assert run_features(run_dir) is None
    with pytest.raises(SystemExit):
        main(["coverage", str(run_dir), "--json"])
    assert list(json.loads(capsys.readouterr().out)["features"]) == ["weather", "light"]


def test_optional_features_lower_t_and_skip_what_against_lacks():
    frame = pl.DataFrame({"a": ["x", "y", "x"], "b": ["u", "u", "v"], "c": [0.5, 0.25, 0.125]})
    other = pl.DataFrame({"a": ["x", "x"], "c": [0.5, 0.5]})
    result = measure_coverage(frame, config=config(t=3), features=["a", "b", "c", "gone"], features_optional=True,
                              against=other, against_source="other.parquet")
    assert result.features == ["a"] and result.params["t"] == 1 and result.params["t_requested"] == 3
    assert result.skipped_features["gone"] == "no such column"
    assert result.skipped_features["b"] == "not in the --against table other.parquet"
    assert "continuous" in result.skipped_features["c"]
    with pytest.raises(ClipengineError, match="t = 3 needs at least 3 features"):
        measure_coverage(frame, config=config(t=3), features=["a", "b"])


def test_cli_out_never_overwrites_an_input(tmp_path, capsys):
    from clipengine.cli import main

    (tmp_path / "odd").mkdir()
    odd = tmp_path / "odd" / "coverage.json"  # an ODD file is YAML, and JSON is YAML
    odd.write_text('{"features": {"weather": ["fog", "rain"], "time": ["day", "night"]}}')
    source = tmp_path / "table.csv"
    pl.DataFrame({"weather": ["fog", "rain"], "time": ["day", "night"]}).write_csv(source)
    with pytest.raises(SystemExit) as code:
        main(["coverage", str(source), "--odd", str(odd), "--out", str(odd.parent)])
    assert code.value.code == 2 and "which this run would overwrite" in capsys.readouterr().err
    assert odd.read_text().startswith('{"features"')
    with pytest.raises(SystemExit) as code:
        main(["coverage", str(source), "--odd", str(odd), "--out", str(tmp_path / "out")])
    assert code.value.code == 0 and (tmp_path / "out" / COVERAGE_JSON).is_file()


def test_out_of_odd_examples_name_their_items_by_path_and_box():
    frame = pl.DataFrame({"path": ["a.png", "a.png", "b.png"], "box": [[0.0, 0.0, 4.0, 4.0], [1.0, 2.0, 3.0, 4.0], None],
                          "weather": ["fog", "hail", "hail"], "time": ["day", "day", "night"]})
    odd = parse_odd("features:\n  weather: [fog, rain]\n  time: [day, night]\n")
    result = measure_coverage(frame, config=config(), odd=odd)
    examples = json.loads(json.dumps(result.to_json()["out_of_odd_examples"]))
    assert [(e["row"], e["path"], e["box"]) for e in examples] == [(1, "a.png", [1.0, 2.0, 3.0, 4.0]),
                                                                    (2, "b.png", None)]


def test_an_unsure_label_outside_the_odd_is_unknown_not_out_of_it():
    frame = pl.DataFrame({"weather": ["fog", "hail", "hail", "rain"], "weather_prob": [0.9, 0.3, 0.9, 0.2],
                          "time": ["day", "day", "night", "night"]})
    odd = parse_odd("features:\n  weather: [fog, rain]\n  time: [day, night]\n")
    result = measure_coverage(frame, config=config(min_prob=0.5), odd=odd)
    assert result.out_of_odd == 1 and result.out_of_odd_rows.tolist() == [2]
    assert result.unknown == {"weather": 3, "time": 0}
    assert measure_coverage(frame, config=config(), odd=odd).out_of_odd == 2


def test_a_runs_attributes_take_their_schema_classes_seen_or_not(tmp_path, capsys):
    from clipengine import artifacts
    from clipengine.cli import main
    from clipengine.coverage.inputs import run_values

    run_dir = _run_dir_with_manifest(tmp_path, ["weather", "light", "road"])
    metadata = pl.read_parquet(run_dir / "metadata.parquet")
    schema = {"format": 1, "attributes": [
        {"name": "weather", "classes": [{"name": c, "prompts": []} for c in ("snow", "rain", "fog", "clear")]},
        {"name": "light", "classes": [{"name": c, "prompts": []} for c in ("night", "day")]}]}
    artifacts.write_metadata(run_dir / "metadata.parquet", metadata,
                             {artifacts.META_SCHEMA_CONTENT: json.dumps(schema)})
    assert run_values(run_dir) == {"weather": ["snow", "rain", "fog", "clear"], "light": ["night", "day"]}
    with pytest.raises(SystemExit):
        main(["coverage", str(run_dir), "--json"])
    out = json.loads(capsys.readouterr().out)
    # the schema's order; a class no item was given is missing, a dataset column keeps what it holds
    assert out["features"] == {"weather": ["snow", "rain", "fog", "clear"], "light": ["night", "day"],
                               "road": sorted(set(metadata.join(pl.read_parquet(run_dir / "errors.parquet"),
                                                                on="path")["road"].to_list()))}
    singles = [m["predicates"] for m in out["missing"] if m["t"] == 1]
    assert singles == [{"weather": "snow"}]
    assert (out["coverage"][0]["covered"], out["coverage"][0]["valid"]) == (3 + 2 + 2, 4 + 2 + 2)
    assert run_values(tmp_path / "nowhere") == {}


@pytest.mark.parametrize("seed", [0, 1])
def test_against_matches_brute_force_set_differences(seed):
    rng = np.random.default_rng(seed)
    names = ["a", "b", "c", "d"]

    def table(n, skew):
        return pl.DataFrame({name: rng.choice([f"{name}{v}" for v in range(3)], n, p=skew) for name in names})

    here, there = table(60, [0.6, 0.3, 0.1]), table(40, [0.2, 0.3, 0.5])
    result = measure_coverage(here, config=config(t=3, min_count=2, limit=10_000), against=there)
    against = result.to_json()["against"]
    values = {name: sorted(set(here[name]) | set(there[name])) for name in names}
    for t in (1, 2, 3):
        counted = {}
        for label, frame in (("here", here), ("there", there)):
            rows = Counter()
            for subset in itertools.combinations(names, t):
                rows.update((subset, tuple(r)) for r in frame.select(subset).iter_rows())
            counted[label] = {key for key, n in rows.items() if n >= 2}
        every = {(subset, combo) for subset in itertools.combinations(names, t)
                 for combo in itertools.product(*(values[n] for n in subset))}
        entry = against["coverage"][t - 1]
        assert entry["valid"] == len(every)
        assert (entry["covered_this"], entry["covered_other"]) == (len(counted["here"]), len(counted["there"]))
        assert entry["common"] == len(counted["here"] & counted["there"])

        def listed(key):
            return {(tuple(c["predicates"]), tuple(c["predicates"].values()))
                    for c in against[key]["combinations"] if c["t"] == t}

        assert listed("this_not_other") == counted["here"] - counted["there"]
        assert listed("other_not_this") == counted["there"] - counted["here"]
    for key, side in (("this_not_other", "count"), ("other_not_this", "count_other")):
        listing = against[key]
        assert listing["total"] == len(listing["combinations"])
        assert [c[side] for c in listing["combinations"]] == sorted((c[side] for c in listing["combinations"]),
                                                                   reverse=True)
    capped = result.differences(3)
    assert len(capped["other_not_this"]["combinations"]) == 3
    assert capped["other_not_this"]["total"] == against["other_not_this"]["total"]
