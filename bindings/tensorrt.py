"""TensorRT backend (CUDA): a plan built from the same ONNX graph ``clipengine export`` writes.

Build and run are separate (as NVIDIA's samples split ``build_engine.py`` / ``infer.py``):

- :func:`build_plan` parses the cached image graph of the plan's precision (``onnx_export``: uint8 NHWC in,
  L2-normalized float32 rows out; in fp16 the graph itself carries fp16 weights and activations with
  LayerNorm, softmax and reductions in float32) into a strongly typed network: TensorRT takes every
  tensor's type from the graph (TensorRT ≥ 10.12 with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``,
  always on 11). No builder precision flags and no per-layer precision: TensorRT 11 removed them. One
  optimization profile covers batch sizes ``min ≤ opt ≤ max``. The plan is cached under a key of the ONNX
  content hash + shapes + TensorRT version + GPU name and compute capability.
- :class:`TensorRTEncoder` deserializes the plan once on its device, allocates pinned host buffers and
  device buffers for the largest batch once, and per batch does: async host→device copy of the uint8
  batch (or a device-to-device copy when the batch is already a tensor on the GPU, e.g. decoded there),
  ``execute_async_v3`` and async device→host copy of the rows, on one CUDA stream of that device. The
  buffers and the execution context are one set, so calls are serialized by a lock.

``tensorrt`` is imported lazily (this module imports without it). CUDA memory, streams and pinned buffers
come from torch (already a dependency), so no pycuda / cuda-python is needed. The text tower runs on torch
(fp32, same GPU). Devices: "cuda" (the current device when the encoder is made) or "cuda:N"; the encoder
never changes the process's current device.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from clipengine.bindings.base import ModelTowers
from clipengine.bindings.files import atomic_path, sha256_file
from clipengine.bindings.onnx_export import (
    GRAPH_PRECISIONS,
    INPUT_NAME,
    OUTPUT_NAME,
    ensure_image_onnx,
    image_graph_forward,
)
from clipengine.kernels.cuda import parse_device

DEFAULT_MIN_BATCH = 1
DEFAULT_OPT_BATCH = 256
DEFAULT_MAX_BATCH = 1024
DEFAULT_WORKSPACE_BYTES = 8 << 30
MIN_TENSORRT = (10, 12)  # strongly typed builds without the removed weak-typing API (pyproject pins 11.x)


@dataclass(frozen=True)
class PlanSettings:
    """What a plan is built for. ``precision``: which exported graph it is built from, "fp16" (fp32
    LayerNorm/softmax/reductions inside) or "fp32" (then TF32 is off: fp32 means fp32)."""

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
            "typing": "strong",
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
        raise ImportError("the tensorrt backend needs the 'tensorrt' package: pip install 'clipengine[gpu]' "
                          "(its wheels download TensorRT's libraries from NVIDIA's package index)") from None
    if tensorrt_version_tuple(trt.__version__) < MIN_TENSORRT:
        raise ImportError(f"the tensorrt backend needs TensorRT ≥ {'.'.join(map(str, MIN_TENSORRT))}, "
                          f"found {trt.__version__}")
    return trt


def tensorrt_version_tuple(version: str) -> tuple[int, int]:
    """"11.4.0.106" → (11, 4)."""
    parts = (version.split(".") + ["0"])[:2]
    return tuple(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in parts)


def strongly_typed_flags(trt) -> int:
    """``create_network`` flags of a strongly typed network: the STRONGLY_TYPED bit where the enum still has
    it (TensorRT 10.12+, accepted and ignored by 11), 0 where strong typing is the only mode."""
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def configure_builder(trt, builder, network, settings: PlanSettings):
    """The builder config of ``settings``: workspace, one optimization profile, TF32 off for fp32 plans.
    Precision itself comes from the graph (strong typing), never from builder flags."""
    if settings.precision not in GRAPH_PRECISIONS:
        raise ValueError(f"TensorRT plans are built in {' or '.join(GRAPH_PRECISIONS)}, not {settings.precision!r}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    if settings.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # float32 tensors computed in float32, not TF32
    profile = builder.create_optimization_profile()
    low, opt, high = settings.shapes()
    profile.set_shape(INPUT_NAME, low, opt, high)
    config.add_optimization_profile(profile)
    return config


def build_plan(onnx_path: str | os.PathLike, destination: str | os.PathLike, settings: PlanSettings) -> Path:
    """Build a serialized TensorRT plan from ``onnx_path`` (strongly typed) and write it atomically to
    ``destination``; the current CUDA device builds it."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = configure_builder(trt, builder, network, settings)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build a plan from {onnx_path} ({settings})")
    with atomic_path(destination) as tmp:
        tmp.write_bytes(memoryview(serialized))
    return Path(destination)


