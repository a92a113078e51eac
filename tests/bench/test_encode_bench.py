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


def test_attention_part_and_linear_part_match_torch_s_flop_counter():
    """The split the forward's profile is judged by: attention's matmuls (scores, weighted values) against the
    batched matmuls of the math attention, the rest against the convolution and linear layers, as counted by
    torch's FLOP counter on open_clip's module (with autograd on, so attention leaves the fused fast path)."""
    import open_clip
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from clipengine.bench.encode import vit_attention_gflops, vit_gflops, vit_shape

    config = open_clip.get_model_config("ViT-B-32")
    model = open_clip.create_model("ViT-B-32").eval()
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model.visual(torch.randn(1, 3, 224, 224))
    counts = {str(op): flops / 1e9 for op, flops in counter.get_flop_counts()["Global"].items()}
    shape = vit_shape(config)
    attention = vit_attention_gflops(shape, class_token_last_block=False)
    assert attention == pytest.approx(counts["aten.bmm"], rel=1e-9)
    linear = counts["aten.convolution"] + counts["aten.addmm"] + counts.get("aten.mm", 0.0)
    assert vit_gflops(shape, class_token_last_block=False) - attention == pytest.approx(linear, rel=1e-9)
    # the class-token-only last block: one query row's scores and weighted values in the last block
    tokens = 50
    assert attention - vit_attention_gflops(shape, class_token_last_block=True) == pytest.approx(
        2 * 2 * (tokens - 1) * tokens * 768 / 1e9)


def test_gemm_rate_is_a_rate_of_the_named_shapes():
    from clipengine.bench.encode import gemm_gflops, gemm_shapes

    shapes = gemm_shapes({"image_size": 224, "patch": 32, "width": 768, "mlp_width": 3072, "output_dim": 512}, 2)
    assert shapes["mlp up"] == (100, 768, 3072) and shapes["mlp down"] == (100, 3072, 768)
    rates = gemm_gflops(64, 64, 64, "fp32", seconds=0.01)
    assert set(rates) >= {"torch.mm"} and all(rate > 0 for rate in rates.values())


def test_cold_gemm_rate_evicts_before_every_call_and_is_timed_without_the_eviction():
    import time

    from clipengine.bench.encode import gemm_gflops

    evictions = []
    hot = gemm_gflops(64, 64, 64, "fp32", seconds=0.01)

    def evict():  # 30 ms of work: timed with the call, it would hold every rate under 2 · 64³ / 30 ms
        evictions.append(1)
        started = time.perf_counter()
        while time.perf_counter() - started < 0.03:
            pass

    cold = gemm_gflops(64, 64, 64, "fp32", seconds=0.01, evict=evict)
    assert set(cold) == set(hot) and len(evictions) >= 3 * len(cold)
    assert all(rate > 2 * 64**3 / 0.01 / 1e9 for rate in cold.values()), cold


