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
