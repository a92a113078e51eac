"""How auto chooses the CPU path: the rule on injected measurements (CPUs this machine is not), and the
real, cached probe on this CPU."""

import json

import pytest

from clipengine.encode.auto import MIN_COSINE, decide_cpu_path
from clipengine.errors import ClipengineError


def rates(**paths):
    """{"torch-fp32": (img/s, cosine) or "skipped reason"} → measure_paths' form."""
    out = {}
    for name, value in paths.items():
        name = name.replace("_", "-")
        out[name] = {"skipped": value} if isinstance(value, str) else {"img_s": value[0], "cosine": value[1]}
    return out


# the shapes of what others measured (issue 20): an AMX CPU, and one with only AVX512-BF16 where bf16 is slower
AMX = rates(torch_fp32=(24, 1.0), torch_bf16=(91, 0.99994), onnxruntime_fp32=(27, 1.0), onnxruntime_int8=(40, 0.9991))
AVX512_BF16_ONLY = rates(torch_fp32=(21, 1.0), torch_bf16=(15, 0.99994), onnxruntime_fp32=(21.5, 1.0),
                         onnxruntime_int8=(30, 0.9991))
NO_BF16 = rates(torch_fp32=(12, 1.0), torch_bf16="no bf16 instructions", onnxruntime_fp32=(14, 1.0),
                onnxruntime_int8=(13, 0.99995))


def test_amx_cpu_takes_bf16():
    choice = decide_cpu_path(AMX)
    assert (choice.backend, choice.precision) == ("torch", "bf16")
    assert "torch-bf16 3.79×" in choice.reason and f"onnxruntime-int8 not taken: cosine 0.99910 < {MIN_COSINE}" in choice.reason


def test_a_cpu_where_bf16_is_slower_keeps_fp32_and_int8_below_the_cosine_bar_is_never_taken():
    choice = decide_cpu_path(AVX512_BF16_ONLY)
    # int8 is the fastest but changes the rows too much; ONNX Runtime is within the noise margin
    assert (choice.backend, choice.precision) == ("torch", "fp32")


def test_a_faster_path_that_keeps_the_rows_wins():
    choice = decide_cpu_path(NO_BF16)
    assert (choice.backend, choice.precision) == ("onnxruntime", "fp32")  # 14 / 12 ≥ the margin; int8 slower
    assert "torch-bf16 set aside: no bf16 instructions" in choice.reason
    faster_int8 = {**NO_BF16, "onnxruntime-int8": {"img_s": 30.0, "cosine": 0.99995}}
    assert (decide_cpu_path(faster_int8).backend, decide_cpu_path(faster_int8).precision) == ("onnxruntime", "int8")


def test_the_users_backend_or_precision_bound_the_choice():
    assert decide_cpu_path(AMX, precision="fp32").backend == "onnxruntime"  # 27 / 24 = 1.125
    assert decide_cpu_path(AMX, backend="onnxruntime").precision == "fp32"  # int8 fails the cosine bar
    assert decide_cpu_path(AVX512_BF16_ONLY, backend="torch").precision == "fp32"
    assert decide_cpu_path(AMX, backend="torch", precision="bf16").precision == "bf16"
    with pytest.raises(ClipengineError, match="no CPU encode path could be measured"):
        decide_cpu_path(NO_BF16, backend="torch", precision="bf16")


def test_a_precision_the_user_names_is_taken_below_the_cosine_bar_with_the_cosine_said():
    choice = decide_cpu_path(AMX, precision="int8")
    assert (choice.backend, choice.precision) == ("onnxruntime", "int8")
    assert "cosine 0.99910 < 0.9999, taken as --precision int8 asks" in choice.reason
    with_torch = {**AMX, "torch-int8": {"img_s": 50.0, "cosine": 0.99995}}
    assert decide_cpu_path(with_torch, precision="int8").backend == "torch"  # the faster int8 of the two


def test_without_amx_the_int8_matmuls_carry_the_cpu_where_they_keep_the_rows():
    vnni = {**AVX512_BF16_ONLY, "torch-int8": {"img_s": 40.0, "cosine": 0.99998}}
    choice = decide_cpu_path(vnni)
    assert (choice.backend, choice.precision) == ("torch", "int8") and "torch-int8 1.90×" in choice.reason
    drifting = {**vnni, "torch-int8": {"img_s": 40.0, "cosine": 0.99970}}
    assert decide_cpu_path(drifting).precision == "fp32"


