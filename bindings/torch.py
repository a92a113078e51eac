"""PyTorch backend: CPU (eager, inference mode) and CUDA (fp16/bf16 weights, compiled, CUDA graphs).

uint8 NHWC batches go to the device as uint8 (a quarter of float32's bytes) and are converted and
normalized there with the model's mean/std; the text tower runs in fp32 (prompts are few and annotate
compares against them). ``encode_images`` also takes the batch as a uint8 torch tensor already on the
encoder's device (``tensor_device``; JPEGs decoded on the GPU stay there).

Threads: ``num_threads`` applies to this encoder's own calls only (set around each, then restored:
the caller's torch setting is left as it was). On the CPU the fused forward runs a batch as independent
streams, one per thread where the batch is large enough (:mod:`clipengine.bindings.cpu_streams`;
``streams=False`` runs each batch as one forward on all the threads; ``cpu_streams`` says how many at most).

CPU: the image tower runs in the requested precision (bf16: a pure cast, which bf16's fp32 range makes
safe; whether it is faster than fp32 depends on the CPU, which is why ``auto`` measures). In bf16 and fp32 a
standard open_clip ViT or transformers CLIP vision tower runs through
:mod:`clipengine.bindings.torch_vit_cpu` (same weights, fused oneDNN calls, the normalization folded into
the patch matmul, the last block on the class token only); when the towers carry the image tower as data
(``ModelTowers.vision``, read from the checkpoint) it runs from those tensors and the model is never built,
which is most of what a process pays before its first batch. Elsewhere a class-token-pooled open_clip ViT runs
as its module with the last block on the class token only (:mod:`clipengine.bindings.class_token`);
``fused=False`` keeps the module's own forward throughout (``image_forward`` says which ran).
``precision="int8"`` (CPU, fused forward only) runs the blocks' QKV and MLP matmuls as oneDNN int8 matmuls
(VNNI's integer dot products: on a CPU without AMX, where bf16 is no faster than fp32, the way to
multiply faster there) and the rest in fp32; it changes the numbers, so ``auto`` takes it only where it keeps
its cosine to fp32.

CUDA ("cuda" or "cuda:N"; the device is fixed when the encoder is made and the process's current device is
never changed): the tower's weights are cast to fp16 or bf16 with every LayerNorm kept in fp32 (fp16
LayerNorm after attention overflows); attention runs through ``scaled_dot_product_attention`` (flash
attention kernels in fp16/bf16, softmax accumulated in fp32), which is what ``nn.MultiheadAttention`` calls
in inference. The whole batch step — uint8 → normalized pixels → tower → L2 normalization — is one
``torch.compile``d function, captured as one CUDA graph per batch-size bucket (powers of two up to
``max_batch``; a short last batch is padded up to its bucket) and replayed; host buffers are pinned and
allocated once. Each of the two falls back to the eager step when it fails on a model, and
``image_forward`` records which ran and why. The step's buffers and graphs are shared state, so its
callers are serialized by a lock: one batch at a time, from whichever thread (the encode stage calls it
from the one thread that consumes the image pipeline).
"""

from __future__ import annotations

import copy
import threading
from typing import Sequence

import numpy as np
import torch

from clipengine.bindings.allocator import keep_freed_memory_mapped
from clipengine.bindings.base import ModelTowers
from clipengine.bindings.class_token import ClassTokenVisionTower, unprunable_reason
from clipengine.bindings.cpu_streams import CpuStreams, run_in_streams
from clipengine.bindings.threads import torch_threads
from clipengine.kernels.cuda import parse_device

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
           "int8": torch.float32}  # int8: the fused CPU forward's int8 matmuls, float32 elsewhere
TEXT_CHUNK = 256
DEFAULT_CUDA_MAX_BATCH = 512  # images per compiled step on CUDA (larger requests are split)
MIN_CUDA_BUCKET = 16  # the smallest batch size a CUDA graph is captured for


