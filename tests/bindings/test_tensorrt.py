"""TensorRT: the parts that run without a GPU here, and the GPU checks (skipped without one)."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from tests.bindings.reference import cosine, open_clip_reference


def test_module_imports_without_tensorrt_and_the_registry_explains():
    code = "import sys, clipengine.bindings.tensorrt as m; print(m.TensorRTEncoder.backend, 'tensorrt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "tensorrt" and out[1] == "False"
    from clipengine import bindings

    if importlib.util.find_spec("tensorrt") is None:
        assert "not installed" in bindings.check_backend("tensorrt", "cuda", "fp16")
    assert "runs on cuda" in bindings.check_backend("tensorrt", "cpu", "fp16")


def test_plan_cache_key_covers_graph_shapes_precision_version_and_gpu():
    from clipengine.bindings.tensorrt import PlanSettings, plan_cache_key

    base = PlanSettings(image_size=224)
    key = plan_cache_key("abc", base, tensorrt_version="10.8.0", gpu="NVIDIA H200 sm90")
    variants = [
        plan_cache_key("abd", base, tensorrt_version="10.8.0", gpu="NVIDIA H200 sm90"),
        plan_cache_key("abc", PlanSettings(image_size=224, max_batch=512), tensorrt_version="10.8.0", gpu="NVIDIA H200 sm90"),
        plan_cache_key("abc", PlanSettings(image_size=224, precision="fp32"), tensorrt_version="10.8.0", gpu="NVIDIA H200 sm90"),
        plan_cache_key("abc", base, tensorrt_version="10.9.0", gpu="NVIDIA H200 sm90"),
        plan_cache_key("abc", base, tensorrt_version="10.8.0", gpu="NVIDIA A100 sm80"),
    ]
    assert key == plan_cache_key("abc", PlanSettings(image_size=224), tensorrt_version="10.8.0", gpu="NVIDIA H200 sm90")
    assert len({key, *variants}) == 6
    assert base.shapes() == ((1, 224, 224, 3), (256, 224, 224, 3), (1024, 224, 224, 3))


def test_tensorrt_builds_from_the_graph_of_its_precision(tiny_clip, tmp_path):
    """The plan's precision picks the exported graph (fp16: casts in the graph), not a builder flag."""
    from clipengine.bindings.onnx_export import ensure_image_onnx, image_onnx_path
    from clipengine.encode.models import load_model, resolve_model

    towers = load_model(resolve_model(tiny_clip.model_config))
    fp16, fp32 = (image_onnx_path(towers, tmp_path, precision=p) for p in ("fp16", "fp32"))
    assert fp16 != fp32 and "fp16" in fp16.name
    assert ensure_image_onnx(towers, tmp_path, precision="fp16") == fp16


_REMOVED_IN_TENSORRT_11 = {"FP16", "INT8", "BF16", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                           "PREFER_PRECISION_CONSTRAINTS", "set_output_type", "platform_has_fast_fp16",
                           "int8_calibrator", "get_binding_shape", "execute_async_v2"}


def _attribute_names(path):
    import ast

    tree = ast.parse(path.read_text())
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}, tree


def test_no_weak_typing_api_and_no_device_switch_in_the_bindings():
    """TensorRT 11 removed weak typing; torch.cuda.set_device changes the process's device (and needs an index)."""
    import ast
    from pathlib import Path

    import clipengine.bindings as bindings

    for path in Path(bindings.__file__).parent.glob("*.py"):
        names, tree = _attribute_names(path)
        assert not names & _REMOVED_IN_TENSORRT_11, (path.name, names & _REMOVED_IN_TENSORRT_11)
        assert "set_device" not in names, path.name
        for node in ast.walk(tree):  # per-layer precision: layer.precision = ...
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    assert not (isinstance(target, ast.Attribute) and target.attr == "precision"
                                and isinstance(target.value, ast.Name) and target.value.id == "layer"), path.name


class _EnumLike:
    """The two shapes of ``trt.NetworkDefinitionCreationFlag`` across 10.12–11.x: with STRONGLY_TYPED, or
    (where strong typing is the only mode) without it."""

    def __init__(self, **members):
        self.__dict__.update(members)