def test_gemm_rate_in_streams_runs_the_shares_side_by_side_and_sums_them(monkeypatch):
    import threading
    import time

    import torch

    from clipengine.bench import encode

    calls = []

    def fake_calls(m, k, n, dtype_name):
        def call():  # 10 ms a call, whatever the size: a stream's rate is then 2·m·k·n / 10 ms
            started = time.perf_counter()
            time.sleep(0.01)
            calls.append((threading.get_ident(), m, torch.get_num_threads(), started, time.perf_counter()))
        return {"oneDNN linear": call}

    monkeypatch.setattr(encode, "_gemm_calls", fake_calls)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rates = encode.gemm_gflops(101, 8, 4, "bf16", seconds=0.05, streams=2)
        started_later = []  # a thread started afterwards gets the caller's count again, not a stream's
        thread = threading.Thread(target=lambda: started_later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert torch.get_num_threads() == 2 and started_later == [2]
    finally:
        torch.set_num_threads(previous)
    assert list(rates) == ["oneDNN linear in 2 streams"]
    assert sorted({(call[1], call[2]) for call in calls}) == [(50, 1), (51, 1)]  # rows and threads shared out
    per_stream = {thread: [call for call in calls if call[0] == thread] for thread in {call[0] for call in calls}}
    assert len(per_stream) == 2
    first, second = per_stream.values()
    assert first[-1][4] > second[0][3] and second[-1][4] > first[0][3]  # the streams' calls overlap in time
    expected = 2.0 * 101 * 8 * 4 / 0.01 / 1e9  # the two streams' rates summed
    assert 0.5 * expected < rates["oneDNN linear in 2 streams"] <= expected * 1.01


def test_cache_evicter_writes_twice_the_last_level_cache(tmp_path, monkeypatch):
    from clipengine.bench import _machine
    from clipengine.bench.encode import cache_evicter

    for index, size in enumerate(["48K", "2048K", "30M", "bogus"]):  # L1, L2, L3 and a line sysfs never writes
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert _machine.last_level_cache_bytes(tmp_path) == 30 * 2**20
    assert _machine.last_level_cache_bytes(tmp_path / "absent") == 0
    monkeypatch.setattr(_machine, "last_level_cache_bytes", lambda: 40 * 2**20)
    buffer = cache_evicter()()
    assert buffer.numel() * buffer.element_size() == 80 * 2**20 and bool((buffer == 1).all())


def test_op_times_split_into_matmuls_attention_norms_and_the_rest():
    from clipengine.bench.encode import split_op_seconds

    parts = split_op_seconds({"mkldnn::_linear_pointwise": 0.25, "onednn::qlinear_pointwise": 0.05, "aten::addmm": 0.01,
                              "aten::_scaled_dot_product_flash_attention_for_cpu": 0.07, "aten::native_layer_norm": 0.02,
                              "aten::aminmax": 0.03, "aten::copy_": 0.01}, wall_seconds=0.5)
    assert parts == pytest.approx({"matmuls": 0.31, "attention": 0.07, "norms": 0.02, "other torch ops": 0.04,
                                   "outside torch ops": 0.06})


def test_a_fused_forward_s_profile_accounts_for_its_wall_time():
    import torch

    from clipengine.bench.encode import forward_time_split
    from clipengine.bindings.torch_vit_cpu import FusedVisionTransformer, fused_linear_available

    from tests.bindings.vit_variants import variants, vision

    if not fused_linear_available():
        pytest.skip("no oneDNN linear in this torch build")
    visual = vision(**next(iter(variants().values())))
    forward = FusedVisionTransformer(visual, torch.float32)
    size = visual.image_size[0]
    pixels = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    split = forward_time_split(lambda: forward(pixels), repeats=3)
    parts = split["parts_s"]
    assert parts["matmuls"] > 0 and parts["attention"] > 0 and parts["norms"] > 0
    assert sum(parts.values()) == pytest.approx(split["wall_s"], rel=1e-6)


def test_int8_gemm_rate_is_the_int8_forms_call():
    from clipengine.bench.encode import gemm_gflops
    from clipengine.bindings.torch_vit_cpu import int8_linear_available

    rates = gemm_gflops(64, 96, 32, "int8", seconds=0.01)
    if not int8_linear_available():
        assert rates == {}
        return
    assert set(rates) == {"oneDNN int8 linear"} and rates["oneDNN int8 linear"] > 0


@pytest.mark.parametrize("class_token_last_block", [False, True])
def test_int8_part_is_every_block_s_qkv_and_mlp(class_token_last_block):
    """What the int8 form leaves in fp32 is the patch embedding, the attention's scores and weighted values,
    its output projection and the final projection: counted here on their own."""
    import open_clip

    from clipengine.bench.encode import vit_gflops, vit_int8_gflops, vit_shape

    shape = vit_shape(open_clip.get_model_config("ViT-B-32"))
    tokens, width, layers = 50, shape["width"], shape["layers"]
    last_queries = 1 if class_token_last_block else tokens
    fp32_part = (49 * 3 * 32 * 32 * width + width * shape["output_dim"]
                 + (layers - 1) * (2 * tokens * tokens * width + tokens * width * width)
                 + 2 * last_queries * tokens * width + last_queries * width * width)
    total = vit_gflops(shape, class_token_last_block=class_token_last_block)
    int8_part = vit_int8_gflops(shape, class_token_last_block=class_token_last_block)
    assert total - int8_part == pytest.approx(2 * fp32_part / 1e9)


def test_int8_fraction_of_peak_weighs_each_matmul_at_its_own_precision_s_peak():
    from clipengine.bench.encode import summarize

    def limits(precision):
        return {"record": {"precision": precision}, "model_only_img_s": {"clipengine": 50.0},
                "gflops_per_image": 8.0, "int8_gflops_per_image": 6.0, "decode_img_s": 400.0,
                "gemm_gflops": {"fp32": {"qkv": {"torch.mm": 300.0}}, "bf16": {"qkv": {"torch.mm": 200.0}},
                                "int8": {"qkv": {"oneDNN int8 linear": 1000.0},
                                         "mlp": {"oneDNN int8 linear": 600.0}}}}

    reports = {precision: {"images": 10, "rounds": [{"plain": {"seconds": 1.0, "peak_rss_mb": 1}}],
                           "machine": {"amx": False}, "limits": limits(precision)} for precision in ("int8", "fp32")}
    for report in reports.values():
        summarize(report)
    assert reports["int8"]["bounds"]["model_fraction_of_peak"] == pytest.approx(50.0 * (6.0 / 1000.0 + 2.0 / 300.0))
    assert reports["fp32"]["bounds"]["model_fraction_of_peak"] == pytest.approx(50.0 * 8.0 / 300.0)
    assert reports["int8"]["bounds"]["peak_precision"].startswith("int8")


def test_profile_bounds_put_the_linear_layers_at_the_peak_and_keep_the_rest_as_measured():
    from clipengine.bench.encode import summarize

    limits = {"record": {"precision": "bf16"}, "model_only_img_s": {"clipengine": 100.0}, "gemm_batch": 10,
              "gflops_per_image": 8.0, "attention_gflops_per_image": 0.1, "decode_img_s": 400.0,
              "gemm_gflops": {"fp32": {"qkv": {"torch.mm": 300.0}}, "bf16": {"qkv": {"torch.mm": 2000.0},
                                                                          "mlp": {"oneDNN linear": 1600.0}}},
              "gemm_gflops_cold": {"bf16": {"qkv": {"torch.mm": 1000.0, "oneDNN linear": 1200.0}}},
              "forward_split": {"wall_s": 0.1, "parts_s": {"matmuls": 0.06, "attention": 0.03, "norms": 0.01}}}
    report = {"images": 10, "rounds": [{"plain": {"seconds": 1.0, "peak_rss_mb": 1}}],
              "machine": {"amx": True}, "limits": limits}
    summarize(report)
    bounds = report["bounds"]
    assert bounds["gemm_cold_gflops"] == {"bf16": 1200.0}
    assert bounds["model_fraction_of_peak"] == pytest.approx(100.0 * 8.0 / 2000.0)
    # per image: linear layers 6 ms as profiled against 7.9 GFLOP at 2,000 (3.95 ms) or at 1,200 cold (6.58 ms)
    split = bounds["forward_split"]
    assert split["matmul_fraction_of_peak"] == pytest.approx(7.9 / 2000.0 / 0.006)
    assert split["matmul_fraction_of_cold"] == pytest.approx(7.9 / 1200.0 / 0.006)
    # the rest (4 ms per image) stays: 8 GFLOP at the peak (4 ms) over 3.95 + 4 ms
    assert split["ceiling_fraction"] == pytest.approx((8.0 / 2000.0) / (7.9 / 2000.0 + 0.004))
    limits["forward_split"]["parts_s"]["matmuls"] = 0.0  # a backend whose ops the profiler does not see
    summarize(report)
    assert "forward_split" not in report["bounds"] and report["targets"]


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
    if whole["warm"]["choice"].startswith("torch"):
        split = bounds["forward_split"]
        assert 0 < split["matmul_fraction_of_peak"] and 0 < split["ceiling_fraction"]
        assert split["matmul_fraction_of_cold"] > 0 and "where one batch of 3 goes" in done.stdout
    assert report["machine"]["cores"] >= 1 and "amx" in report["machine"]
    assert 0.9 < report["limits"]["int8_whole_model"]["onnxruntime"]["cosine_to_fp32"] <= 1.0001
    assert 0.99 < report["limits"]["int8_whole_model"]["torch"]["cosine_to_fp32"] <= 1.0001
    assert [row["met"] in (True, False) for row in report["targets"]]
    assert "GEMM at the ViT's shapes" in done.stdout and report["machine"]["cpu"] in done.stdout


def test_amx_held_back_from_onednn_is_said_and_judged_as_a_cpu_without_amx():
    from clipengine.bench._machine import machine_line
    from clipengine.bench.encode import targets

    machine = {"cpu": "Xeon", "amx": True, "amx_in_use": False, "onednn_max_cpu_isa": "AVX512_CORE_BF16",
               "avx512_bf16": True, "flags": ["amx_bf16"], "cores": 2, "date": "2026-12-07 12:00 UTC"}
    assert "AMX not used (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16)" in machine_line(machine)
    report = {"machine": machine, "whole": {"warm": {"vs_plain": 2.0, "vs_best_peer": 1.2}}, "best_peer": "plain",
              "bounds": {"peak_precision": "fp32", "model_fraction_of_peak": 0.75}}
    assert [(row["target"].split(" (")[0], row["met"]) for row in targets(report)] == [
        ("≥ 1.5× open_clip plain", True), ("model only ≥ 70 % of the measured fp32 GEMM peak", True)]
    report["machine"] = {**machine, "amx_in_use": True}
    assert [row["met"] for row in targets(report)] == [False, False, True]  # 3× plain and 1.5× the best peer
