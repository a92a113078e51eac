"""The fused CPU forward against the module's own forward, for every open_clip ViT variant it covers."""

import numpy as np
import pytest
import torch

from clipengine.bindings.torch_vit_cpu import FusedVisionTransformer, int8_linear_available, unsupported_reason

from tests.bindings.reference import cosine
from tests.bindings.vit_variants import variants, vision

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN"
)


@pytest.mark.parametrize("variant", list(variants()))
def test_matches_module_forward(variant):
    visual = vision(**variants()[variant])
    assert unsupported_reason(visual) is None
    size = visual.image_size[0]
    pixels = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = visual(pixels)
        fused = FusedVisionTransformer(visual, torch.float32)(pixels)
        assert fused.shape == reference.shape == (5, 24) and fused.dtype == torch.float32
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
        fused_bf16 = FusedVisionTransformer(visual, torch.bfloat16)(pixels.bfloat16())
    assert fused_bf16.dtype == torch.bfloat16
    assert cosine(fused_bf16.float().numpy(), reference.numpy()).min() >= 0.999


MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def _uint8_batch(visual, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, S, S, 3) random uint8 images for ``visual`` and their (count, 3, S, S) pixels normalized
    by MEAN/STD, as the module takes them."""
    size = visual.image_size[0]
    images = torch.randint(0, 256, (count, size, size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return images, (images.permute(0, 3, 1, 2) / 255.0 - mean) / std


def _folded(visual, dtype: torch.dtype, *, int8: bool = False) -> FusedVisionTransformer:
    """The fused forward of ``visual`` taking uint8 images normalized by MEAN/STD."""
    fused = FusedVisionTransformer(visual, dtype, int8=int8)
    fused.fold_normalization(MEAN, STD)
    return fused


@pytest.mark.parametrize("variant", ["plain", "avg-pool", "size-not-a-patch-multiple"])
def test_uint8_input_folds_the_normalization(variant):
    visual = vision(**variants()[variant])
    images, pixels = _uint8_batch(visual, 5, seed=2)
    with torch.inference_mode():
        reference = visual(pixels)
        with pytest.raises(RuntimeError, match="fold_normalization"):
            FusedVisionTransformer(visual, torch.float32).encode_uint8(images)
        torch.testing.assert_close(_folded(visual, torch.float32).encode_uint8(images), reference, rtol=1e-4, atol=1e-4)
        fused_bf16 = _folded(visual, torch.bfloat16)
        from_uint8 = fused_bf16.encode_uint8(images).float().numpy()
        from_pixels = fused_bf16(pixels.bfloat16()).float().numpy()
    # the centered, folded patch matmul is at least as close to fp32 as the unfolded bf16 path
    assert cosine(from_uint8, reference.numpy()).min() >= max(0.999, cosine(from_pixels, reference.numpy()).min() - 1e-5)


def test_without_projection():
    visual = vision()
    visual.proj = None
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(FusedVisionTransformer(visual, torch.float32)(pixels), visual(pixels), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"attentional_pool": True}, "attentional pooling"),
        ({"output_tokens": True}, "token outputs"),
        ({"block_type": "custom"}, "not the standard residual attention block"),
        ({"qk_norm": True}, "not the standard residual attention block"),
    ],
)
def test_names_what_it_cannot_fuse(change, reason):
    visual = vision(**change)
    assert reason in unsupported_reason(visual)
    with pytest.raises(ValueError, match="cannot fuse"):
        FusedVisionTransformer(visual)


def _hf_tower(hidden_act: str):
    """A random-init transformers CLIPModel held as ``tower.clip``, as the engine's Hugging Face image
    tower holds it, with transformers' own image forward."""
    transformers = pytest.importorskip("transformers")

    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, hidden_act=hidden_act),
        projection_dim=24,
    )
    torch.manual_seed(0)
    clip = transformers.CLIPModel(config).eval().requires_grad_(False)
    with torch.no_grad():
        for name, parameter in clip.vision_model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(0.2 * torch.randn_like(parameter))

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = clip

        def forward(self, pixels):
            return self.clip.visual_projection(self.clip.vision_model(pixel_values=pixels).pooler_output)

    return Tower().eval()


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_matches_transformers_clip_vision_forward(hidden_act):
    tower = _hf_tower(hidden_act)
    assert unsupported_reason(tower) is None
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = tower(pixels)
        torch.testing.assert_close(FusedVisionTransformer(tower, torch.float32)(pixels), reference, rtol=1e-4, atol=1e-4)
        fused_bf16 = FusedVisionTransformer(tower, torch.bfloat16)(pixels.bfloat16())
    assert cosine(fused_bf16.float().numpy(), reference.numpy()).min() >= 0.999


