import numpy as np
import pytest

from tests.bindings.reference import cosine, open_clip_reference

TEXTS = ["a photo of a cat", "an astronaut"]


def _decode(paths, size):
    from clipengine.encode.decode import load_image
    from clipengine.encode.geometry import ImageSpec

    spec = ImageSpec(image_size=size, fast_jpeg=False, fast_resize=False)  # bit-identical to open_clip's preprocess
    return np.stack([load_image(p, None, spec) for p in paths])


def _towers(saved):
    from clipengine.encode.models import load_model, resolve_model

    return load_model(resolve_model(saved.model_config))


def test_tiny_onnx_matches_open_clip_eager_and_is_exported_once(tiny_clip, sample_photos, monkeypatch):
    import onnx

    from clipengine import envs
    from clipengine.bindings import onnx_export
    from clipengine.bindings.onnxruntime import OnnxRuntimeEncoder

    towers = _towers(tiny_clip)
    cache = envs.cache_dir()  # the session's private cache: other tests reuse this export
    encoder = OnnxRuntimeEncoder(towers, cache_dir=cache)
    assert encoder.onnx_path.parent == cache / "onnx" and encoder.onnx_path.is_file()
    graph = onnx.load(str(encoder.onnx_path))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert encoder.image_forward == "ONNX graph, last block on the class token"  # the parity below holds for the pruned graph

    reference, reference_text = open_clip_reference(tiny_clip, sample_photos, TEXTS)
    pixels = _decode(sample_photos, 32)
    got = encoder.encode_images(pixels)
    assert got.dtype == np.float32 and cosine(got, reference).min() >= 0.99999
    np.testing.assert_allclose(encoder.encode_images(pixels[:1]), got[:1], atol=1e-5)  # batch 1 = batch 5
    assert cosine(encoder.encode_texts(TEXTS), reference_text).min() >= 0.99999

    # a second encoder of the same weights reuses the cached graph
    def refuse(*args, **kwargs):
        raise AssertionError("exported twice")

    monkeypatch.setattr(onnx_export, "export_image_onnx", refuse)
    again = OnnxRuntimeEncoder(_towers(tiny_clip), cache_dir=cache)
    assert again.onnx_path == encoder.onnx_path


def test_cache_key_follows_weights_and_settings(tiny_clip, tmp_path):
    from clipengine.bindings.onnx_export import image_onnx_path

    from tests.fixtures_models import TINY_ARCHITECTURE, save_random_model

    towers = _towers(tiny_clip)
    other = _towers(save_random_model(TINY_ARCHITECTURE, tmp_path, "tiny-clip", seed=5))
    assert image_onnx_path(towers, tmp_path) != image_onnx_path(other, tmp_path)
    assert image_onnx_path(towers, tmp_path) != image_onnx_path(towers, tmp_path, opset=17)
    assert image_onnx_path(towers, tmp_path) == image_onnx_path(_towers(tiny_clip), tmp_path)


def test_create_encoder_with_onnxruntime_records_it(tiny_clip):
    from clipengine.config import EncodeConfig
    from clipengine.encode.encoders import create_encoder

    encoder = create_encoder(EncodeConfig(model=tiny_clip.model_config, device="cpu", backend="onnxruntime",
                                          precision="fp32"))
    record = encoder.model_record
    assert record["backend"] == "onnxruntime" and record["precision"] == "fp32"
    assert record["image_forward"] == "ONNX graph, last block on the class token"
    # the precision left to auto: measured among the backend's own (fp32, int8), and recorded
    chosen = create_encoder(EncodeConfig(model=tiny_clip.model_config, device="cpu", backend="onnxruntime")).model_record
    assert chosen["precision"] in ("fp32", "int8") and chosen["auto_choice"]["chosen"] == f"onnxruntime {chosen['precision']}"
    with pytest.raises(Exception, match="fp32"):
        create_encoder(EncodeConfig(model=tiny_clip.model_config, device="cpu", backend="onnxruntime", precision="bf16"))


@pytest.mark.slow
def test_vit_b32_onnx_matches_open_clip_eager(vit_b32_checkpoint, sample_photos, tmp_path):
    from clipengine.bindings.onnxruntime import OnnxRuntimeEncoder

    photos = sample_photos[:3]
    reference, _ = open_clip_reference(vit_b32_checkpoint, photos)
    encoder = OnnxRuntimeEncoder(_towers(vit_b32_checkpoint), cache_dir=tmp_path)
    assert cosine(encoder.encode_images(_decode(photos, 224)), reference).min() >= 0.99999


def test_int8_graph_is_the_fp32_graph_quantized_and_close_to_it(tiny_clip, sample_photos):
    """precision int8: ONNX Runtime's dynamic quantization of the cached fp32 graph (MatMuls become integer
    ops, the uint8 input and the normalizing tail stay), made once, its rows close to fp32's."""
    import onnx

    from clipengine import envs
    from clipengine.bindings.onnxruntime import OnnxRuntimeEncoder

    towers = _towers(tiny_clip)
    fp32 = OnnxRuntimeEncoder(towers, cache_dir=envs.cache_dir())
    int8 = OnnxRuntimeEncoder(towers, precision="int8", cache_dir=envs.cache_dir())
    assert int8.onnx_path.parent == fp32.onnx_path.parent and int8.onnx_path.name.startswith(fp32.onnx_path.stem + "-int8-")
    assert "dynamic int8" in int8.image_forward
    ops = {node.op_type for node in onnx.load(str(int8.onnx_path)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops or "DynamicQuantizeMatMul" in ops
    pixels = _decode(sample_photos, towers.image_size)
    rows = int8.encode_images(pixels)
    assert rows.dtype == np.float32 and np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-5)
    assert 0.99 < cosine(rows, fp32.encode_images(pixels)).min() < 1.0
    again = OnnxRuntimeEncoder(towers, precision="int8", cache_dir=envs.cache_dir())
    assert again.onnx_path == int8.onnx_path
    with pytest.raises(ValueError, match="fp32 or int8"):
        OnnxRuntimeEncoder(towers, precision="bf16", cache_dir=envs.cache_dir())
