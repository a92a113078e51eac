import numpy as np
import pytest

from tests.bindings.reference import cosine, open_clip_reference

TEXTS = ["a photo of a cat", "an astronaut", "a cup of coffee on a table"]


def _decode(paths, size):
    from clipengine.encode.decode import load_image
    from clipengine.encode.geometry import ImageSpec

    spec = ImageSpec(image_size=size, fast_jpeg=False, fast_resize=False)  # bit-identical to open_clip's preprocess
    return np.stack([load_image(p, None, spec) for p in paths])


def _torch_encoder(saved, precision):
    from clipengine.bindings.torch import TorchEncoder
    from clipengine.encode.models import load_model, resolve_model

    return TorchEncoder(load_model(resolve_model(saved.model_config)), precision=precision)


@pytest.mark.parametrize("precision, minimum", [("fp32", 0.99999), ("bf16", 0.999)])
def test_tiny_matches_open_clip_eager(tiny_clip, sample_photos, precision, minimum):
    encoder = _torch_encoder(tiny_clip, precision)
    reference, reference_text = open_clip_reference(tiny_clip, sample_photos, TEXTS)
    got = encoder.encode_images(_decode(sample_photos, encoder.image_size))
    assert got.dtype == np.float32 and got.shape == reference.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert cosine(got, reference).min() >= minimum
    text = encoder.encode_texts(TEXTS)
    assert text.shape == (3, 32) and text.dtype == np.float32
    assert cosine(text, reference_text).min() >= 0.99999  # text tower always fp32


def test_vit_b32_fp32_and_bf16_match_open_clip_eager(vit_b32_checkpoint, sample_photos):
    from clipengine.bindings.torch import TorchEncoder
    from clipengine.encode.models import load_model, resolve_model

    towers = load_model(resolve_model(vit_b32_checkpoint.model_config))
    photos = sample_photos[:3]
    reference, reference_text = open_clip_reference(vit_b32_checkpoint, photos, TEXTS[:2])
    pixels = _decode(photos, 224)
    fp32 = TorchEncoder(towers, precision="fp32")
    assert cosine(fp32.encode_images(pixels), reference).min() >= 0.99999
    assert cosine(fp32.encode_texts(TEXTS[:2]), reference_text).min() >= 0.99999
    bf16 = TorchEncoder(towers, precision="bf16")
    assert cosine(bf16.encode_images(pixels), reference).min() >= 0.999


def test_rejects_wrong_image_shape(tiny_clip):
    encoder = _torch_encoder(tiny_clip, "fp32")
    with pytest.raises(ValueError, match="uint8"):
        encoder.encode_images(np.zeros((2, 32, 32, 3), np.float32))
    assert encoder.encode_images(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 32)
    assert encoder.encode_texts([]).shape == (0, 32)


