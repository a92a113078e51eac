"""open_clip's own eager forward as the reference every backend is compared against."""

from __future__ import annotations

import numpy as np


def open_clip_reference(saved, paths, texts=()):
    """open_clip eager on the same weights with its own preprocess → (image (N, D), text (M, D)) normalized."""
    import open_clip
    import torch
    from PIL import Image

    model = saved.build_reference()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    preprocess = open_clip.transform.image_transform(size, is_train=False)
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p)) for p in paths])
        images = model.encode_image(pixels, normalize=True).numpy()
        text = model.encode_text(open_clip.tokenize(list(texts)), normalize=True).numpy() if texts else None
    return images, text


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)
