import json
import subprocess
import sys

import pytest
from click.testing import CliRunner


def test_bench_group_lists_the_encode_benchmark():
    from clipengine.cli import cli

    result = CliRunner().invoke(cli, ["bench", "--help"])
    assert result.exit_code == 0 and "encode" in result.output and "Example" in result.output
    assert "_machine" not in result.output  # a helper module, not a benchmark


@pytest.mark.parametrize("model, published", [("ViT-B-32", 8.82), ("ViT-B-16", 35.1), ("ViT-L-14", 162.0)])
def test_flop_count_matches_open_clips_published_profile(model, published):
    """The count the achieved fraction of the GEMM peak rests on, against open_clip's docs/model_profile.csv."""
    import open_clip

    from clipengine.bench.encode import vit_gflops, vit_shape

    shape = vit_shape(open_clip.get_model_config(model))
    assert vit_gflops(shape, class_token_last_block=False) == pytest.approx(published, abs=0.06)
    # the class-token-only last block drops the other tokens' query, output projection and MLP work
    assert vit_gflops(shape, class_token_last_block=True) < vit_gflops(shape, class_token_last_block=False)


def test_gemm_rate_is_a_rate_of_the_named_shapes():
    from clipengine.bench.encode import gemm_gflops, gemm_shapes

    shapes = gemm_shapes({"image_size": 224, "patch": 32, "width": 768, "mlp_width": 3072, "output_dim": 512}, 2)
    assert shapes["mlp up"] == (100, 768, 3072) and shapes["mlp down"] == (100, 3072, 768)
    rates = gemm_gflops(64, 64, 64, "fp32", seconds=0.01)
    assert set(rates) >= {"torch.mm"} and all(rate > 0 for rate in rates.values())


@pytest.mark.slow
def test_encode_benchmark_runs_whole_processes_and_reports_limits(tmp_path):
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "clipengine", "bench", "encode", "--images", "6", "--batch-size", "3",
         "--model-batches", "1", "--rounds", "1", "--peers", "plain,tuned-fp32", "--json", str(out)],
        capture_output=True, text=True, timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    whole = report["whole"]
    assert set(whole) == {"cold", "warm", "plain", "tuned-fp32"}
    assert report["best_peer"] in ("plain", "tuned-fp32")
    for side in ("cold", "warm"):
        assert whole[side]["vs_plain"] > 0 and whole[side]["cosine_to_plain"] > 0.99
        assert whole[side]["peak_rss_mb"] > 100
    assert whole["warm"]["choice"].split()[0] in ("torch", "onnxruntime")
    bounds = report["bounds"]
    assert 0 < bounds["model_fraction_of_peak"] and bounds["shared_cores_img_s"] <= bounds["min_model_decode_img_s"]
    assert report["machine"]["cores"] >= 1 and "amx" in report["machine"]
    assert 0.9 < report["limits"]["int8_whole_model"]["cosine_to_fp32"] <= 1.0001
    assert [row["met"] in (True, False) for row in report["targets"]]
    assert "GEMM at the ViT's shapes" in done.stdout and report["machine"]["cpu"] in done.stdout