def test_layernorms_kept_fp32_in_a_half_precision_tower(tiny_clip, sample_photos):
    """The CUDA path's tower preparation, on the CPU: bf16 weights, every LayerNorm replaced and computing
    in fp32, output close to open_clip's fp32 forward."""
    import copy

    import torch

    from clipengine.bindings.torch import LayerNormFp32, keep_layernorm_fp32
    from clipengine.encode.models import load_model, resolve_model

    towers = load_model(resolve_model(tiny_clip.model_config))
    expected = sum(isinstance(m, torch.nn.LayerNorm) for m in towers.image_tower.modules())
    tower = copy.deepcopy(towers.image_tower).to(torch.bfloat16)
    assert keep_layernorm_fp32(tower) == expected == 6  # 2 per block + ln_pre + ln_post
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in tower.modules())
    norms = [m for m in tower.modules() if isinstance(m, LayerNormFp32)]
    assert all(m.weight.dtype == torch.float32 for m in norms)
    seen = []
    hooks = [m.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype))) for m in norms]
    reference, _ = open_clip_reference(tiny_clip, sample_photos)
    pixels = torch.from_numpy(_decode(sample_photos, 32)).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(towers.mean).view(1, 3, 1, 1), torch.tensor(towers.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        got = torch.nn.functional.normalize(tower(((pixels - mean) / std).to(torch.bfloat16)).float(), dim=-1)
    for hook in hooks:
        hook.remove()
    assert seen and all(dtypes == (torch.bfloat16, torch.bfloat16) for dtypes in seen)  # the model's dtype outside
    assert cosine(got.numpy(), reference).min() >= 0.999


def test_layernorm_fp32_computes_in_fp32():
    import torch

    from clipengine.bindings.torch import LayerNormFp32

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(64)
    with torch.no_grad():  # weights that bf16/fp16 cannot hold exactly
        norm.weight.copy_(torch.randn(64))
        norm.bias.copy_(torch.randn(64))
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.randn(4, 64) * 300 + 1000).to(dtype)  # fp16 statistics would overflow (x² > 65504)
        got = LayerNormFp32(norm)(x)
        want = norm(x.float()).to(dtype)  # statistics, scale and shift in fp32, rounded once at the end
        assert got.dtype == dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_batch_buckets():
    from clipengine.bindings.torch import MIN_CUDA_BUCKET, batch_buckets, bucket_for

    assert batch_buckets(512) == [16, 32, 64, 128, 256, 512]
    assert batch_buckets(100) == [16, 32, 64, 100] and batch_buckets(8) == [8]
    assert bucket_for(1, batch_buckets(512)) == MIN_CUDA_BUCKET
    assert bucket_for(17, batch_buckets(512)) == 32 and bucket_for(512, batch_buckets(512)) == 512
    assert bucket_for(65, batch_buckets(100)) == 100


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
@pytest.mark.parametrize("precision, minimum", [("fp16", 0.999), ("bf16", 0.999), ("fp32", 0.99999)])
def test_cuda_matches_open_clip_eager_compiled_and_graphed(tiny_clip, sample_photos, device, precision, minimum):
    from clipengine.bindings.torch import TorchEncoder
    from clipengine.encode.models import load_model, resolve_model

    towers = load_model(resolve_model(tiny_clip.model_config))
    reference, _ = open_clip_reference(tiny_clip, sample_photos)
    pixels = _decode(sample_photos, towers.image_size)
    encoder = TorchEncoder(towers, device=device, precision=precision, max_batch=64)
    for batch in (1, 5, 64, 150):  # a bucket each, the largest, and split beyond it
        repeated = np.concatenate([pixels] * (batch // len(pixels) + 1))[:batch]
        expected = np.concatenate([reference] * (batch // len(pixels) + 1))[:batch]
        got = encoder.encode_images(repeated)
        assert cosine(got, expected).min() >= minimum, (precision, batch)
    assert "torch.compile" in encoder.image_forward and "CUDA graphs" in encoder.image_forward
    assert "fallbacks" not in encoder.image_forward, encoder.image_forward
    assert encoder.device.type == "cuda" and encoder.device.index == 0


@pytest.mark.gpu
def test_cuda_text_tower_leaves_the_callers_module_on_the_cpu(tiny_clip):
    from clipengine.bindings.torch import TorchEncoder
    from clipengine.encode.models import load_model, resolve_model

    towers = load_model(resolve_model(tiny_clip.model_config))
    encoder = TorchEncoder(towers, device="cuda:0", precision="fp16", compile=False, cuda_graphs=False)
    assert encoder.encode_texts(TEXTS).shape == (3, 32)
    assert next(towers.text_tower.parameters()).device.type == "cpu"


@pytest.mark.parametrize("precision, fused", [("fp32", False), ("fp32", True), ("bf16", True)])
def test_threads_apply_to_the_encoders_calls_and_the_callers_setting_survives(tiny_clip, sample_photos, precision,
                                                                              fused, monkeypatch):
    """num_threads is the count inside encode_images/encode_texts (seen from the image tower's first block,
    the module's or the fused forward's, and from the text tower's), and the caller's torch setting is the
    same after construction and after every call."""
    import torch

    from clipengine.bindings import torch_vit_cpu
    from clipengine.bindings.torch import TorchEncoder
    from clipengine.encode.models import load_model, resolve_model

    towers = load_model(resolve_model(tiny_clip.model_config))
    caller = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encoder = TorchEncoder(towers, precision=precision, num_threads=2, fused=fused)
        assert torch.get_num_threads() == 1
        seen = []
        fused_block = torch_vit_cpu._run_block

        def counting_block(*args):
            seen.append(torch.get_num_threads())
            return fused_block(*args)

        monkeypatch.setattr(torch_vit_cpu, "_run_block", counting_block)
        block = towers.image_tower.transformer.resblocks[0]
        text_block = towers.text_tower.model.transformer.resblocks[0]
        hooks = [module.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
                 for module in (block, text_block)]
        with torch.inference_mode():
            encoder.encode_images(_decode(sample_photos[:2], 32))
            encoder.encode_texts(TEXTS[:1])
        for hook in hooks:
            hook.remove()
        assert torch.get_num_threads() == 1
        assert seen == [2, 2], seen  # one image block (the other is the class-token last block), one text block
    finally:
        torch.set_num_threads(caller)
