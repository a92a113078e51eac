"""TensorRT backend (CUDA): a plan built from the same ONNX graph as ``onnxruntime`` uses.

Build and run are separate (as NVIDIA's samples split ``build_engine.py`` / ``infer.py``):

- :func:`build_plan` parses the cached ONNX graph (``onnx_export``: uint8 NHWC in, L2-normalized
  float32 rows out), sets one optimization profile over batch sizes ``min ≤ opt ≤ max``, and in
  fp16 keeps LayerNorm, softmax and reductions in fp32 (fp16 LayerNorm after attention overflows:
  NVIDIA/TensorRT #4111, #2564) with ``OBEY_PRECISION_CONSTRAINTS``. The plan is cached under a key
  of ONNX content hash + shapes + precision + TensorRT version + GPU name and compute capability.
- :class:`TensorRTEncoder` deserializes the plan once, allocates pinned host buffers and device
  buffers for the largest batch once, and per batch does: async host→device copy of the uint8
  batch, ``execute_async_v3`` and async device→host copy of the rows, on one CUDA stream.

``tensorrt`` is imported lazily (this module imports without it). CUDA memory, streams and pinned
buffers come from torch (already a dependency), so no pycuda / cuda-python is needed. The text
tower runs on torch (fp32, same GPU).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from clipengine.bindings.base import ModelTowers
from clipengine.bindings.files import atomic_path, sha256_file
from clipengine.bindings.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    ensure_image_onnx,
    image_graph_forward,
)

DEFAULT_MIN_BATCH = 1
DEFAULT_OPT_BATCH = 256
DEFAULT_MAX_BATCH = 1024
DEFAULT_WORKSPACE_BYTES = 8 << 30
# layer kinds that stay fp32 inside an fp16 engine (looked up by name on trt.LayerType)
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")


@dataclass(frozen=True)
class PlanSettings:
    """What a plan is built for. ``precision``: "fp16" (fp32 LayerNorm/softmax/reductions) or "fp32"."""

    image_size: int
    precision: str = "fp16"
    min_batch: int = DEFAULT_MIN_BATCH
    opt_batch: int = DEFAULT_OPT_BATCH
    max_batch: int = DEFAULT_MAX_BATCH
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) input shapes of the profile: (B, S, S, 3)."""
        side = self.image_size
        return tuple((b, side, side, 3) for b in (self.min_batch, self.opt_batch, self.max_batch))


