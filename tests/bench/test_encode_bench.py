import json
import subprocess
import sys

import pytest
from click.testing import CliRunner


def test_bench_group_lists_the_encode_benchmark():
    from clipengine.cli import cli

    result = CliRunner().invoke(cli, ["bench", "--help"])
    assert result.exit_code == 0 and "encode" in result.output and "Example" in result.output


@pytest.mark.slow
def test_encode_benchmark_runs_and_reports_ratios(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "clipengine", "bench", "encode", "--images", "6", "--batch-size", "3",
         "--model-batches", "1", "--rounds", "1", "--pairs", "2", "--configs", "torch-bf16", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    names = [r["name"] for r in report["results"]]
    assert names == ["open_clip-eager-fp32", "torch-bf16"]
    bf16 = report["results"][1]
    assert bf16["e2e_images"] == 6 and bf16["model_cosine_min"] >= 0.999 and bf16["e2e_ratio"] > 0
    assert bf16["peak_rss_mb"] > 100
    paired = report["paired"]
    assert len(paired["pairs"]) == len(paired["ratios"]) == 2 and paired["images"] == 6
    assert paired["e2e_ratio_range"][0] <= paired["e2e_ratio"] <= paired["e2e_ratio_range"][1]
