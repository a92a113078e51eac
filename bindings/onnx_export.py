"""Export the image tower to ONNX once, cached on disk (build is separate from run).

The graph takes what the image pipeline produces and returns what the engine stores:

    images: (N, S, S, 3) uint8 RGB  →  embeddings: (N, D) float32, rows L2-normalized

It is three parts joined into one graph (``onnx.compose``): the input head (NHWC → NCHW, uint8 → float32,
the model's mean/std; a runtime ships one byte per value to the device, not four), the image tower exported by torch
(``pixels`` (N, 3, S, S) float32 → ``features`` (N, D) float32), and the output tail (the L2 norm and the
division, float32). A class-token-pooled open_clip ViT is exported with its last block on the class token
only (:mod:`clipengine.bindings.class_token`: same output, fewer FLOPs).

``precision="fp16"`` converts the tower alone with onnxconverter-common's float16 converter (the one NVIDIA
ModelOpt's AutoCast builds on): weights and activations fp16, except the ops of :data:`FP32_OPS`
(LayerNorm, softmax, reductions), which get float32 inputs and weights through explicit ``Cast`` nodes
(fp16 LayerNorm after attention overflows: NVIDIA/TensorRT #4111, #2564). Head and tail stay float32.
Precision is thus written in the graph, as TensorRT's strongly typed networks take it; ONNX Runtime runs
the same file on the CPU, which is how the tests check it.

Batch is dynamic; opset :data:`OPSET` (≥ 17: LayerNormalization is one node). The file lives under
``<cache_dir>/onnx/<name>-<precision>-<key>.onnx`` where ``key`` hashes the model key (architecture +
weights content), the export settings and the torch and converter versions; deleting the folder is
always safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

from clipengine.bindings.base import ModelTowers
from clipengine.bindings.files import atomic_path

OPSET = 18
EXPORT_FORMAT = 3  # bump when the graph's inputs/outputs or assembly change (3: head + tower + tail, fp16)
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
PIXELS_NAME = "pixels"  # the tower's input inside the graph: (N, 3, S, S) float32, normalized
FEATURES_NAME = "features"  # the tower's output inside the graph: (N, D) float32, not yet normalized
GRAPH_PRECISIONS = ("fp32", "fp16")
# ops that keep float32 inputs, weights and arithmetic inside an fp16 graph
FP32_OPS = ("LayerNormalization", "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare",
            "ReduceL2", "ReduceLogSumExp")
_NORM_FLOOR = 1e-12  # the tail divides by max(‖features‖, this)


def image_graph_key(towers: ModelTowers, *, precision: str = "fp32", opset: int = OPSET) -> str:
    """Hex key of the image graph of ``towers`` in ``precision`` under the current export settings."""
    import torch

    record = {
        "model": towers.key,
        "image_size": towers.image_size,
        "mean": list(towers.mean),
        "std": list(towers.std),
        "opset": opset,
        "format": EXPORT_FORMAT,
        "input": "uint8 NHWC",
        "precision": precision,
        "torch": torch.__version__,
    }
    if precision == "fp16":
        record["fp32_ops"] = list(FP32_OPS)
        record["converter"] = _converter_version()
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]


def image_onnx_path(towers: ModelTowers, cache_dir: str | os.PathLike, *, precision: str = "fp32",
                    opset: int = OPSET) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in (towers.name or "model"))[:60]
    key = image_graph_key(towers, precision=precision, opset=opset)
    return Path(cache_dir) / "onnx" / f"{safe}-{precision}-{key}.onnx"


def _converter_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxconverter-common")
    except PackageNotFoundError:
        return "absent"


def image_graph_forward(towers: ModelTowers) -> str:
    """What the exported graph runs as the image tower: "ONNX graph, last block on the class token",
    else "ONNX graph of the module (why the last block runs on every token)"."""
    from clipengine.bindings.class_token import unprunable_reason

    reason = unprunable_reason(towers.image_tower)
    return "ONNX graph, last block on the class token" if reason is None else f"ONNX graph of the module ({reason})"


def _tower_module(towers: ModelTowers):
    """The image tower as exported: (N, 3, S, S) float32 normalized pixels → (N, D) float32 features."""
    from clipengine.bindings.class_token import ClassTokenVisionTower, unprunable_reason

    visual = towers.image_tower
    if unprunable_reason(visual) is None:
        visual = ClassTokenVisionTower(visual)
    return visual.eval()


EXPORTERS = ("dynamo", "torchscript")


def export_image_onnx(towers: ModelTowers, destination: str | os.PathLike, *, precision: str = "fp32",
                      opset: int = OPSET, exporter: str = "dynamo") -> Path:
    """Export the image graph of ``towers`` in ``precision`` ("fp32" or "fp16") to ``destination`` (one
    self-contained .onnx file, written atomically). The tower goes through torch's ``torch.export``-based
    exporter (``exporter="dynamo"``), falling back to the TorchScript exporter where a model does not trace
    with it; ``exporter="torchscript"`` uses that one directly (much faster to run; the CPU probe's choice)."""
    import onnx

    if precision not in GRAPH_PRECISIONS:
        raise ValueError(f"the image graph is exported in {' or '.join(GRAPH_PRECISIONS)}, not {precision!r}")
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, not {exporter!r}")
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".export-") as work:
        tower = _export_tower(towers, Path(work) / "tower.onnx", opset, exporter)
    if precision == "fp16":
        tower = convert_to_fp16(tower)
    graph = _assemble(tower, towers, opset)
    onnx.checker.check_model(graph)
    with atomic_path(destination) as staged:
        onnx.save_model(graph, str(staged), save_as_external_data=False)
    return destination