def plan_cache_key(onnx_sha256: str, settings: PlanSettings, *, tensorrt_version: str, gpu: str) -> str:
    """Hex key of a plan: ONNX content + profile shapes + precision + TensorRT version + GPU."""
    blob = json.dumps(
        {
            "onnx": onnx_sha256,
            "shapes": settings.shapes(),
            "precision": settings.precision,
            "fp32_layers": FP32_LAYER_TYPES,
            "workspace": settings.workspace_bytes,
            "tensorrt": tensorrt_version,
            "gpu": gpu,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def gpu_identity(device_index: int = 0) -> str:
    """GPU name and compute capability, e.g. "NVIDIA H200 sm90" (plans are not portable across GPUs)."""
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    return f"{torch.cuda.get_device_name(device_index)} sm{major}{minor}"


def _trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise ImportError("the tensorrt backend needs the 'tensorrt' package: pip install 'clipengine[gpu]'") from None
    return trt


def build_plan(onnx_path: str | os.PathLike, destination: str | os.PathLike, settings: PlanSettings) -> Path:
    """Build a serialized TensorRT plan from ``onnx_path`` and write it atomically to ``destination``."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    if settings.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        keep = {getattr(trt.LayerType, name) for name in FP32_LAYER_TYPES if hasattr(trt.LayerType, name)}
        for index in range(network.num_layers):
            layer = network.get_layer(index)
            if layer.type in keep:
                layer.precision = trt.float32
                for output in range(layer.num_outputs):
                    layer.set_output_type(output, trt.float32)
                if hasattr(layer, "compute_precision"):  # INormalizationLayer's accumulation type
                    layer.compute_precision = trt.float32
    elif settings.precision != "fp32":
        raise ValueError(f"TensorRT plans are built in fp16 or fp32, not {settings.precision!r}")
    profile = builder.create_optimization_profile()
    low, opt, high = settings.shapes()
    profile.set_shape(INPUT_NAME, low, opt, high)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build a plan from {onnx_path} ({settings})")
    with atomic_path(destination) as tmp:
        tmp.write_bytes(memoryview(serialized))
    return destination


def ensure_plan(onnx_path: str | os.PathLike, cache_dir: str | os.PathLike, settings: PlanSettings,
                *, device_index: int = 0) -> Path:
    """The cached plan for ``onnx_path`` + ``settings`` on this GPU and TensorRT, built now if absent."""
    from clipengine.bindings.files import ensure_built

    trt = _trt()
    key = plan_cache_key(sha256_file(onnx_path), settings, tensorrt_version=trt.__version__, gpu=gpu_identity(device_index))
    path = Path(cache_dir) / "tensorrt" / f"{Path(onnx_path).stem}-{settings.precision}-{key}.plan"
    return ensure_built(path, lambda destination: build_plan(onnx_path, destination, settings))


class TensorRTEncoder:
    """``Encoder`` on TensorRT. ``encode_images``: (N, S, S, 3) uint8 → (N, D) float32, L2-normalized;
    batches larger than the profile's max are split."""

    backend = "tensorrt"

    def __init__(
        self,
        towers: ModelTowers,
        *,
        device: str = "cuda",
        precision: str = "fp16",
        num_threads: int | None = None,
        cache_dir=None,
        settings: PlanSettings | None = None,
        plan_path: str | os.PathLike | None = None,
    ):
        import torch

        if not str(device).startswith("cuda"):
            raise ValueError("the tensorrt backend runs on cuda")
        trt = _trt()
        self.device = torch.device(device)
        torch.cuda.set_device(self.device)
        self.image_size = int(towers.image_size)
        self.embed_dim = int(towers.embed_dim)
        self.precision = precision
        self.towers = towers
        self.settings = settings or PlanSettings(image_size=self.image_size, precision=precision)
        self.image_forward: str | None = None  # what the graph runs as the image tower
        if plan_path is None:
            if cache_dir is None:
                raise ValueError("cache_dir (or plan_path) is required to find or build the plan")
            onnx_path = ensure_image_onnx(towers, cache_dir)
            self.image_forward = image_graph_forward(towers)
            plan_path = ensure_plan(onnx_path, cache_dir, self.settings, device_index=self.device.index or 0)
        self.plan_path = Path(plan_path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self._engine is None:
            raise RuntimeError(f"TensorRT could not load the plan {self.plan_path} (built for another GPU/version?)")
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream(device=self.device)
        high = self.settings.max_batch
        side = self.image_size
        # allocated once for the largest batch: pinned host staging + device buffers
        self._host_in = torch.empty((high, side, side, 3), dtype=torch.uint8, pin_memory=True)
        self._host_out = torch.empty((high, self.embed_dim), dtype=torch.float32, pin_memory=True)
        self._dev_in = torch.empty((high, side, side, 3), dtype=torch.uint8, device=self.device)
        self._dev_out = torch.empty((high, self.embed_dim), dtype=torch.float32, device=self.device)
        self._context.set_tensor_address(INPUT_NAME, self._dev_in.data_ptr())
        self._context.set_tensor_address(OUTPUT_NAME, self._dev_out.data_ptr())
        self._text = None

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB → (N, D) float32, rows L2-normalized."""
        import torch

        images = np.asarray(images)
        side = self.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (side, side, 3):
            raise ValueError(f"expected (N, {side}, {side}, 3) uint8 images, got {images.shape} {images.dtype}")
        out = np.empty((len(images), self.embed_dim), np.float32)
        for start in range(0, len(images), self.settings.max_batch):
            chunk = images[start:start + self.settings.max_batch]
            count = len(chunk)
            self._host_in[:count].numpy()[...] = chunk
            with torch.cuda.stream(self._stream):
                self._dev_in[:count].copy_(self._host_in[:count], non_blocking=True)
                self._context.set_input_shape(INPUT_NAME, (count, side, side, 3))
                if not self._context.execute_async_v3(self._stream.cuda_stream):
                    raise RuntimeError("TensorRT execution failed")
                self._host_out[:count].copy_(self._dev_out[:count], non_blocking=True)
            self._stream.synchronize()
            out[start:start + count] = self._host_out[:count].numpy()
        return out

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """M strings → (M, D) float32, rows L2-normalized (torch fp32 text tower on the same GPU)."""
        if self._text is None:
            from clipengine.bindings.torch import TorchEncoder

            self._text = TorchEncoder(self.towers, device=str(self.device), precision="fp32")
        return self._text.encode_texts(texts)