def test_quick_gelu_runs_as_the_matmuls_swish_with_its_slope_in_the_weights():
    """QuickGELU h·σ(1.702 h) is fused as swish z·σ(z) on z = 1.702 h: the up projection carries 1.702, the
    down projection 1 / 1.702, each scaled from the module's float32 weights and rounded to bf16 once."""
    visual = vision(**variants()["quick-gelu"])
    fused = FusedVisionTransformer(visual, torch.bfloat16)
    for block, module in zip(fused.blocks, visual.transformer.resblocks):
        assert block.activation == "swish"
        for folded, source, factor in ((block.fc_weight, module.mlp.c_fc.weight, 1.702),
                                       (block.fc_bias, module.mlp.c_fc.bias, 1.702),
                                       (block.proj_weight, module.mlp.c_proj.weight, 1 / 1.702)):
            assert torch.equal(folded, (source.double() * factor).to(torch.bfloat16))
        assert torch.equal(block.proj_bias, module.mlp.c_proj.bias.to(torch.bfloat16))
    assert FusedVisionTransformer(vision(), torch.bfloat16).blocks[0].activation == "gelu"


def test_names_what_it_cannot_fuse_in_a_transformers_tower():
    assert unsupported_reason(_hf_tower("gelu_new")) == "block 0: activation NewGELUActivation"


def test_names_a_foreign_tower_and_an_unknown_activation():
    assert "neither an open_clip VisionTransformer nor a transformers CLIPModel" in unsupported_reason(torch.nn.Linear(3, 3))
    visual = vision()
    visual.transformer.resblocks[1].mlp.gelu = torch.nn.SiLU()
    assert unsupported_reason(visual) == "block 1: activation SiLU"


def test_torch_encoder_fuses_bf16_and_fp32_on_the_cpu(tiny_clip, sample_photos):
    from clipengine.bindings.torch import TorchEncoder
    from clipengine.encode.models import load_model, resolve_model

    towers = load_model(resolve_model(tiny_clip.model_config))
    fused = TorchEncoder(towers, precision="bf16")
    module = TorchEncoder(towers, precision="bf16", fused=False)
    fp32 = TorchEncoder(towers, precision="fp32")
    fp32_module = TorchEncoder(towers, precision="fp32", fused=False)
    assert fused.unfused_reason is None and fused.image_forward == "fused CPU forward"
    assert fp32.unfused_reason is None and fp32.image_forward == "fused CPU forward"
    assert module.unfused_reason == "fused=False" and module.image_forward == "module (fused=False)"
    assert TorchEncoder(towers, precision="fp16").unfused_reason == "fp16 on the CPU is not fused"
    pixels = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    reference = fp32_module.encode_images(pixels)
    np.testing.assert_allclose(fp32.encode_images(pixels), reference, atol=2e-6)
    assert cosine(fused.encode_images(pixels), reference).min() >= 0.999
    assert cosine(fused.encode_images(pixels), module.encode_images(pixels)).min() >= 0.999


int8_only = pytest.mark.skipif(not int8_linear_available(), reason="this torch build has no oneDNN int8 linear")


def _dequantized(codes: np.ndarray, scale, zero_point) -> np.ndarray:
    return (codes.astype(np.float64) - zero_point) * scale


