"""The encoder interface every runtime implements.

This package never imports ``clipengine`` (the engine); it receives loaded
models from it.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

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
