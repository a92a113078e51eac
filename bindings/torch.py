"""PyTorch eager backend: CPU and CUDA, fp32 / bf16 / fp16 (CUDA, autocast), inference mode.

uint8 NHWC batches go to the device as uint8 (4× fewer bytes than float) and are converted and
normalized there with the model's mean/std. The image tower runs in the requested precision
(bf16: a pure cast, on CPUs with AMX ~4× faster than fp32; fp16: autocast); the text tower runs in
fp32 (prompts are few and annotate compares against them). On the CPU in bf16, a standard open_clip
ViT or transformers CLIP vision tower runs through :mod:`clipengine.bindings.torch_vit_cpu` (same
weights, fused oneDNN calls, the normalization folded into the patch matmul, the last block on the
class token only). Elsewhere a class-token-pooled open_clip ViT runs as its module with the last
block on the class token only (:mod:`clipengine.bindings.class_token`); ``fused=False`` keeps the
module's own forward throughout (``image_forward`` says which ran).
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch

from clipengine.bindings.base import ModelTowers
from clipengine.bindings.class_token import ClassTokenVisionTower, unprunable_reason

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_CHUNK = 256


class TorchEncoder:
    """``Encoder`` on torch eager. ``encode_images``: (N, S, S, 3) uint8 → (N, D) float32, L2-normalized."""

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
    ):
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, not {precision!r}")
        self.device = torch.device(device)
        self.precision = precision
        self.dtype = _DTYPES[precision]
        self.image_size = int(towers.image_size)
        self.embed_dim = int(towers.embed_dim)
        self.towers = towers
        if num_threads and self.device.type == "cpu":
            torch.set_num_threads(int(num_threads))
        image = towers.image_tower
        # fp16 on CUDA runs under autocast (LayerNorm/softmax stay fp32: fp16 LayerNorm overflows);
        # bf16 has fp32's range, so a pure cast is safe and fastest (AMX on CPU)
        self._autocast = self.dtype == torch.float16 and self.device.type == "cuda"
        weight_dtype = torch.float32 if self._autocast else self.dtype
        # why the image tower runs as its module (None: it runs fused)
        self.unfused_reason: str | None = "fused=False" if not fused else "only bf16 on the CPU is fused"
        if fused and self.device.type == "cpu" and self.dtype == torch.bfloat16:
            from clipengine.bindings.torch_vit_cpu import (
                FusedVisionTransformer,
                unsupported_reason,
            )

            self.unfused_reason = unsupported_reason(image)
        if self.unfused_reason is None:  # takes its own bf16 copies of the image weights only
            self._image = FusedVisionTransformer(image, self.dtype)
            self._image.fold_normalization(towers.mean, towers.std)  # it takes the uint8 pixels itself
            self.image_forward = "fused CPU forward"
        else:
            if weight_dtype != torch.float32 or self.device.type != "cpu":
                image = copy.deepcopy(image).to(device=self.device, dtype=weight_dtype)
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
        self._text = None

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """(N, S, S, 3) uint8 → (N, 3, S, S) normalized tensor on the device, in the model's dtype."""
        batch = _as_tensor(images)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        batch = batch.permute(0, 3, 1, 2).to(torch.float32)
        pixels = torch.addcmul(self._shift, batch, self._scale)
        return pixels if self._autocast else pixels.to(self.dtype)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB → (N, D) float32, rows L2-normalized."""
        images = _check_images(images, self.image_size)
        if len(images) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self._autocast):
            if self.unfused_reason is None:
                features = self._image.encode_uint8(_as_tensor(images)).float()
            else:
                features = self._image(self.preprocess(images)).float()
            features = torch.nn.functional.normalize(features, dim=-1)
            return features.cpu().numpy()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """M strings → (M, D) float32, rows L2-normalized (text tower in fp32)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        if self._text is None:
            self._text = self.towers.text_tower.to(self.device).float().eval()
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), TEXT_CHUNK):
                tokens = self.towers.tokenize(texts[start:start + TEXT_CHUNK]).to(self.device)
                features = self._text(tokens).float()
                out.append(torch.nn.functional.normalize(features, dim=-1).cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)


def _as_tensor(images: np.ndarray) -> torch.Tensor:
    """The uint8 batch as a CPU tensor sharing its memory (copied only when not contiguous or read-only)."""
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:  # torch wants writable memory; decoded batches usually are
        images = images.copy()
    return torch.from_numpy(images)


def _check_images(images: np.ndarray, size: int) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"expected (N, {size}, {size}, 3) uint8 images, got {images.shape} {images.dtype}")
    return images