class TorchEncoder:
    """``Encoder`` on torch. ``encode_images``: (N, S, S, 3) uint8 → (N, D) float32, L2-normalized.

    ``num_threads``: torch threads for this encoder's calls (None: the caller's setting). ``streams``: the
    fused CPU forward splits a batch into streams (see the module's docstring). ``compile``, ``cuda_graphs``
    and ``max_batch`` apply on CUDA only."""

    backend = "torch"

    def __init__(
        self,
        towers: ModelTowers,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        num_threads: int | None = None,
        cache_dir=None,
        fused: bool = True,
        streams: bool = True,
        compile: bool = True,
        cuda_graphs: bool = True,
        max_batch: int = DEFAULT_CUDA_MAX_BATCH,
    ):
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, not {precision!r}")
        kind, index = parse_device(device)
        if precision == "int8" and kind != "cpu":
            raise ValueError("int8 on torch runs on the CPU only")
        if precision == "int8" and not fused:
            raise ValueError("int8 on torch runs the fused CPU forward only, not fused=False")
        self.precision = precision
        self.dtype = _DTYPES[precision]
        self.image_size = int(towers.image_size)
        self.embed_dim = int(towers.embed_dim)
        self.towers = towers
        self.num_threads = int(num_threads) if num_threads else None
        self._text = None
        self._streams: CpuStreams | None = None
        if kind == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
            self.tensor_device = str(self.device)
            with torch_threads(self.num_threads):
                self._cuda = CudaImageStep(towers, self.device, self.dtype, fused=fused, compile=compile,
                                           cuda_graphs=cuda_graphs, max_batch=max_batch)
            self.image_forward = self._cuda.describe()
            self.unfused_reason = "CUDA"
            return
        self._cuda = None
        self.device = torch.device("cpu")
        self.tensor_device = "cpu"
        self.malloc_settings = keep_freed_memory_mapped()  # batches stop page-faulting their activations in
        with torch_threads(self.num_threads):
            self._prepare_cpu(towers, fused)
            if streams and self.unfused_reason is None:
                self._streams = CpuStreams.for_threads(torch.get_num_threads())

    @property
    def cpu_streams(self) -> int:
        """The most streams a batch is split into (1: one forward)."""
        return self._streams.threads if self._streams is not None else 1

    def _prepare_cpu(self, towers: ModelTowers, fused: bool) -> None:
        # bf16 has fp32's range, so a pure cast is safe
        weight_dtype = self.dtype
        # why the image tower runs as its module (None: it runs fused)
        self.unfused_reason: str | None = "fused=False" if not fused else "fp16 on the CPU is not fused"
        if fused and self.dtype in (torch.bfloat16, torch.float32):  # takes its own copies of the image weights only
            from clipengine.bindings.torch_vit_cpu import (
                FusedVisionTransformer,
                fused_linear_available,
                unsupported_reason,
            )

            int8 = self.precision == "int8"
            if towers.vision is not None and fused_linear_available():  # from the checkpoint: no module built
                self._image = FusedVisionTransformer.from_open_clip(towers.vision, self.dtype, int8=int8)
                self.unfused_reason = None
            else:
                self.unfused_reason = unsupported_reason(towers.image_tower)
                if self.unfused_reason is None:
                    self._image = FusedVisionTransformer(towers.image_tower, self.dtype, int8=int8)
                elif int8:
                    raise ValueError(f"int8 on torch runs the fused CPU forward only, which cannot run this "
                                     f"image tower: {self.unfused_reason}")
            if self.unfused_reason is None:
                self._image.fold_normalization(towers.mean, towers.std)  # it takes the uint8 pixels itself
                self.image_forward = "fused CPU forward" + (", int8 matmuls" if int8 else "")
        if self.unfused_reason is not None:
            image = towers.image_tower
            if weight_dtype != torch.float32:
                image = copy.deepcopy(image).to(dtype=weight_dtype)
            self._image = image.eval()
            self.image_forward = f"module ({self.unfused_reason})"
            if fused and unprunable_reason(image) is None:  # fused=False keeps the module's own forward
                self._image = ClassTokenVisionTower(image).eval()
                self.image_forward = f"module, last block on the class token ({self.unfused_reason})"
        # x_norm = (x / 255 - mean) / std = x * scale + shift, per channel
        std = torch.tensor(towers.std, dtype=torch.float32)
        mean = torch.tensor(towers.mean, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(self.device)
        self._shift = (-mean / std).view(1, 3, 1, 1).to(self.device)

    def preprocess(self, images) -> torch.Tensor:
        """(N, S, S, 3) uint8 (NumPy or a CPU tensor) → (N, 3, S, S) normalized CPU tensor in the model's dtype."""
        batch = _as_tensor(images).permute(0, 3, 1, 2).to(torch.float32)
        return torch.addcmul(self._shift, batch, self._scale).to(self.dtype)

    def encode_images(self, images) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB → (N, D) float32, rows L2-normalized. ``images``: a NumPy array, or a
        torch tensor (on ``tensor_device`` it is used where it is; elsewhere it is copied there)."""
        images = _check_images(images, self.image_size)
        if len(images) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        with torch_threads(self.num_threads):
            if self._cuda is not None:
                out = self._cuda.encode(images)
                self.image_forward = self._cuda.describe()
                return out
            with torch.inference_mode():
                if self.unfused_reason is None:
                    features = run_in_streams(self._streams, self._image.encode_uint8, _as_tensor(images)).float()
                else:
                    features = self._image(self.preprocess(images)).float()
                features = torch.nn.functional.normalize(features, dim=-1)
                return features.cpu().numpy()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """M strings → (M, D) float32, rows L2-normalized (text tower in fp32)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        if self._text is None:  # the caller's tower stays where it is
            text = self.towers.text_tower
            self._text = (copy.deepcopy(text) if self.device.type != "cpu" else text).to(self.device).float().eval()
        out = []
        with torch_threads(self.num_threads), torch.inference_mode():
            for start in range(0, len(texts), TEXT_CHUNK):
                tokens = self.towers.tokenize(texts[start:start + TEXT_CHUNK]).to(self.device)
                features = self._text(tokens).float()
                out.append(torch.nn.functional.normalize(features, dim=-1).cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)


def _as_tensor(images) -> torch.Tensor:
    """The uint8 batch as a CPU tensor sharing its memory (copied only when not contiguous, read-only or
    on another device)."""
    if isinstance(images, torch.Tensor):
        return images.cpu().contiguous()
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:  # torch wants writable memory; decoded batches usually are
        images = images.copy()
    return torch.from_numpy(images)


def _check_images(images, size: int):
    """``images`` as a NumPy array or a torch tensor, checked to be (N, S, S, 3) uint8."""
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (size, size, 3):
            raise ValueError(f"expected (N, {size}, {size}, 3) uint8 images, got {tuple(images.shape)} {images.dtype}")
        return images
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"expected (N, {size}, {size}, 3) uint8 images, got {images.shape} {images.dtype}")
    return images