@int8_only
@pytest.mark.parametrize("with_norm", [False, True])
def test_int8_linear_is_the_matmul_of_its_codes(with_norm):
    """The int8 matmul equals, in float64, the product of the codes its definition gives: weights per output
    row (the norm's gain folded in first), activations per tensor; bias, GELU and residual as float32 would."""
    from clipengine.bindings.torch_vit_cpu import _Int8Linear, _Norm
    from clipengine.kernels.activation_quant import affine_uint8_parameters, quantize_uint8_reference

    generator = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(48, 64, generator=generator), torch.randn(48, generator=generator)
    norm = _Norm(1 + torch.randn(64, generator=generator), torch.randn(64, generator=generator), 1e-5, False)
    x = torch.randn(37, 64, generator=generator) * 3 + 0.5
    normalized = torch.nn.functional.layer_norm(x, (64,), None, None, 1e-5)
    linear = _Int8Linear.of(weight, bias, norm if with_norm else None)

    folded_weight = weight.double() * (norm.weight.double() if with_norm else 1.0)
    folded_bias = bias.double() + (weight.double() @ norm.bias.double() if with_norm else 0.0)
    weight_scales = folded_weight.abs().amax(1) / 127
    weight_codes = torch.round(folded_weight / weight_scales[:, None]).clamp(-127, 127).numpy()
    source = normalized if with_norm else x
    scale, zero_point = affine_uint8_parameters(source.min().item(), source.max().item())
    x_codes = quantize_uint8_reference(source.numpy(), scale, zero_point)
    expected = _dequantized(x_codes, scale, zero_point) @ (weight_codes * weight_scales.numpy()[:, None]).T + folded_bias.numpy()
    exact = (norm(x) if with_norm else x).double() @ weight.double().T + bias.double()

    with torch.inference_mode():
        plain = linear(source).double().numpy()
        gelu = linear(source, "gelu").double().numpy()
        gelu_tanh = linear(source, "gelu_tanh").double().numpy()
        residual = torch.randn(37, 48, generator=generator)
        summed = linear.add(source, residual).double().numpy()
    np.testing.assert_allclose(plain, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gelu, torch.nn.functional.gelu(torch.from_numpy(expected)).numpy(), rtol=1e-4, atol=1e-4)
    tanh_form = torch.nn.functional.gelu(torch.from_numpy(expected), approximate="tanh").numpy()
    np.testing.assert_allclose(gelu_tanh, tanh_form, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(summed, expected + residual.double().numpy(), rtol=1e-5, atol=1e-4)
    # and the codes' product is the float matmul within the quantization's error
    assert np.linalg.norm(plain - exact.numpy()) < 0.02 * np.linalg.norm(exact.numpy())


@int8_only
@pytest.mark.parametrize("variant", list(variants()))
def test_int8_form_stays_close_to_the_module_forward(variant):
    visual = vision(**variants()[variant])
    images, pixels = _uint8_batch(visual, 8, seed=4)
    with torch.inference_mode():
        reference = visual(pixels)
        int8 = _folded(visual, torch.float32, int8=True)
        rows = int8.encode_uint8(images)
        exact_rows = _folded(visual, torch.float32).encode_uint8(images)
    assert rows.dtype == torch.float32 and rows.shape == reference.shape
    assert not torch.equal(rows, exact_rows)  # the int8 matmuls ran
    assert all(block.qkv_weight is None and block.int8 is not None for block in int8.blocks)
    assert cosine(rows.numpy(), reference.numpy()).min() >= 0.999


@int8_only
def test_int8_form_from_the_checkpoint_is_the_module_s():
    from clipengine.bindings.torch_vit_cpu import open_clip_vision_of

    visual = vision()
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    forms = [FusedVisionTransformer(visual, torch.float32, int8=True),
             FusedVisionTransformer.from_open_clip(open_clip_vision_of(visual), torch.float32, int8=True)]
    with torch.inference_mode():
        rows = []
        for form in forms:
            form.fold_normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
            rows.append(form.encode_uint8(images))
    assert torch.equal(rows[0], rows[1])


def test_int8_form_runs_its_other_layers_in_float32():
    with pytest.raises(ValueError, match="float32"):
        FusedVisionTransformer(vision(), torch.bfloat16, int8=True)


@int8_only
def test_torch_encoder_runs_int8_on_the_cpu_only_and_fused(tiny_clip):
    from clipengine import bindings
    from clipengine.bindings.torch import TorchEncoder
    from clipengine.encode.models import load_model, resolve_model

    towers = load_model(resolve_model(tiny_clip.model_config))
    encoder = TorchEncoder(towers, precision="int8")
    assert encoder.image_forward == "fused CPU forward, int8 matmuls"
    pixels = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    rows = encoder.encode_images(pixels)
    reference = TorchEncoder(towers, precision="fp32").encode_images(pixels)
    assert rows.dtype == np.float32 and not np.array_equal(rows, reference)
    assert cosine(rows, reference).min() >= 0.999
    with pytest.raises(ValueError, match="fused CPU forward only"):
        TorchEncoder(towers, precision="int8", fused=False)
    assert bindings.check_backend("torch", "cpu", "int8") is None
    assert "CPU only" in bindings.check_backend("torch", "cuda", "int8")
