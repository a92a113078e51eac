"""The fp16 image graph (what the tensorrt backend builds in fp16), checked on the CPU: run with ONNX Runtime
against open_clip's fp32 forward, and its precision read off the graph itself."""

from __future__ import annotations

import numpy as np
import pytest

from tests.bindings.reference import cosine, open_clip_reference

FP32_EXPECTED = {"LayerNormalization", "Softmax", "ReduceL2"}  # the ops of a ViT tower + tail that must stay fp32
FP16_EXPECTED = {"MatMul", "Gemm", "Conv"}  # where the FLOPs are


def _decode(paths, size):
    from clipengine.encode.decode import load_image
    from clipengine.encode.geometry import ImageSpec

    spec = ImageSpec(image_size=size, fast_jpeg=False, fast_resize=False)  # bit-identical to open_clip's preprocess
    return np.stack([load_image(p, None, spec) for p in paths])


def _towers(saved):
    from clipengine.encode.models import load_model, resolve_model

    return load_model(resolve_model(saved.model_config))


def _graph_path(saved, precision):
    from clipengine import envs
    from clipengine.bindings.onnx_export import ensure_image_onnx

    return ensure_image_onnx(_towers(saved), envs.cache_dir(), precision=precision)


def _run(path, pixels):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"images": pixels})
    return out


def _tensor_types(model):
    """name → ONNX element type of every tensor (inputs, initializers, inferred intermediates)."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return graph, types


def test_fp16_graph_matches_open_clip_fp32_on_the_photos(tiny_clip, sample_photos):
    reference, _ = open_clip_reference(tiny_clip, sample_photos)
    got = _run(_graph_path(tiny_clip, "fp16"), _decode(sample_photos, 32))
    assert got.dtype == np.float32 and got.shape == reference.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)  # the tail normalizes in fp32
    assert cosine(got, reference).min() >= 0.999
    fp32 = _run(_graph_path(tiny_clip, "fp32"), _decode(sample_photos, 32))
    assert cosine(fp32, reference).min() >= 0.99999
    assert cosine(got, reference).min() < cosine(fp32, reference).min()  # it really computes in fp16


def test_fp16_graph_keeps_layernorm_softmax_and_reductions_in_fp32(tiny_clip):
    import onnx
    from onnx import TensorProto

    graph, types = _tensor_types(onnx.load(str(_graph_path(tiny_clip, "fp16"))))
    assert [types[i.name] for i in graph.input] == [TensorProto.UINT8]
    assert [types[o.name] for o in graph.output] == [TensorProto.FLOAT]
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    seen: dict[str, set[int]] = {}
    for node in graph.node:
        float_inputs = [types[name] for name in node.input if name and types.get(name) in floats]
        if node.op_type in FP32_EXPECTED | FP16_EXPECTED:
            seen.setdefault(node.op_type, set()).update(float_inputs)
    assert FP32_EXPECTED | FP16_EXPECTED <= set(seen)
    for op in FP32_EXPECTED:  # inputs, scale and bias all float32 (cast in from the fp16 activations)
        assert seen[op] == {TensorProto.FLOAT}, op
    for op in FP16_EXPECTED:  # activations and weights fp16
        assert seen[op] == {TensorProto.FLOAT16}, op
    producers = {output: node for node in graph.node for output in node.output}
    for node in graph.node:
        if node.op_type in ("LayerNormalization", "Softmax") and types.get(node.input[0]) == TensorProto.FLOAT:
            source = producers[node.input[0]]
            assert source.op_type == "Cast", f"{node.name} reads {source.op_type}, not an explicit cast"
    weights = [t for t in graph.initializer if len(t.dims) == 2]  # matrices: fp16 (halves the plan's weights)
    assert weights and {t.data_type for t in weights} == {TensorProto.FLOAT16}


def test_fp32_graph_has_no_fp16(tiny_clip):
    import onnx
    from onnx import TensorProto

    graph, types = _tensor_types(onnx.load(str(_graph_path(tiny_clip, "fp32"))))
    assert TensorProto.FLOAT16 not in set(types.values())


def test_op_precisions_summary(tiny_clip):
    import onnx

    from clipengine.bindings.onnx_export import op_precisions

    counts = op_precisions(onnx.load(str(_graph_path(tiny_clip, "fp16"))))
    assert counts["LayerNormalization"] == {"float32": 6} and counts["Softmax"] == {"float32": 2}
    assert set(counts["MatMul"]) == {"float16"}


def test_export_cli_writes_the_graph_tensorrt_builds_from(tiny_clip, tmp_path):
    from clipengine.bindings.files import sha256_file
    from clipengine.cli import main

    out = tmp_path / "tiny-fp16.onnx"
    with pytest.raises(SystemExit) as done:
        main(["export", str(out), "--model", str(tiny_clip.config_path), "--weights", str(tiny_clip.weights_path)])
    assert done.value.code == 0
    assert sha256_file(out) == sha256_file(_graph_path(tiny_clip, "fp16"))
    fp32 = tmp_path / "tiny-fp32.onnx"
    with pytest.raises(SystemExit):
        main(["export", str(fp32), "--model", str(tiny_clip.config_path), "--weights", str(tiny_clip.weights_path),
              "--precision", "fp32"])
    assert sha256_file(fp32) == sha256_file(_graph_path(tiny_clip, "fp32"))


def test_export_cli_refuses_a_model_without_an_image_graph(tmp_path, capsys):
    from clipengine.cli import main

    with pytest.raises(SystemExit) as done:
        main(["export", str(tmp_path / "x.onnx"), "--model", "conse"])
    assert done.value.code == 2
    assert "export to ONNX" in capsys.readouterr().err


@pytest.mark.slow
def test_vit_b32_fp16_graph_matches_open_clip_fp32(vit_b32_checkpoint, sample_photos):
    reference, _ = open_clip_reference(vit_b32_checkpoint, sample_photos)
    got = _run(_graph_path(vit_b32_checkpoint, "fp16"), _decode(sample_photos, 224))
    assert cosine(got, reference).min() >= 0.999
