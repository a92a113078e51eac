"""Model fixtures: random-init open_clip models saved and reloaded through the real loading code.

``tiny_clip``: a 2-layer ViT (32×32 input, embed dim 32) with the real CLIP tokenizer vocabulary,
as an architecture JSON + a safetensors checkpoint; ``vit_b32_checkpoint``: a random-init ViT-B-32
saved as safetensors (88M parameters: use it in few tests).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

TINY_ARCHITECTURE = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class SavedModel:
    config_path: Path  # open_clip architecture JSON (or the architecture name for built-ins)
    weights_path: Path  # safetensors checkpoint
    architecture: dict

    @property
    def model_config(self):
        from clipengine.config import ModelConfig

        return ModelConfig(model=str(self.config_path), weights=self.weights_path)

    def build_reference(self):
        """The same weights in a plain open_clip model (fp32, eval), for comparisons."""
        import open_clip
        import torch

        model = open_clip.CLIP(**self.architecture) if self.config_path.suffix == ".json" else open_clip.create_model(
            str(self.config_path)
        )
        open_clip.load_checkpoint(model, str(self.weights_path), weights_only=True)
        return model.eval().requires_grad_(False).to(torch.float32)


def save_random_model(architecture: dict, folder: Path, name: str, *, seed: int = 0, write_config: bool = True) -> SavedModel:
    """Build a random-init open_clip model of ``architecture``, save it, return where it lives."""
    import torch

    from clipengine.encode.models import build_open_clip_model, save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_open_clip_model(architecture)
    weights = save_checkpoint(model, folder / f"{name}.safetensors")
    config = folder / f"{name}.json"
    if write_config:
        config.write_text(json.dumps(architecture, indent=2))
    return SavedModel(config_path=config if write_config else Path(name), weights_path=weights, architecture=architecture)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> SavedModel:
    return save_random_model(TINY_ARCHITECTURE, tmp_path_factory.mktemp("tiny-clip"), "tiny-clip")


@pytest.fixture(scope="session")
def vit_b32_checkpoint(tmp_path_factory) -> SavedModel:
    """Random-init ViT-B-32 (built-in architecture name) saved as safetensors; ``.model_config`` uses
    ``--model ViT-B-32 --weights PATH``."""
    import open_clip

    architecture = open_clip.get_model_config("ViT-B-32")
    saved = save_random_model(architecture, tmp_path_factory.mktemp("vit-b-32"), "ViT-B-32", write_config=False)
    return saved


@pytest.fixture(scope="session")
def sample_photos(tmp_path_factory):
    """A few scikit-image sample photos saved as JPEG/PNG files (RGB and grayscale)."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name, ext in [("astronaut", "jpg"), ("coffee", "png"), ("chelsea", "jpg"), ("camera", "png"), ("rocket", "jpg")]:
        path = folder / f"{name}.{ext}"
        Image.fromarray(getattr(data, name)()).save(path)
        paths.append(path)
    return paths


__all__ = ["tiny_clip", "vit_b32_checkpoint", "sample_photos", "save_random_model", "SavedModel", "TINY_ARCHITECTURE"]