def ensure_plan(onnx_path: str | os.PathLike, cache_dir: str | os.PathLike, settings: PlanSettings,
                *, device_index: int = 0) -> Path:
    """The cached plan for ``onnx_path`` + ``settings`` on this GPU and TensorRT, built now if absent
    (on ``device_index``; the caller's current device is restored after)."""
    import torch

    from clipengine.bindings.files import ensure_built

    trt = _trt()
    key = plan_cache_key(sha256_file(onnx_path), settings, tensorrt_version=trt.__version__, gpu=gpu_identity(device_index))
    path = Path(cache_dir) / "tensorrt" / f"{Path(onnx_path).stem}-{key}.plan"

    def build(destination):
        with torch.cuda.device(device_index):
            build_plan(onnx_path, destination, settings)

    return ensure_built(path, build)


def cuda_device_index(device) -> int:
    """The index of ``device`` ("cuda" → the current device, "cuda:N" → N); raises ``ValueError`` otherwise."""
    kind, index = parse_device(device)
    if kind != "cuda":
        raise ValueError(f"the tensorrt backend runs on cuda, not {device!r}")
    if index is None:
        import torch

        index = torch.cuda.current_device()
    return index


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

        index = cuda_device_index(device)
        trt = _trt()
        self.device = torch.device("cuda", index)
        self.image_size = int(towers.image_size)
        self.embed_dim = int(towers.embed_dim)
        self.precision = precision
        self.towers = towers
        self.settings = settings or PlanSettings(image_size=self.image_size, precision=precision)
        self.image_forward: str | None = None  # what the graph runs as the image tower
        if plan_path is None:
            if cache_dir is None:
                raise ValueError("cache_dir (or plan_path) is required to find or build the plan")
            onnx_path = ensure_image_onnx(towers, cache_dir, precision=self.settings.precision)
            self.image_forward = f"TensorRT strongly typed {self.settings.precision}, {image_graph_forward(towers)}"
            plan_path = ensure_plan(onnx_path, cache_dir, self.settings, device_index=index)
        self.plan_path = Path(plan_path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        high = self.settings.max_batch
        side = self.image_size
        with torch.cuda.device(index):  # TensorRT works on the current device; the caller's is restored
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
            if self._engine is None:
                raise RuntimeError(f"TensorRT could not load the plan {self.plan_path} (built for another GPU/version?)")
            self._context = self._engine.create_execution_context()
            self._stream = torch.cuda.Stream(device=self.device)
            # allocated once for the largest batch: pinned host staging + device buffers
            self._host_in = torch.empty((high, side, side, 3), dtype=torch.uint8, pin_memory=True)
            self._host_out = torch.empty((high, self.embed_dim), dtype=torch.float32, pin_memory=True)
            self._dev_in = torch.empty((high, side, side, 3), dtype=torch.uint8, device=self.device)
            self._dev_out = torch.empty((high, self.embed_dim), dtype=torch.float32, device=self.device)
            self._context.set_tensor_address(INPUT_NAME, self._dev_in.data_ptr())
            self._context.set_tensor_address(OUTPUT_NAME, self._dev_out.data_ptr())
        self.tensor_device = str(self.device)
        self._lock = threading.Lock()
        self._text = None

    def encode_images(self, images) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB → (N, D) float32, rows L2-normalized. ``images``: a NumPy array or a torch
        uint8 tensor (on ``tensor_device``: copied device to device after the work queued before it)."""
        import torch

        side = self.image_size
        on_device = isinstance(images, torch.Tensor)
        if not on_device:
            images = np.asarray(images)
        shape, dtype = tuple(images.shape), images.dtype
        if dtype not in (np.uint8, torch.uint8) or len(shape) != 4 or shape[1:] != (side, side, 3):
            raise ValueError(f"expected (N, {side}, {side}, 3) uint8 images, got {shape} {dtype}")
        out = np.empty((len(images), self.embed_dim), np.float32)
        with self._lock:
            if on_device:  # the batch was written on the caller's stream: this stream waits for it
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
            self._encode_chunks(images, out, on_device)
        return out

    def _encode_chunks(self, images, out: np.ndarray, on_device: bool) -> None:
        import torch

        side = self.image_size
        for start in range(0, len(images), self.settings.max_batch):
            chunk = images[start:start + self.settings.max_batch]
            count = len(chunk)
            if not on_device:
                self._host_in[:count].numpy()[...] = chunk
            with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                self._dev_in[:count].copy_(chunk if on_device else self._host_in[:count], non_blocking=True)
                self._context.set_input_shape(INPUT_NAME, (count, side, side, 3))
                if not self._context.execute_async_v3(self._stream.cuda_stream):
                    raise RuntimeError("TensorRT execution failed")
                self._host_out[:count].copy_(self._dev_out[:count], non_blocking=True)
            self._stream.synchronize()
            out[start:start + count] = self._host_out[:count].numpy()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """M strings → (M, D) float32, rows L2-normalized (torch fp32 text tower on the same GPU)."""
        if self._text is None:
            from clipengine.bindings.torch import TorchEncoder

            self._text = TorchEncoder(self.towers, device=str(self.device), precision="fp32")
        return self._text.encode_texts(texts)
