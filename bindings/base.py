"""The encoder interface every runtime implements.

This package never imports ``clipengine`` (the engine); it receives loaded
models from it.
"""

from __future__ import annotations

import threading
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


class ModelTowers:
    """A loaded CLIP-like model as the runtimes need it (fp32, eval mode, on the CPU).

    ``image_tower``: torch module, (N, 3, S, S) float32 normalized with ``mean``/``std`` → (N, D) float32
    (not yet L2-normalized). ``text_tower``: torch module, (M, L) int64 token ids → (M, D) float32.
    ``tokenize``: M strings → (M, L) int64 torch tensor. ``key`` identifies architecture + weights
    (a content hash): caches of exported graphs and engines are keyed on it. ``logit_scale``:
    the model's learned multiplier of cosine similarities before a softmax.

    ``build_towers``: a function → (image_tower, text_tower) that builds the modules at the first use
    of either (the towers are then not given). ``vision``: the image tower as data
    (:class:`clipengine.bindings.open_clip_vit.OpenClipVision`), read straight from the checkpoint, for
    runtimes that run it without its module (the fused CPU forward): encoding images in bf16 or fp32 on
    the CPU then never builds the model.
    """

    def __init__(self, image_tower: Any = None, text_tower: Any = None, tokenize: Callable[[Sequence[str]], Any] | None = None,
                 image_size: int = 224, embed_dim: int = 512, mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
                 std: tuple[float, float, float] = (1.0, 1.0, 1.0), key: str = "", name: str = "",
                 logit_scale: float = 100.0, *, build_towers: Callable[[], tuple[Any, Any]] | None = None,
                 vision: Any = None):
        self._image_tower = image_tower
        self._text_tower = text_tower
        self._build_towers = build_towers
        self.tokenize = tokenize
        self.image_size = image_size
        self.embed_dim = embed_dim
        self.mean = mean
        self.std = std
        self.key = key
        self.name = name
        self.logit_scale = logit_scale  # CLIP's learned temperature, exp(model.logit_scale)
        self.vision = vision
        self._build_lock = threading.Lock()

    @property
    def image_tower(self) -> Any:
        self._build()
        return self._image_tower

    @property
    def text_tower(self) -> Any:
        self._build()
        return self._text_tower

    @property
    def towers_built(self) -> bool:
        """Whether the modules exist (always, unless ``build_towers`` is still to run)."""
        return self._build_towers is None

    def _build(self) -> None:
        with self._build_lock:
            if self._build_towers is not None:
                self._image_tower, self._text_tower = self._build_towers()
                self._build_towers = None
