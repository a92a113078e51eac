"""``clipengine compare`` as CI runs it: a subprocess, its exit status, JSON on stdout, findings on stderr."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.fixtures_compare import PLANTED, make_items, planted_errors, write_run_dir

SLICE_KEYS = {"predicates", "status", "old_size", "new_size", "old_error_mean", "new_error_mean", "diff", "ci_low",
              "ci_high", "p_value", "q_value"}
DRIFT_KEYS = {"attribute", "p_value", "q_value", "psi"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs over the same items; the new one fails more inside the planted slice."""
    root = tmp_path_factory.mktemp("compare-cli")
    rng = np.random.default_rng(21)
    items = make_items(rng, 3000)
    old, new = planted_errors(rng, items, planted=0.6)
    return write_run_dir(root / "old", items, old), write_run_dir(root / "new", items, new)


def clipengine(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipengine", *args], capture_output=True, text=True, timeout=300)


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    """The same entry point in this process: (exit status, stdout, stderr)."""
    from clipengine.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_fail_on_worse_exits_1_with_one_line_per_finding(runs):
    old, new = runs
    done = clipengine("compare", str(old), str(new), "--json", "--fail-on", "worse")
    assert done.returncode == 1, done.stderr
    document = json.loads(done.stdout)  # stdout is the JSON object alone
    assert {r["status"] for r in document["slices"]} <= {"worse", "better", "new", "gone", "unchanged"}
    assert all(SLICE_KEYS <= set(r) for r in document["slices"])
    assert all(DRIFT_KEYS <= set(r) for r in document["drift"])
    worse = [r for r in document["slices"] if r["status"] == "worse"]
    assert any(r["predicates"] == PLANTED for r in worse)
    assert all(r["q_value"] <= 0.05 and r["diff"] > 0 for r in worse)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == len(worse) and all(line.startswith("clipengine compare: worse: ") for line in lines)
    assert "weather = fog AND time = night" in done.stderr


def test_nothing_to_fail_on_exits_0(runs):
    old, new = runs
    done = clipengine("compare", str(old), str(new), "--fail-on", "drift")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "slices:" in done.stdout and "drift: 0 of 5 attributes" in done.stdout
    assert "worse: weather = fog AND time = night" in done.stdout  # listed, but not what fails the job


@pytest.mark.parametrize("args", [(), ("--fail-on", "none"), ("--fail-on", "new"),
                                  ("--fail-on", "worse", "--min-diff", "0.9"), ("--fail-on", "worse", "--max-q", "1e-30")])
def test_other_settings_with_nothing_to_fail_on(runs, capsys, args):
    old, new = runs
    code, out, err = in_process(capsys, "compare", str(old), str(new), *args)
    assert code == 0 and err == ""


def test_several_kinds_and_the_reverse_direction(runs, capsys):
    old, new = runs
    # new → old: the planted slice got better, which no --fail-on kind counts
    code, out, err = in_process(capsys, "compare", str(new), str(old), "--fail-on", "worse,new", "--fail-on", "drift")
    assert code == 0 and err == ""
    assert "better: weather = fog AND time = night" in out
    code, out, err = in_process(capsys, "compare", str(old), str(new), "--fail-on", "drift,worse")
    assert code == 1 and err.count("clipengine compare: worse:") >= 1


def test_errors_exit_2_with_one_line(runs, tmp_path, capsys):
    old, _ = runs
    done = clipengine("compare", str(old), str(tmp_path / "missing"), "--fail-on", "worse")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("clipengine: error:")
    code, _, err = in_process(capsys, "compare", str(old), str(old), "--fail-on", "sideways")
    assert code == 2 and "sideways" in err


def test_out_writes_compare_json_and_the_items(runs, tmp_path, capsys):
    import polars as pl

    old, new = runs
    code, _, err = in_process(capsys, "compare", str(old), str(new), "--out", str(tmp_path / "out"))
    assert code == 0, err
    document = json.loads((tmp_path / "out" / "compare.json").read_text())
    items = pl.read_parquet(tmp_path / "out" / "compare_items.parquet")
    assert items.columns == ["path", "old_error", "new_error", "change"]
    assert (items["change"] == "newly failing").sum() == document["items"]["newly_failing"] > 0
