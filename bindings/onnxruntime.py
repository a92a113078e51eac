"""ONNX Runtime backend (CPU, fp32 or int8): the image tower as the cached ONNX graph of ``onnx_export``.

The graph takes the uint8 NHWC batch as it comes from the image pipeline (cast and mean/std are
graph nodes) and returns L2-normalized rows. The text tower stays on torch fp32 (prompts are few;
exporting the tokenizer-dependent text graph buys nothing).

``int8``: the fp32 graph through ONNX Runtime's dynamic quantization (``quantize_dynamic``: int8 weights,
per-batch int8 activations for every MatMul; the rest stays fp32), cached beside it. It changes the
numbers more than bf16 does, so ``auto`` takes it only where its cosine to fp32 stays ≥ 0.9999.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from clipengine.bindings.base import ModelTowers
from clipengine.bindings.files import atomic_path, ensure_built
from clipengine.bindings.onnx_export import (
    INPUT_NAME,
    ensure_image_onnx,
    image_graph_forward,
)

PRECISIONS = ("fp32", "int8")
QUANTIZATION = "dynamic int8 (quantize_dynamic, QInt8 weights)"  # part of the int8 graph's cache name


def ensure_int8_onnx(towers: ModelTowers, cache_dir) -> Path:
    """The cached int8 graph of ``towers``: the fp32 image graph through ``quantize_dynamic`` (int8 MatMul
    weights, activations quantized per batch), made now if absent."""
    return ensure_int8_of(ensure_image_onnx(towers, cache_dir))


def ensure_int8_of(fp32: Path) -> Path:
    """The int8 graph of the fp32 image graph ``fp32``, cached beside it (made now if absent)."""
    import hashlib

    tag = hashlib.sha256(f"{fp32.name}:{QUANTIZATION}:{ort.__version__}".encode()).hexdigest()[:12]
    path = fp32.with_name(f"{fp32.stem}-int8-{tag}.onnx")

    def build(destination: Path) -> None:
        import logging

        from onnxruntime.quantization import QuantType, quantize_dynamic

        logger = logging.getLogger()  # quantize_dynamic warns through the root logger about the uint8 input
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            with atomic_path(destination) as staged:
                quantize_dynamic(str(fp32), str(staged), weight_type=QuantType.QInt8)
        finally:
            logger.setLevel(level)

    return ensure_built(path, build)


def create_session(path: str | Path, *, num_threads: int | None = None) -> "ort.InferenceSession":
    """A CPU session over ``path`` with all graph optimizations and ``num_threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if num_threads:
        options.intra_op_num_threads = int(num_threads)
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class OnnxRuntimeEncoder:
    """``Encoder`` on ONNX Runtime (CPU). ``encode_images``: (N, S, S, 3) uint8 → (N, D) float32, normalized."""

    backend = "onnxruntime"

    def __init__(
        self,
        towers: ModelTowers,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        num_threads: int | None = None,
        cache_dir=None,
        onnx_path: str | Path | None = None,
    ):
        if device != "cpu":
            raise ValueError("the onnxruntime backend runs on the CPU; use tensorrt or torch for cuda")
        if precision not in PRECISIONS:
            raise ValueError(f"the onnxruntime backend runs {' or '.join(PRECISIONS)}, not {precision!r}")
        self.image_forward: str | None = None  # what the graph runs as the image tower
        if onnx_path is None:
            if cache_dir is None:
                raise ValueError("cache_dir (or onnx_path) is required to find or export the ONNX graph")
            if precision == "int8":
                onnx_path = ensure_int8_onnx(towers, cache_dir)
                self.image_forward = f"{image_graph_forward(towers)}, {QUANTIZATION}"
            else:
                onnx_path = ensure_image_onnx(towers, cache_dir)
                self.image_forward = image_graph_forward(towers)
        self.onnx_path = Path(onnx_path)
        self.precision = precision
        self.image_size = int(towers.image_size)
        self.embed_dim = int(towers.embed_dim)
        self.towers = towers
        self.num_threads = num_threads
        self.session = create_session(self.onnx_path, num_threads=num_threads)
        self._text = None

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB → (N, D) float32, rows L2-normalized."""
        images = np.asarray(images)
        size = self.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"expected (N, {size}, {size}, 3) uint8 images, got {images.shape} {images.dtype}")
        if len(images) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        (out,) = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(images)})
        return np.asarray(out, dtype=np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """M strings → (M, D) float32, rows L2-normalized (torch fp32 text tower)."""
        if self._text is None:
            from clipengine.bindings.torch import TorchEncoder

            self._text = TorchEncoder(self.towers, device="cpu", precision="fp32", num_threads=self.num_threads)
        return self._text.encode_texts(texts)