def _export_tower(towers: ModelTowers, raw: Path, opset: int, exporter: str = "dynamo"):
    """torch → ONNX of the tower alone; returns the loaded model (weights inlined: one file < 2 GB)."""
    import onnx
    import torch

    module = _tower_module(towers)
    example = torch.zeros((2, 3, towers.image_size, towers.image_size), dtype=torch.float32)
    exporters = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}
    order = [exporter, *(name for name in EXPORTERS if name != exporter)]  # the other one where it fails
    with torch.inference_mode(False), torch.no_grad(), contextlib.redirect_stdout(None):
        for attempt, name in enumerate(order):
            try:
                exporters[name](module, example, raw, opset)
                break
            except Exception:
                if attempt == len(order) - 1:
                    raise
    return onnx.load(str(raw), load_external_data=True)


def _export_dynamo(module, example, raw: Path, opset: int) -> None:
    """torch's ``torch.export``-based exporter, batch dynamic."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.onnx.export(
        module, (example,), str(raw), opset_version=opset, dynamo=True, external_data=True,
        input_names=[PIXELS_NAME], output_names=[FEATURES_NAME], dynamic_shapes=({0: batch},), verbose=False,
    )


def _export_torchscript(module, example, raw: Path, opset: int) -> None:
    """torch's TorchScript exporter. It has no symbolic for the fused attention kernel that
    ``nn.MultiheadAttention`` takes when no gradient can flow, so the trace runs with gradients on (the
    parameters' ``requires_grad`` flags restored afterwards): attention is then exported as its ops."""
    import warnings

    import torch

    parameters = list(module.parameters())
    flags = [parameter.requires_grad for parameter in parameters]
    try:
        for parameter in parameters:
            parameter.requires_grad_(True)
        with torch.enable_grad(), warnings.catch_warnings():
            # the tracer's notes on Python-side shape checks (the graph has a dynamic batch axis only), and the
            # exporter's own notice that it is the older of torch's two
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module, (example,), str(raw), opset_version=max(opset, 17), dynamo=False,
                input_names=[PIXELS_NAME], output_names=[FEATURES_NAME],
                dynamic_axes={PIXELS_NAME: {0: "batch"}, FEATURES_NAME: {0: "batch"}},
            )
    finally:
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)


def convert_to_fp16(tower):
    """The tower graph (float32 in, float32 out) with fp16 weights and activations, :data:`FP32_OPS` kept
    float32 through explicit casts; its input and output stay float32 (cast inside)."""
    import warnings

    try:
        from onnxconverter_common import float16
    except ImportError:
        raise ImportError("the fp16 graph needs 'onnxconverter-common': pip install 'clipengine[gpu]'") from None
    for index, node in enumerate(tower.graph.node):  # the converter finds nodes by name
        if not node.name:
            node.name = f"node_{index}_{node.op_type}"
    # the converter retypes tensors, not Cast nodes: a Cast to float32 inside the tower stays float32 and
    # gets a Cast to fp16 after it (listing "Cast" as an op would make it wrap its own new casts)
    float_casts = [node.name for node in tower.graph.node
                   if node.op_type == "Cast" and _cast_target(node) == 1]  # TensorProto.FLOAT
    with warnings.catch_warnings():
        # it reports each weight it clamps into fp16's range (|w| < 1e-7 or > 1e4)
        warnings.filterwarnings("ignore", message="the float32 number", category=UserWarning)
        return float16.convert_float_to_float16(
            tower, keep_io_types=True, op_block_list=list(FP32_OPS), node_block_list=float_casts,
        )


def _cast_target(node) -> int | None:
    for attribute in node.attribute:
        if attribute.name == "to":
            return attribute.i
    return None