def test_probe_shape_copies_the_models_tower(tiny_clip):
    from clipengine.bindings.cpu_probe import ProbeShape, probe_towers
    from clipengine.encode.models import load_model, resolve_model

    towers = load_model(resolve_model(tiny_clip.model_config))
    shape = ProbeShape.of_tower(towers.image_tower, towers.image_size, towers.embed_dim)
    assert shape == ProbeShape(image_size=32, patch=8, width=64, heads=2, mlp_width=256, output_dim=32, layers=2)
    probe = probe_towers(shape, 3)
    assert len(probe.image_tower.transformer.resblocks) == 3 and probe.image_tower.conv1.kernel_size == (8, 8)
    assert probe.key != probe_towers(shape, 1).key  # each depth has its own cached graph
    assert ProbeShape.of_tower(object(), 224, 512) is None


def test_the_probe_towers_run_the_models_activation():
    """OpenAI's weights use QuickGELU, which the fused forward runs as a different post-op than GELU: the
    probe measures the model's own, and caches it apart."""
    from types import SimpleNamespace

    import torch
    from open_clip.transformer import QuickGELU

    from clipengine.bindings.cpu_probe import ProbeShape, probe_key, probe_towers
    from clipengine.bindings.open_clip_vit import vision_from_checkpoint

    from tests.bindings.test_open_clip_vit import architecture, built_model
    from tests.bindings.vit_variants import variants, vision

    visual = vision(**variants()["quick-gelu"])
    shape = ProbeShape.of_tower(visual, 32, 24)
    assert shape.activation == "quick_gelu"
    assert isinstance(probe_towers(shape, 1).image_tower.transformer.resblocks[0].mlp.gelu, QuickGELU)
    plain = ProbeShape.of_tower(vision(), 32, 24)
    assert plain.activation == "gelu" and probe_key(plain, 2) != probe_key(shape, 2)
    assert isinstance(probe_towers(plain, 1).image_tower.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    # read from a checkpoint (the encoder's path: no module built)
    arch = architecture({"top": {"quick_gelu": True}})
    read, _ = vision_from_checkpoint(arch, built_model(arch).state_dict())
    assert ProbeShape.of_towers(SimpleNamespace(vision=read, image_size=32, embed_dim=24)).activation == "quick_gelu"


def test_the_models_rate_is_predicted_at_its_depth():
    from clipengine.bindings.cpu_probe import predicted_seconds

    # 1 block: 0.3 s, 3 blocks: 0.5 s → 0.1 s per block, 0.2 s once per batch → 12 blocks: 1.4 s
    assert predicted_seconds(0.3, 0.5, 1, 3, 12) == pytest.approx(1.4)
    assert predicted_seconds(0.3, 0.5, 1, 3, 1) == pytest.approx(0.3)
    # noise made the deeper probe faster: every second of it counts as blocks
    assert predicted_seconds(0.5, 0.45, 1, 3, 12) == pytest.approx(1.8)


@pytest.fixture(scope="module")
def measured(tiny_clip, tmp_path_factory):
    """The real probe of the tiny model's shape on this CPU, in a cache of its own."""
    from clipengine.bindings.cpu_probe import ProbeShape, cached_measurements

    cache = tmp_path_factory.mktemp("probe-cache")
    shape = ProbeShape(image_size=32, patch=8, width=64, heads=2, mlp_width=256, output_dim=32, layers=12)
    return shape, cache, cached_measurements(shape, num_threads=2, cache_dir=cache)


def test_the_probe_measures_every_path_this_cpu_has(measured):
    from clipengine import bindings

    _, _, record = measured
    paths = record["measured"]
    assert set(paths) == {"torch-fp32", "torch-bf16", "torch-int8", "onnxruntime-fp32", "onnxruntime-int8"}
    for name in ("torch-fp32", "torch-int8", "onnxruntime-fp32", "onnxruntime-int8"):
        assert paths[name]["img_s"] > 0 and -1 <= paths[name]["cosine"] <= 1.0001, name
    assert paths["torch-fp32"]["cosine"] > 0.99999 and paths["onnxruntime-fp32"]["cosine"] > 0.9999
    assert paths["torch-int8"]["cosine"] > 0.99
    if bindings.cpu_supports_bf16():
        assert paths["torch-bf16"]["img_s"] > 0 and paths["torch-bf16"]["cosine"] > 0.999
    else:
        assert "no bf16 instructions" in paths["torch-bf16"]["skipped"]
    assert record["cached"] is False and record["cpu"]["threads"] == 2 and record["probe"]["depths"] == [1, 3]
    for name in ("torch-fp32", "onnxruntime-fp32"):  # the 12-block prediction is no faster than the 3-block probe
        assert paths[name]["img_s"] <= paths[name]["probe_img_s"]["3"]
    assert record["cpu"]["amx"] == ("amx_bf16" in bindings.cpu_flags())


def test_the_measurement_is_cached_per_cpu_and_threads_and_a_busy_one_is_taken_again(measured, monkeypatch):
    from clipengine.bindings import cpu_probe

    shape, cache, first = measured
    again = cpu_probe.cached_measurements(shape, num_threads=2, cache_dir=cache)
    assert again["cached"] is True and again["measured"] == first["measured"] and again["file"] == first["file"]
    assert cpu_probe.probe_key(shape, 1) != cpu_probe.probe_key(shape, 2)
    # an entry measured while the machine was busy is measured again once the machine is quiet
    entry = json.loads(open(first["file"]).read())
    entry["busy"] = True
    open(first["file"], "w").write(json.dumps(entry))
    monkeypatch.setattr(cpu_probe, "machine_load", lambda: 1e9)
    assert cpu_probe.cached_measurements(shape, num_threads=2, cache_dir=cache)["cached"] is True  # still busy
    monkeypatch.setattr(cpu_probe, "machine_load", lambda: 0.0)
    fresh = cpu_probe.cached_measurements(shape, num_threads=2, cache_dir=cache)
    assert fresh["cached"] is False and fresh["busy"] is False


def test_auto_encoder_records_its_choice(tiny_clip, tmp_path, monkeypatch):
    """create_encoder with nothing fixed on the CPU runs the probe's choice and model.json says why."""
    from clipengine import artifacts
    from clipengine.config import EncodeConfig
    from clipengine.encode.encoders import create_encoder

    monkeypatch.setenv("CLIPENGINE_NUM_THREADS", "2")
    encoder = create_encoder(EncodeConfig(model=tiny_clip.model_config))
    record = encoder.model_record
    choice = record[artifacts.RECORD_AUTO_CHOICE]
    assert choice["chosen"] == f"{record['backend']} {record['precision']}"
    assert choice["reason"].startswith("measured on this CPU") and set(choice["measured"]) >= {"torch-fp32"}
    assert choice == {**choice, **decide_cpu_path(choice["measured"]).record()}  # the rule on what was measured
    # the user's precision bounds it; both fixed: nothing measured, nothing recorded
    fp32 = create_encoder(EncodeConfig(model=tiny_clip.model_config, precision="fp32")).model_record
    assert fp32["precision"] == "fp32" and fp32[artifacts.RECORD_AUTO_CHOICE]["cached"] is True
    fixed = create_encoder(EncodeConfig(model=tiny_clip.model_config, backend="torch", precision="fp32")).model_record
    assert artifacts.RECORD_AUTO_CHOICE not in fixed
    with pytest.raises(ClipengineError, match="runs on cuda"):
        create_encoder(EncodeConfig(model=tiny_clip.model_config, backend="tensorrt"))


def test_a_winner_that_changes_the_numbers_is_checked_on_the_whole_model(tiny_clip, tmp_path, monkeypatch):
    """Rule 3: the probe's winner (bf16 here) is set aside when the whole model's rows fall below the bar; the
    real check on the tiny model is cached."""
    from clipengine.bindings import cpu_probe
    from clipengine.encode import auto
    from clipengine.encode.models import load_model, resolve_model

    towers = load_model(resolve_model(tiny_clip.model_config))
    monkeypatch.setattr(cpu_probe, "cached_measurements", lambda shape, **_: {"measured": AMX})
    monkeypatch.setattr(cpu_probe, "model_cosine", lambda towers, path, **_: 0.9995 if path == "torch-bf16" else 1.0)
    choice = auto.choose_cpu_path(towers, backend="torch", precision=None, num_threads=2, cache_dir=tmp_path)
    assert (choice.backend, choice.precision) == ("torch", "fp32")
    assert "torch-bf16 set aside: the whole model's cosine 0.99950 < 0.9999" in choice.reason
    monkeypatch.undo()
    cosine = cpu_probe.model_cosine(towers, "torch-bf16", num_threads=2, cache_dir=tmp_path)
    assert 0.999 < cosine <= 1.0001 and list((tmp_path / "cpu-probe").glob("cosine-*.json"))
