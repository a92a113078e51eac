"""Decoding on the encoder's device: the choice (``plan_decode``), the two halves an executor may run apart,
the encode stage's wiring and what model.json records. The device is the CPU here (torchvision's
``decode_jpeg`` runs there too: the same code as on a GPU); the CUDA runs are marked gpu."""

import json
import shutil

import numpy as np
import polars as pl
import pytest

from clipengine.errors import ClipengineError

from tests.bindings.reference import cosine


def _config(saved, **overrides):
    from clipengine.config import EncodeConfig

    settings = dict(model=saved.model_config, backend="torch", device="cpu", precision="fp32", progress=False, workers=2,
                    batch_size=3)
    settings.update(overrides)
    return EncodeConfig(**settings)


@pytest.fixture()
def photo_dir(sample_photos, tmp_path):
    """The sample photos (JPEG and PNG), a grayscale JPEG, a CMYK JPEG, a truncated JPEG and a non-image."""
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sample_photos:
        shutil.copy(path, folder / path.name)
    gray = Image.open(sample_photos[0]).convert("L")
    gray.save(folder / "gray.jpg")
    Image.open(sample_photos[2]).convert("CMYK").save(folder / "cmyk.jpg")
    data = (folder / "rocket.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return folder


def _torch_encoder(saved, device="cpu"):
    from clipengine.config import EncodeConfig
    from clipengine.encode.encoders import create_encoder

    return create_encoder(EncodeConfig(model=saved.model_config, backend="torch", device=device, precision="fp32"))


def test_plan_decode_choices_on_the_cpu(tiny_clip):
    from clipengine.encode.gpu_decode import plan_decode

    encoder = _torch_encoder(tiny_clip)
    assert encoder.tensor_device == "cpu"
    auto = plan_decode("auto", False, "cpu", encoder)
    assert (auto.where, auto.reason) == ("cpu", None)
    assert auto.describe() == "cpu: PIL, reduced-DCT JPEG decode and vectorized resize"
    assert plan_decode("auto", True, "cpu", encoder).describe() == "cpu: PIL, bit-exact with open_clip's preprocess"
    assert plan_decode("cpu", False, "cuda", encoder).where == "cpu"
    device = plan_decode("device", False, "cpu", encoder)
    assert (device.where, device.device, device.keep_on_device) == ("device", "cpu", True)
    assert device.describe().startswith("device: JPEGs decoded by torchvision (libjpeg) and resized on cpu")
    # an encoder that takes NumPy only: decoded on the device, handed over as NumPy
    no_tensors = type("NumpyOnly", (), {})()
    assert plan_decode("device", False, "cpu", no_tensors).keep_on_device is False
    with pytest.raises(ClipengineError, match="--exact-decode needs the CPU decoder"):
        plan_decode("device", True, "cpu", encoder)
    with pytest.raises(ClipengineError, match="--decode must be one of"):
        plan_decode("gpu", False, "cpu", encoder)


def test_auto_falls_back_to_the_cpu_with_the_reason_where_the_gpu_cannot_decode():
    """No CUDA here: auto on a CUDA device keeps the CPU decoder and says why; --decode device refuses."""
    from clipengine.encode.gpu_decode import plan_decode

    plan = plan_decode("auto", False, "cuda", None)
    assert plan.where == "cpu" and "needs CUDA" in plan.reason and plan.reason in plan.describe()
    exact = plan_decode("auto", True, "cuda:1", None)
    assert exact.where == "cpu" and "--exact-decode" in exact.reason
    with pytest.raises(ClipengineError, match="--decode device: .*needs CUDA"):
        plan_decode("device", False, "cuda", None)


def test_the_two_halves_give_what_the_one_pass_gives(photo_dir):
    """prepare_range (the CPU half, picklable: it travels between Ray tasks) then finish_range (the device
    half) = iter_batches_torch; plain JPEGs go as bytes, the rest as pixels or skip records."""
    import pickle

    from clipengine.encode.decode import SkippedImage, load_image
    from clipengine.encode.geometry import ImageSpec
    from clipengine.encode.gpu_decode import finish_range, iter_batches_torch, prepare_range
    from clipengine.encode.inputs import list_image_files

    files = list_image_files(photo_dir)
    spec = ImageSpec(64)
    prepared = pickle.loads(pickle.dumps(prepare_range(files, None, 0, spec, 0.1, 10**8)))
    kinds = {files[index].rsplit("/", 1)[1]: kind for index, kind, _, _ in prepared.items}
    assert kinds == {"astronaut.jpg": "jpeg", "chelsea.jpg": "jpeg", "rocket.jpg": "jpeg", "gray.jpg": "jpeg",
                     "coffee.png": "pixels", "camera.png": "pixels", "cmyk.jpg": "pixels"}
    skipped = {files[index].rsplit("/", 1)[1]: reason for index, reason in prepared.skipped}
    assert sorted(skipped) == ["broken.jpg", "cut.jpg"]
    for name, reason in skipped.items():  # the CPU decoder's own reasons
        with pytest.raises(SkippedImage) as raised:
            load_image(photo_dir / name, None, spec)
        assert reason == raised.value.reason
    halves = finish_range(prepared, spec, "cpu")
    (whole,) = iter_batches_torch(files, None, spec, device="cpu", batch_size=len(files), workers=2)
    np.testing.assert_array_equal(halves.indices, whole.indices)
    np.testing.assert_array_equal(halves.images, whole.images)
    assert halves.skipped == whole.skipped and len(halves.indices) + len(halves.skipped) == len(files)
    kept = finish_range(prepared, spec, "cpu", to_numpy=False)
    import torch

    assert isinstance(kept.images, torch.Tensor) and kept.images.dtype == torch.uint8
    np.testing.assert_array_equal(kept.images.numpy(), whole.images)


def test_encode_stage_decodes_on_the_device_and_records_it(tiny_clip, photo_dir, tmp_path):
    """--decode device on the CPU: the same items and skip records as the CPU decoder, rows within the
    resize's difference, pixels handed to the encoder as tensors, and model.json says where they were decoded."""
    from clipengine import artifacts
    from clipengine.encode.inputs import items_from_input
    from clipengine.encode.stage import encode_items

    items, _ = items_from_input(str(photo_dir))
    on_cpu = encode_items(items, tmp_path / "cpu", _config(tiny_clip, decode="cpu", exact_decode=True))
    on_device = encode_items(items, tmp_path / "device", _config(tiny_clip, decode="device"))
    assert (on_device.encoded, on_device.skipped) == (on_cpu.encoded, on_cpu.skipped) == (7, 2)
    for name in ("items.parquet", "skipped.parquet"):
        assert pl.read_parquet(tmp_path / "device" / name).equals(pl.read_parquet(tmp_path / "cpu" / name)), name
    assert cosine(np.load(tmp_path / "device" / "embeddings.npy"), np.load(tmp_path / "cpu" / "embeddings.npy")).min() > 0.999
    device_record = json.loads((tmp_path / "device" / artifacts.MODEL).read_text())
    cpu_record = json.loads((tmp_path / "cpu" / artifacts.MODEL).read_text())
    assert device_record[artifacts.RECORD_DECODE].startswith("device: JPEGs decoded by torchvision (libjpeg)")
    assert cpu_record[artifacts.RECORD_DECODE] == "cpu: PIL, bit-exact with open_clip's preprocess"
    assert on_device.model_record[artifacts.RECORD_DECODE] == device_record[artifacts.RECORD_DECODE]
    # rows of one decoder are reused by a run with the other (where pixels come from is not the model's identity)
    again = encode_items(items, tmp_path / "device", _config(tiny_clip, decode="cpu"))
    assert again.newly_encoded == 0 and again.reused == 7


def test_encoders_take_device_tensors(tiny_clip, sample_photos):
    """A uint8 tensor on the encoder's device gives the rows its NumPy twin gives."""
    import torch

    from clipengine.encode.decode import load_image
    from clipengine.encode.geometry import ImageSpec

    encoder = _torch_encoder(tiny_clip)
    pixels = np.stack([load_image(p, None, ImageSpec(32)) for p in sample_photos])
    np.testing.assert_array_equal(encoder.encode_images(torch.from_numpy(pixels)), encoder.encode_images(pixels))
    with pytest.raises(ValueError, match="uint8"):
        encoder.encode_images(torch.zeros((1, 32, 32, 3), dtype=torch.float32))


def test_cli_decode_option(tiny_clip, photo_dir, tmp_path, capsys):
    from clipengine.cli import main

    args = ["encode", str(photo_dir), "--out", str(tmp_path / "out"), "--model", str(tiny_clip.config_path),
            "--weights", str(tiny_clip.weights_path), "--backend", "torch", "--precision", "fp32", "--quiet"]
    with pytest.raises(SystemExit) as exited:
        main([*args, "--decode", "device", "--exact-decode"])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and "--exact-decode needs the CPU decoder" in error and "Traceback" not in error
    with pytest.raises(SystemExit) as exited:
        main([*args, "--decode", "device"])
    assert exited.value.code == 0
    record = json.loads((tmp_path / "out" / "model.json").read_text())
    assert record["decode"].startswith("device:")


# ---- on a GPU ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_encode_decodes_jpegs_on_the_gpu(tiny_clip, photo_dir, tmp_path, device):
    """auto on CUDA: nvJPEG, pixels stay on the GPU into the torch CUDA step; rows close to the CPU decoder's."""
    from clipengine import artifacts
    from clipengine.encode.inputs import items_from_input
    from clipengine.encode.stage import encode_items

    items, _ = items_from_input(str(photo_dir))
    on_cpu = encode_items(items, tmp_path / "cpu", _config(tiny_clip, device=device, decode="cpu", precision="fp16"))
    on_gpu = encode_items(items, tmp_path / "gpu", _config(tiny_clip, device=device, precision="fp16"))
    assert (on_gpu.encoded, on_gpu.skipped) == (on_cpu.encoded, on_cpu.skipped) == (7, 2)
    record = json.loads((tmp_path / "gpu" / artifacts.MODEL).read_text())
    assert record[artifacts.RECORD_DECODE].startswith(f"device: JPEGs decoded by torchvision (nvJPEG) and resized on {device}")
    assert cosine(np.load(tmp_path / "gpu" / "embeddings.npy"), np.load(tmp_path / "cpu" / "embeddings.npy")).min() > 0.99


@pytest.mark.gpu
def test_cuda_step_serializes_callers_from_several_threads(tiny_clip, sample_photos):
    """Replays from several threads at once give the rows one thread gives (the step's lock)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from clipengine.encode.decode import load_image
    from clipengine.encode.geometry import ImageSpec

    encoder = _torch_encoder(tiny_clip, device="cuda")
    pixels = np.stack([load_image(p, None, ImageSpec(32)) for p in sample_photos] * 8)  # 40 images
    alone = encoder.encode_images(pixels)
    on_device = torch.from_numpy(pixels).cuda()
    np.testing.assert_allclose(encoder.encode_images(on_device), alone, atol=1e-6)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: encoder.encode_images(pixels[i:] if i % 2 else on_device[i:]), range(8)))
    for i, rows in enumerate(results):
        np.testing.assert_allclose(rows, alone[i:], atol=1e-6)