def test_strongly_typed_flags():
    from clipengine.bindings.tensorrt import strongly_typed_flags

    assert strongly_typed_flags(_EnumLike(NetworkDefinitionCreationFlag=_EnumLike(STRONGLY_TYPED=1))) == 2
    assert strongly_typed_flags(_EnumLike(NetworkDefinitionCreationFlag=_EnumLike(STRONGLY_TYPED=3))) == 8
    assert strongly_typed_flags(_EnumLike(NetworkDefinitionCreationFlag=_EnumLike())) == 0


def test_tensorrt_version_and_device_index():
    from clipengine.bindings.tensorrt import MIN_TENSORRT, cuda_device_index, tensorrt_version_tuple

    assert tensorrt_version_tuple("11.4.0.106") == (11, 4) and tensorrt_version_tuple("10.12.0") == (10, 12)
    assert tensorrt_version_tuple("10.9.0") < MIN_TENSORRT <= tensorrt_version_tuple("11.0.0.1")
    assert cuda_device_index("cuda:1") == 1 and cuda_device_index("cuda:0") == 0
    with pytest.raises(ValueError, match="runs on cuda"):
        cuda_device_index("cpu")


def test_auto_picks_torch_on_cuda_without_tensorrt_and_reads_device_indices():
    from clipengine import bindings

    if not bindings.backend_imports("tensorrt"):
        assert bindings.select_backend("cuda") == "torch" and bindings.select_backend("cuda:1") == "torch"
    assert bindings.select_backend("cuda:1", "bf16") == "torch"
    assert bindings.default_precision("torch", "cuda:1") == "fp16"
    assert bindings.check_backend("torch", "cuda:1", "fp16") is None
    assert "runs on cuda" in bindings.check_backend("tensorrt", "cpu", "fp16")
    assert "device must be" in bindings.check_backend("torch", "cuda:x", "fp16")


def _decode(paths, size):
    from clipengine.encode.decode import load_image
    from clipengine.encode.geometry import ImageSpec

    return np.stack([load_image(p, None, ImageSpec(image_size=size, fast_jpeg=False, fast_resize=False)) for p in paths])


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs tensorrt")
@pytest.mark.parametrize("which", ["tiny_clip", "vit_b32_checkpoint"])
def test_tensorrt_fp16_matches_open_clip_eager_at_every_batch_size(which, request, sample_photos, tmp_path, monkeypatch):
    from clipengine.bindings import tensorrt as trt_backend
    from clipengine.bindings.tensorrt import PlanSettings, TensorRTEncoder
    from clipengine.encode.models import load_model, resolve_model

    saved = request.getfixturevalue(which)
    towers = load_model(resolve_model(saved.model_config))
    size = towers.image_size
    settings = PlanSettings(image_size=size, precision="fp16", min_batch=1, opt_batch=16, max_batch=64)
    encoder = TensorRTEncoder(towers, device="cuda:0", precision="fp16", cache_dir=tmp_path, settings=settings)
    assert "strongly typed fp16" in encoder.image_forward
    reference, _ = open_clip_reference(saved, sample_photos)
    pixels = _decode(sample_photos, size)
    for batch in (1, 3, 64, 100):  # inside the profile, at its max, and split beyond it
        repeated = np.concatenate([pixels] * (batch // len(pixels) + 1))[:batch]
        got = encoder.encode_images(repeated)
        expected = np.concatenate([reference] * (batch // len(pixels) + 1))[:batch]
        assert cosine(got, expected).min() >= 0.999, batch
    monkeypatch.setattr(trt_backend, "build_plan", lambda *a, **k: pytest.fail("plan rebuilt"))
    again = TensorRTEncoder(towers, device="cuda", precision="fp16", cache_dir=tmp_path, settings=settings)
    assert again.plan_path == encoder.plan_path


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs tensorrt")
def test_tensorrt_fp32_plan_matches_open_clip_eager(tiny_clip, sample_photos, tmp_path):
    from clipengine.bindings.tensorrt import PlanSettings, TensorRTEncoder
    from clipengine.encode.models import load_model, resolve_model

    towers = load_model(resolve_model(tiny_clip.model_config))
    settings = PlanSettings(image_size=towers.image_size, precision="fp32", opt_batch=8, max_batch=16)
    encoder = TensorRTEncoder(towers, device="cuda", precision="fp32", cache_dir=tmp_path, settings=settings)
    reference, _ = open_clip_reference(tiny_clip, sample_photos)
    assert cosine(encoder.encode_images(_decode(sample_photos, towers.image_size)), reference).min() >= 0.99999