# ---- CUDA ---------------------------------------------------------------------------------------


class LayerNormFp32(torch.nn.Module):
    """A LayerNorm whose statistics and affine step run in float32 whatever its input's dtype; the
    output has the input's dtype. Weights are kept in float32."""

    def __init__(self, norm: torch.nn.LayerNorm):
        super().__init__()
        self.normalized_shape = tuple(norm.normalized_shape)
        self.eps = float(norm.eps)
        self.weight = None if norm.weight is None else torch.nn.Parameter(norm.weight.detach().float(), requires_grad=False)
        self.bias = None if norm.bias is None else torch.nn.Parameter(norm.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)
        return out.to(x.dtype)


def keep_layernorm_fp32(module: torch.nn.Module) -> int:
    """Replace every ``nn.LayerNorm`` inside ``module`` by :class:`LayerNormFp32` (in place); returns how many."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.LayerNorm):
                setattr(parent, name, LayerNormFp32(child).to(child.weight.device if child.weight is not None else "cpu"))
                count += 1
    return count


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes with a CUDA graph each: powers of two from :data:`MIN_CUDA_BUCKET`, then ``max_batch``."""
    buckets, size = [], MIN_CUDA_BUCKET
    while size < max_batch:
        buckets.append(size)
        size *= 2
    return [*buckets, max_batch]


def bucket_for(count: int, buckets: Sequence[int]) -> int:
    """The smallest bucket ≥ ``count`` (``count`` ≤ the largest bucket)."""
    return next(size for size in buckets if size >= count)


