"""The encoder interface every runtime implements.

This package never imports ``clipengine`` (the engine); it receives loaded
models from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Encoder(Protocol):
    """A CLIP-like model on one runtime and device.

    ``image_size`` is the side of the square uint8 input the image tower expects;
    ``embed_dim`` the width D of both towers' outputs.
    """

    image_size: int
    embed_dim: int

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB, already resized and center-cropped
        → (N, D) float32, rows L2-normalized. Normalization (mean/std) happens on the device."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """M strings → (M, D) float32, rows L2-normalized."""
        ...


@dataclass
class ModelTowers:
    """A loaded CLIP-like model as the runtimes need it (fp32, eval mode, on the CPU).

    ``image_tower``: torch module, (N, 3, S, S) float32 normalized with ``mean``/``std`` → (N, D) float32
    (not yet L2-normalized). ``text_tower``: torch module, (M, L) int64 token ids → (M, D) float32.
    ``tokenize``: M strings → (M, L) int64 torch tensor. ``key`` identifies architecture + weights
    (a content hash): caches of exported graphs and engines are keyed on it. ``logit_scale``:
    the model's learned multiplier of cosine similarities before a softmax.
    """

    image_tower: Any
    text_tower: Any
    tokenize: Callable[[Sequence[str]], Any]
    image_size: int
    embed_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    key: str
    name: str = ""
    logit_scale: float = 100.0  # CLIP's learned temperature, exp(model.logit_scale)
