"""An open_clip ViT image tower read straight from a checkpoint (no model built, no open_clip import) runs
exactly as the tower of the built model, and every architecture or checkpoint it does not cover says why."""

import pytest
import torch

from clipengine.bindings.open_clip_vit import vision_from_checkpoint
from clipengine.bindings.torch_vit_cpu import FusedVisionTransformer, open_clip_vision_of

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")

BASE = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}

# architecture changes (vision_cfg keys, or top-level ones under "top") the direct read covers
COVERED = {
    "plain": {},
    "layer-scale": {"ls_init_value": 0.5},
    "avg-pool": {"pool_type": "avg"},
    "no-ln-pre": {"no_ln_pre": True},
    "ln-after-pool": {"pool_type": "avg", "final_ln_after_pool": True},
    "one-block": {"layers": 1},
    "mlp-ratio": {"mlp_ratio": 2.0},
    "image-size-pair": {"image_size": [32, 32]},
    "quick-gelu": {"top": {"quick_gelu": True}},
}


def architecture(change: dict) -> dict:
    change = dict(change)
    top = change.pop("top", {})
    return {**BASE, **top, "vision_cfg": {**BASE["vision_cfg"], **change}}


def built_model(arch: dict):
    """A random-init open_clip model of ``arch`` with its norms, biases and layer scales perturbed (so a
    read that skipped or swapped one would differ)."""
    from clipengine.encode.models import build_open_clip_model

    torch.manual_seed(0)
    model = build_open_clip_model(arch).eval().requires_grad_(False)
    with torch.no_grad():
        for name, parameter in model.visual.named_parameters():
            if "ln" in name or "gamma" in name or name.endswith("bias"):
                parameter.add_(0.2 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("variant", list(COVERED))
def test_the_checkpoint_read_runs_exactly_as_the_built_tower(variant):
    arch = architecture(COVERED[variant])
    model = built_model(arch)
    vision, reason = vision_from_checkpoint(arch, model.state_dict())
    assert reason is None and vision is not None
    assert (vision.layers, vision.width, vision.patch, vision.output_dim) == (
        arch["vision_cfg"]["layers"], 64, 8, 24)
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    pixels = (images.permute(0, 3, 1, 2) / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            direct = FusedVisionTransformer.from_open_clip(vision, dtype)
            from_module = FusedVisionTransformer(model.visual, dtype)
            for fused in (direct, from_module):
                fused.fold_normalization(mean, std)
            assert torch.equal(direct.encode_uint8(images), from_module.encode_uint8(images))
        torch.testing.assert_close(FusedVisionTransformer.from_open_clip(vision, torch.float32)(pixels),
                                   model.visual(pixels), rtol=1e-4, atol=1e-4)


def test_the_module_description_matches_the_checkpoint_read():
    arch = architecture({"ls_init_value": 0.5, "pool_type": "avg", "top": {"quick_gelu": True}})
    model = built_model(arch)
    direct, _ = vision_from_checkpoint(arch, model.state_dict())
    described = open_clip_vision_of(model.visual)
    for field in ("heads", "activation", "pool", "final_norm_after_pool", "norm_eps", "norm_in_fp32", "image_size"):
        assert getattr(direct, field) == getattr(described, field), field
    assert set(direct.tensors) == set(described.tensors)
    assert all(torch.equal(direct.tensors[name], described.tensors[name]) for name in direct.tensors)


@pytest.mark.parametrize("change, reason", [
    ({"attentional_pool": True}, "attentional_pool"),
    ({"pos_embed_type": "sin_cos_2d"}, "pos_embed_type"),
    ({"norm_kwargs": {"eps": 1e-6}}, "norm_kwargs"),
    ({"act_kwargs": {"approximate": "tanh"}}, "act_kwargs"),
    ({"qk_norm": True}, "qk_norm"),
    ({"timm_model_name": "vit_base_patch16_224"}, "timm_model_name"),
    ({"layers": [1, 1, 1, 1]}, "ResNet"),
    ({"pool_type": "none"}, "pool type"),
    ({"image_size": [32, 48]}, "non-square"),
    ({"global_average_pool": True}, "global_average_pool"),
])
def test_an_architecture_outside_the_plain_vit_says_why(change, reason):
    arch = architecture(change)
    state = built_model(architecture({})).state_dict()
    vision, why = vision_from_checkpoint(arch, state)
    assert vision is None and reason in why


def test_a_checkpoint_that_is_not_exactly_the_architecture_says_why():
    arch = architecture({})
    state = dict(built_model(arch).state_dict())
    assert vision_from_checkpoint(arch, state)[0] is not None
    missing = {k: v for k, v in state.items() if k != "visual.ln_post.bias"}
    assert "missing ['ln_post.bias']" in vision_from_checkpoint(arch, missing)[1]
    extra = {**state, "visual.attn_pool.query": torch.zeros(1)}
    assert "extra ['attn_pool.query']" in vision_from_checkpoint(arch, extra)[1]
    # positions for another image size: open_clip resizes them, so the model must be built
    resized = {**state, "visual.positional_embedding": torch.zeros(10, 64)}
    assert "visual.positional_embedding is (10, 64)" in vision_from_checkpoint(arch, resized)[1]
    integer = {**state, "visual.proj": torch.zeros(64, 24, dtype=torch.int64)}
    assert "not a float tensor" in vision_from_checkpoint(arch, integer)[1]