class CudaImageStep:
    """(N, S, S, 3) uint8 batches (host arrays or tensors on the device) → (N, D) float32 L2-normalized rows
    on one CUDA device.

    The step function (uint8 on the device → rows) is compiled with ``torch.compile`` and captured as one
    CUDA graph per bucket of :func:`batch_buckets`; host staging buffers are pinned once. :meth:`encode`
    holds a lock: the staging buffers, the graphs' static inputs and outputs are one set per step."""

    def __init__(self, towers: ModelTowers, device: torch.device, dtype: torch.dtype, *, fused: bool = True,
                 compile: bool = True, cuda_graphs: bool = True, max_batch: int = DEFAULT_CUDA_MAX_BATCH):
        self.device = device
        self.dtype = dtype
        self.side = int(towers.image_size)
        self.embed_dim = int(towers.embed_dim)
        self.buckets = batch_buckets(max(1, int(max_batch)))
        self.fallbacks: list[str] = []  # why compile or CUDA graphs were given up
        with torch.cuda.device(device):
            image = copy.deepcopy(towers.image_tower).eval()
            self.module_forward = "module"
            if fused and unprunable_reason(image) is None:
                image = ClassTokenVisionTower(image).eval()
                self.module_forward = "module, last block on the class token"
            image = image.to(device=device, dtype=dtype)
            self.fp32_layernorms = keep_layernorm_fp32(image) if dtype != torch.float32 else 0
            for parameter in image.parameters():
                parameter.requires_grad_(False)
            self.image = image
            std = torch.tensor(towers.std, dtype=torch.float32)
            mean = torch.tensor(towers.mean, dtype=torch.float32)
            self.scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(device)
            self.shift = (-mean / std).view(1, 3, 1, 1).to(device)
            high = self.buckets[-1]
            self.host_in = torch.empty((high, self.side, self.side, 3), dtype=torch.uint8, pin_memory=True)
            self.host_out = torch.empty((high, self.embed_dim), dtype=torch.float32, pin_memory=True)
            self.device_in = torch.empty((high, self.side, self.side, 3), dtype=torch.uint8, device=device)
        self.compiled = None
        if compile:
            try:
                self.compiled = torch.compile(self.step, dynamic=False)
            except Exception as error:  # e.g. no Triton for this GPU
                self.fallbacks.append(f"torch.compile unavailable ({type(error).__name__}: {error})"[:200])
        self.use_graphs = bool(cuda_graphs)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None
        self.lock = threading.Lock()

    def step(self, images: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 on the device → (B, D) float32, rows L2-normalized."""
        pixels = torch.addcmul(self.shift, images.permute(0, 3, 1, 2).to(torch.float32), self.scale)
        features = self.image(pixels.to(self.dtype)).float()
        return torch.nn.functional.normalize(features, dim=-1)

    def describe(self) -> str:
        parts = [f"CUDA {str(self.dtype).removeprefix('torch.')}"]
        if self.fp32_layernorms:
            parts.append(f"{self.fp32_layernorms} LayerNorms fp32")
        parts.append(self.module_forward)
        parts.append("torch.compile" if self.compiled is not None else "eager")
        if self.use_graphs:
            parts.append("CUDA graphs")
        return ", ".join(parts) + (f" (fallbacks: {'; '.join(self.fallbacks)})" if self.fallbacks else "")

    def encode(self, images) -> np.ndarray:
        """``images`` (N, S, S, 3) uint8, a NumPy array (through the pinned staging buffer) or a torch tensor
        (on this device: copied device to device, in stream order; elsewhere: copied here)."""
        out = np.empty((len(images), self.embed_dim), np.float32)
        high = self.buckets[-1]
        with self.lock, torch.cuda.device(self.device), torch.inference_mode():
            stream = torch.cuda.current_stream(self.device)
            for start in range(0, len(images), high):
                chunk = images[start:start + high]
                count = len(chunk)
                if isinstance(chunk, torch.Tensor):
                    self.device_in[:count].copy_(chunk, non_blocking=True)
                else:
                    self.host_in[:count].numpy()[...] = chunk
                    self.device_in[:count].copy_(self.host_in[:count], non_blocking=True)
                rows = self._run(self.device_in[:bucket_for(count, self.buckets)])[:count]
                self.host_out[:count].copy_(rows, non_blocking=True)
                stream.synchronize()
                out[start:start + count] = self.host_out[:count].numpy()
        return out

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        """The step on ``batch`` (a bucket-sized view of ``device_in``): graph replay, else compiled, else eager."""
        size = batch.shape[0]
        if self.use_graphs:
            entry = self.graphs.get(size)
            if entry is None:
                entry = self._capture(size)
            if entry is not None:
                graph, static_in, static_out = entry
                static_in.copy_(batch)
                graph.replay()
                return static_out
        return self._forward(batch)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(batch)
            except Exception as error:
                self.fallbacks.append(f"torch.compile failed ({type(error).__name__}: {error})"[:200])
                self.compiled = None
        return self.step(batch)

    def _capture(self, size: int):
        """One CUDA graph of the step at batch ``size``: warmed up on a side stream (compilation, kernel
        choices), then captured into a memory pool shared by every bucket."""
        static_in = torch.zeros((size, self.side, self.side, 3), dtype=torch.uint8, device=self.device)
        try:
            side_stream = torch.cuda.Stream(self.device)
            side_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side_stream):
                for _ in range(3):
                    self._forward(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side_stream)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                static_out = self._forward(static_in)
        except Exception as error:
            self.fallbacks.append(f"CUDA graph capture failed ({type(error).__name__}: {error})"[:200])
            self.use_graphs = False
            return None
        self.graphs[size] = (graph, static_in, static_out)
        return self.graphs[size]
