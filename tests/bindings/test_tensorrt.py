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


def test_the_graph_tensorrt_consumes_has_the_layers_kept_fp32(tiny_clip):
    import onnx

    from clipengine import envs
    from clipengine.bindings.onnx_export import ensure_image_onnx
    from clipengine.encode.models import load_model, resolve_model

    graph = onnx.load(str(ensure_image_onnx(load_model(resolve_model(tiny_clip.model_config)), envs.cache_dir())))
    ops = {node.op_type for node in graph.graph.node}
    # LayerNormalization → INormalizationLayer, Softmax → ISoftmaxLayer, ReduceL2 → IReduceLayer: all kept fp32
    assert {"LayerNormalization", "Softmax", "ReduceL2"} <= ops


def _decode(paths, size):
    from clipengine.encode.decode import load_image
    from clipengine.encode.geometry import ImageSpec

    return np.stack([load_image(p, None, ImageSpec(image_size=size, fast_jpeg=False, fast_resize=False)) for p in paths])


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["tiny_clip", "vit_b32_checkpoint"])
def test_tensorrt_fp16_matches_open_clip_eager_at_every_batch_size(which, request, sample_photos, tmp_path, monkeypatch):
    from clipengine.bindings import tensorrt as trt_backend
    from clipengine.bindings.tensorrt import PlanSettings, TensorRTEncoder
    from clipengine.encode.models import load_model, resolve_model

    saved = request.getfixturevalue(which)
    towers = load_model(resolve_model(saved.model_config))
    size = towers.image_size
    settings = PlanSettings(image_size=size, precision="fp16", min_batch=1, opt_batch=16, max_batch=64)
    encoder = TensorRTEncoder(towers, device="cuda", precision="fp16", cache_dir=tmp_path, settings=settings)
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
def test_torch_cuda_fp16_and_bf16_match_open_clip_eager(tiny_clip, sample_photos):
    from clipengine.bindings.torch import TorchEncoder
    from clipengine.encode.models import load_model, resolve_model

    towers = load_model(resolve_model(tiny_clip.model_config))
    reference, _ = open_clip_reference(tiny_clip, sample_photos)
    pixels = _decode(sample_photos, towers.image_size)
    for precision in ("fp16", "bf16", "fp32"):
        got = TorchEncoder(towers, device="cuda", precision=precision).encode_images(pixels)
        assert cosine(got, reference).min() >= (0.99999 if precision == "fp32" else 0.999), precision
