"""A local Hugging Face CLIP directory (way 3 of giving weights), against transformers' own forward."""

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    import torch
    from open_clip.tokenizer import SimpleTokenizer

    folder = tmp_path_factory.mktemp("hf-clip")
    simple = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): index for token, index in simple.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(str(folder))
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).eval().save_pretrained(str(folder))
    return folder


def test_hf_directory_matches_transformers_forward(hf_clip_dir):
    import torch

    from clipengine.bindings.torch import TorchEncoder
    from clipengine.config import ModelConfig
    from clipengine.encode.models import load_model, resolve_model

    spec = resolve_model(ModelConfig(model=str(hf_clip_dir)))
    assert spec.source == "hf" and spec.image_size == 32 and spec.weights_hash
    encoder = TorchEncoder(load_model(spec), precision="fp32")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    texts = ["a photo of a cat", "a dog"]

    reference = transformers.CLIPModel.from_pretrained(str(hf_clip_dir)).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(hf_clip_dir))
    mean = torch.tensor(spec.preprocess["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(spec.preprocess["std"]).view(1, 3, 1, 1)
    pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    ids = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = reference(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=pixels)
    got_images = encoder.encode_images(images)
    got_texts = encoder.encode_texts(texts)
    assert (got_images * out.image_embeds.numpy()).sum(1).min() >= 0.99999
    assert (got_texts * out.text_embeds.numpy()).sum(1).min() >= 0.99999
    # bf16 on the CPU runs the same weights through the fused forward
    bf16 = TorchEncoder(load_model(spec), precision="bf16")
    assert bf16.image_forward == "fused CPU forward"
    assert (bf16.encode_images(images) * out.image_embeds.numpy()).sum(1).min() >= 0.999


def test_the_cpu_probe_copies_a_hugging_face_tower(hf_clip_dir):
    """auto's probe reads a transformers CLIP vision tower's shape as it reads open_clip's."""
    from clipengine.bindings.cpu_probe import ProbeShape
    from clipengine.config import ModelConfig
    from clipengine.encode.models import load_model, resolve_model

    towers = load_model(resolve_model(ModelConfig(model=str(hf_clip_dir))))
    assert ProbeShape.of_tower(towers.image_tower, towers.image_size, towers.embed_dim) == ProbeShape(
        image_size=32, patch=8, width=64, heads=2, mlp_width=128, output_dim=32, layers=2,
        activation="quick_gelu")  # transformers' CLIP default, as OpenAI's weights