def _assemble(tower, towers: ModelTowers, opset: int):
    """head (uint8 NHWC → normalized float32 NCHW) + tower + tail (L2 normalization), one model."""
    import numpy as np
    import onnx
    from onnx import TensorProto, compose, helper, numpy_helper

    side = int(towers.image_size)
    std = np.asarray(towers.std, dtype=np.float32)
    mean = np.asarray(towers.mean, dtype=np.float32)
    # x_norm = (x / 255 - mean) / std = x * scale + shift, per channel
    scale = (1.0 / (255.0 * std)).astype(np.float32).reshape(1, 3, 1, 1)
    shift = (-mean / std).astype(np.float32).reshape(1, 3, 1, 1)
    imports = [helper.make_opsetid("", opset)]
    head = helper.make_graph(
        [
            helper.make_node("Transpose", [INPUT_NAME], ["head_nchw"], perm=[0, 3, 1, 2], name="head_transpose"),
            helper.make_node("Cast", ["head_nchw"], ["head_float"], to=TensorProto.FLOAT, name="head_cast"),
            helper.make_node("Mul", ["head_float", "head_scale"], ["head_scaled"], name="head_mul"),
            helper.make_node("Add", ["head_scaled", "head_shift"], [PIXELS_NAME], name="head_add"),
        ],
        "head",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", side, side, 3])],
        [helper.make_tensor_value_info(PIXELS_NAME, TensorProto.FLOAT, ["batch", 3, side, side])],
        initializer=[numpy_helper.from_array(scale, "head_scale"), numpy_helper.from_array(shift, "head_shift")],
    )
    dim = int(towers.embed_dim)
    tail = helper.make_graph(
        [
            helper.make_node("ReduceL2", [FEATURES_NAME, "tail_axes"], ["tail_norm"], keepdims=1, name="tail_norm"),
            helper.make_node("Max", ["tail_norm", "tail_floor"], ["tail_safe"], name="tail_floor"),
            helper.make_node("Div", [FEATURES_NAME, "tail_safe"], [OUTPUT_NAME], name="tail_div"),
        ],
        "tail",
        [helper.make_tensor_value_info(FEATURES_NAME, TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", dim])],
        initializer=[numpy_helper.from_array(np.array([-1], np.int64), "tail_axes"),
                     numpy_helper.from_array(np.array(_NORM_FLOOR, np.float32), "tail_floor")],
    )

    def model(graph):
        return helper.make_model(graph, opset_imports=imports, ir_version=tower.ir_version)

    tower = _with_opset(tower, opset)
    joined = compose.merge_models(model(head), tower, io_map=[(PIXELS_NAME, PIXELS_NAME)])
    joined = compose.merge_models(joined, model(tail), io_map=[(FEATURES_NAME, FEATURES_NAME)])
    joined.graph.name = "clipengine_image"
    versions: dict[str, int] = {}
    for entry in joined.opset_import:  # merge_models lists each part's imports: one per domain
        versions[entry.domain] = max(versions.get(entry.domain, 0), entry.version)
    del joined.opset_import[:]
    joined.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in versions.items())
    return onnx.shape_inference.infer_shapes(joined)


def _with_opset(tower, opset: int):
    """The tower's default-domain opset set to ``opset`` when it exported a lower one (TorchScript fallback)."""
    from onnx import version_converter

    current = next((o.version for o in tower.opset_import if o.domain in ("", "ai.onnx")), opset)
    return tower if current == opset else version_converter.convert_version(tower, opset)


def op_precisions(model) -> dict[str, dict[str, int]]:
    """Per op type, how many nodes compute in each float type (the type of their first floating-point
    input), e.g. ``{"MatMul": {"float16": 48}, "LayerNormalization": {"float32": 25}}``. ``model``: a
    loaded ONNX model (shape inference fills the intermediate types)."""
    import onnx
    from onnx import TensorProto

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    floats = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
              TensorProto.DOUBLE: "float64"}
    counts: dict[str, dict[str, int]] = {}
    for node in graph.node:
        if node.op_type == "Cast":
            continue
        kind = next((floats[types[name]] for name in node.input if types.get(name) in floats), None)
        if kind is not None:
            per_op = counts.setdefault(node.op_type, {})
            per_op[kind] = per_op.get(kind, 0) + 1
    return counts


def ensure_image_onnx(towers: ModelTowers, cache_dir: str | os.PathLike, *, precision: str = "fp32",
                      opset: int = OPSET) -> Path:
    """The cached image graph of ``towers`` in ``precision``, exported now if absent (one process exports;
    others wait)."""
    from clipengine.bindings.files import ensure_built

    path = image_onnx_path(towers, cache_dir, precision=precision, opset=opset)
    return ensure_built(path, lambda destination: export_image_onnx(towers, destination, precision=precision,
                                                                    opset=opset))
