"""The image pipeline: parity with open_clip's preprocess, bad input, boxes, batching."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipengine.encode.decode import SkippedImage, load_image
from clipengine.encode.geometry import ImageSpec
from clipengine.encode.inputs import list_image_files
from clipengine.encode.pipeline import Batch, iter_batches
from clipengine.errors import ClipengineError

skdata = pytest.importorskip("skimage.data")

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


def open_clip_pixels(path, size, *, resize_mode="shortest", interpolation="bicubic", fill_color=0) -> np.ndarray:
    """open_clip's own inference transform with ToTensor and Normalize undone → (S, S, 3) uint8."""
    from open_clip.transform import image_transform

    transform = image_transform(
        size, is_train=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        resize_mode=resize_mode, interpolation=interpolation, fill_color=fill_color,
    )
    with Image.open(path) as image:
        tensor = transform(image)
    return (tensor * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[tuple[str, str], str]:
    """scikit-image sample photos saved as PNG and JPEG: {(name, ext): path}."""
    folder = tmp_path_factory.mktemp("photos")
    paths = {}
    for name in PHOTOS:
        array = getattr(skdata, name)()
        for ext in ("png", "jpg"):
            path = folder / f"{name}.{ext}"
            Image.fromarray(array).save(path, quality=90) if ext == "jpg" else Image.fromarray(array).save(path)
            paths[(name, ext)] = str(path)
    return paths


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory) -> str:
    """A 2400×1600 JPEG (big enough for reduced-DCT decoding at S=224)."""
    path = tmp_path_factory.mktemp("large") / "large.jpg"
    Image.fromarray(skdata.astronaut()).resize((2400, 1600), Image.Resampling.BICUBIC).save(path, quality=92)
    return str(path)


# ---- parity with open_clip -------------------------------------------------------------------
@pytest.mark.parametrize("size", [224, 256, 336])
@pytest.mark.parametrize("ext", ["png", "jpg"])
@pytest.mark.parametrize("name", PHOTOS)
def test_matches_open_clip_bit_exactly(photos, name, ext, size):
    path = photos[(name, ext)]
    ours = load_image(path, None, ImageSpec(size, fast_jpeg=False, fast_resize=False))
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, open_clip_pixels(path, size))


@pytest.mark.parametrize(
    "resize_mode, interpolation, fill_color",
    [("longest", "bicubic", 0), ("longest", "bilinear", 128), ("squash", "bicubic", 0), ("shortest", "bilinear", 0)],
)
@pytest.mark.parametrize("name", ["rocket", "camera"])  # landscape RGB, square grayscale
def test_matches_open_clip_resize_modes(photos, name, resize_mode, interpolation, fill_color):
    path = photos[(name, "jpg")]
    spec = ImageSpec(224, interpolation=interpolation, resize_mode=resize_mode, fill_color=fill_color, fast_jpeg=False, fast_resize=False)
    expected = open_clip_pixels(path, 224, resize_mode=resize_mode, interpolation=interpolation, fill_color=fill_color)
    np.testing.assert_array_equal(load_image(path, None, spec), expected)


def test_matches_open_clip_on_a_portrait_crop(photos, tmp_path):
    # tall image: the center crop runs along the height
    path = tmp_path / "tall.png"
    Image.fromarray(skdata.astronaut()[:, 100:337]).save(path)
    np.testing.assert_array_equal(load_image(path, None, ImageSpec(224, fast_jpeg=False, fast_resize=False)), open_clip_pixels(path, 224))


def test_fast_jpeg_stays_within_measured_tolerance(large_jpeg):
    exact = load_image(large_jpeg, None, ImageSpec(224, fast_jpeg=False, fast_resize=False)).astype(np.int16)
    fast = load_image(large_jpeg, None, ImageSpec(224, fast_jpeg=True)).astype(np.int16)
    difference = np.abs(fast - exact)
    assert difference.max() > 0  # draft decoding really happened
    assert difference.max() <= 24 and difference.mean() < 0.5


def test_fast_jpeg_is_exact_when_the_image_is_small(photos):
    path = photos[("chelsea", "jpg")]  # 451×300: too small for a reduced decode at S=224
    np.testing.assert_array_equal(load_image(path, None, ImageSpec(224, fast_jpeg=True, fast_resize=False)), open_clip_pixels(path, 224))


@pytest.mark.parametrize("size", [224, 336])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
def test_fast_resize_stays_within_a_level_or_two_of_open_clip(photos, name, interpolation, size):
    path = photos[(name, "png")]
    fast = load_image(path, None, ImageSpec(size, interpolation=interpolation, fast_jpeg=False, fast_resize=True))
    expected = open_clip_pixels(path, size, interpolation=interpolation)
    difference = np.abs(fast.astype(np.int16) - expected)
    assert difference.max() <= (1 if min(Image.open(path).size) >= size else 2) and difference.mean() < 0.02


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize("box", [None, [40, 30, 400, 260], [100, 0, 290, 300]])
@pytest.mark.parametrize("name", ["astronaut", "rocket"])
def test_fast_resize_reading_pil_pixels_in_place_changes_nothing(photos, monkeypatch, name, box, resize_mode):
    from clipengine.encode import geometry

    path = photos[(name, "jpg")]
    spec = ImageSpec(96, resize_mode=resize_mode, fast_jpeg=False, fast_resize=True)
    with Image.open(path) as image:
        image.load()
        view = geometry._rgbx_pixels(image)
        assert view is not None and view.shape == (image.height, image.width, 4)
        np.testing.assert_array_equal(view[..., :3], np.array(image))
    in_place = load_image(path, box, spec, box_margin=0.0)
    monkeypatch.setattr(geometry, "_rgbx_pixels", lambda image: None)  # as for rows not in one block
    np.testing.assert_array_equal(in_place, load_image(path, box, spec, box_margin=0.0))
    exact = load_image(path, box, ImageSpec(96, resize_mode=resize_mode, fast_jpeg=False, fast_resize=False), box_margin=0.0)
    assert np.abs(in_place.astype(np.int16) - exact).max() <= 2


def test_pixels_in_several_blocks_are_not_viewed_in_place():
    from clipengine.encode import geometry

    assert geometry._rgbx_pixels(Image.new("RGB", (5000, 4000))) is None  # 80 MB: PIL splits the rows
    assert geometry._rgbx_pixels(Image.new("L", (50, 40))) is None  # one byte per pixel: not RGBX


def test_fast_resize_in_worker_threads_leaves_the_main_thread_s_torch_threads(photos):
    import torch

    before = torch.get_num_threads()
    files = [photos[(name, "jpg")] for name in ("astronaut", "coffee", "rocket")] * 2
    batches = list(iter_batches(files, None, ImageSpec(64), batch_size=2, workers=2))
    assert sum(len(batch.indices) for batch in batches) == len(files)
    assert torch.get_num_threads() == before


def test_fast_jpeg_box_keeps_geometry(large_jpeg):
    box = [600.0, 200.0, 1800.0, 1400.0]
    exact = load_image(large_jpeg, box, ImageSpec(112, fast_jpeg=False, fast_resize=False), box_margin=0.0).astype(np.int16)
    fast = load_image(large_jpeg, box, ImageSpec(112, fast_jpeg=True), box_margin=0.0).astype(np.int16)
    assert np.abs(fast - exact).max() > 0
    assert np.abs(fast - exact).mean() < 0.5


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("box", [None, [300, 100, 1900, 1500]])
def test_fast_jpeg_geometry_with_exif_rotation(tmp_path, resize_mode, box):
    stored = Image.fromarray(skdata.astronaut()).resize((2400, 1600), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(stored.transpose(Image.Transpose.ROTATE_90), tmp_path / "rotated.jpg", exif=exif, quality=92)
    exact = load_image(path, box, ImageSpec(224, resize_mode=resize_mode, fast_jpeg=False, fast_resize=False)).astype(np.int16)
    fast = load_image(path, box, ImageSpec(224, resize_mode=resize_mode, fast_jpeg=True)).astype(np.int16)
    assert 0 < np.abs(fast - exact).max() <= 24 and np.abs(fast - exact).mean() < 0.5


def test_extreme_aspect_ratio_resizes_only_the_kept_window(tmp_path, monkeypatch):
    from clipengine.encode import decode

    strip = save(Image.fromarray(np.random.default_rng(0).integers(0, 256, (2, 40_000, 3), dtype=np.uint8)), tmp_path / "strip.png")
    assert load_image(strip, None, ImageSpec(224)).shape == (224, 224, 3)  # open_clip would resize to 224×4.48M first
    # the windowed resize keeps open_clip's geometry: compare both on a photo, forcing the window path
    path = tmp_path / "wide.png"
    Image.fromarray(skdata.rocket()).save(path)
    exact = load_image(path, None, ImageSpec(224, fast_jpeg=False, fast_resize=False)).astype(np.int16)
    monkeypatch.setattr(decode, "MAX_RESIZED_AREA", 1)
    windowed = load_image(path, None, ImageSpec(224, fast_jpeg=False, fast_resize=False)).astype(np.int16)
    assert np.abs(windowed - exact).max() <= 1 and np.abs(windowed - exact).mean() < 0.01


# ---- spec --------------------------------------------------------------------------------------
def test_spec_from_preprocess_cfg():
    spec = ImageSpec.from_preprocess_cfg(
        {"size": (336, 336), "interpolation": "bilinear", "resize_mode": "squash", "mean": (0.5,) * 3}
    )
    assert (spec.image_size, spec.interpolation, spec.resize_mode) == (336, "bilinear", "squash")
    assert ImageSpec.from_preprocess_cfg({"size": 224, "interpolation": "random"}).interpolation == "bicubic"
    with pytest.raises(ClipengineError, match="not square"):
        ImageSpec.from_preprocess_cfg({"size": (224, 320)})
    with pytest.raises(ClipengineError, match="resize_mode"):
        ImageSpec(224, resize_mode="stretch")


def test_spec_from_an_open_clip_model():
    import open_clip

    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        text_cfg={"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
    )
    assert ImageSpec.from_model(model, fast_jpeg=False, fast_resize=False) == ImageSpec(64, fast_jpeg=False, fast_resize=False)
    open_clip.set_model_preprocess_cfg(
        model, {"size": 96, "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear", "resize_mode": "longest"}
    )
    assert ImageSpec.from_model(model) == ImageSpec(96, interpolation="bilinear", resize_mode="longest")


# ---- image modes and orientation ----------------------------------------------------------------
def save(image: Image.Image, path, **kwargs) -> str:
    image.save(path, **kwargs)
    return str(path)


def test_exif_orientation_is_applied(photos, tmp_path):
    upright = Image.fromarray(skdata.rocket())  # 427×640 landscape
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera writes, portrait
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    rotated = save(stored, tmp_path / "rotated.jpg", exif=exif, quality=95)
    reference = save(stored.transpose(Image.Transpose.ROTATE_270), tmp_path / "upright.png")
    spec = ImageSpec(224, fast_jpeg=False, fast_resize=False)
    ours = load_image(rotated, None, spec).astype(np.int16)
    # compare with an upright re-encoding of the same JPEG pixels (JPEG noise only)
    assert np.abs(ours - load_image(reference, None, spec).astype(np.int16)).mean() < 2.0
    # open_clip does not transpose: its output is the sideways picture
    assert np.abs(ours - open_clip_pixels(rotated, 224).astype(np.int16)).mean() > 10


def test_grayscale_and_cmyk(photos, tmp_path):
    spec = ImageSpec(128, fast_jpeg=False, fast_resize=False)
    gray = load_image(photos[("camera", "png")], None, spec)
    assert gray.shape == (128, 128, 3) and (gray[..., 0] == gray[..., 2]).all()
    rgb = Image.fromarray(skdata.coffee())
    cmyk = save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg", quality=95)
    ours = load_image(cmyk, None, spec).astype(np.int16)
    plain = load_image(save(rgb, tmp_path / "rgb.png"), None, spec).astype(np.int16)
    assert np.abs(ours - plain).mean() < 3.0


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 … 65520
    path = save(Image.fromarray(ramp), tmp_path / "deep.png")
    with Image.open(path) as image:
        assert image.mode.startswith("I")
    ours = load_image(path, None, ImageSpec(64, fast_jpeg=False, fast_resize=False))
    np.testing.assert_array_equal(ours[..., 0], np.rint(ramp / 257.0).astype(np.uint8))


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[:, :20] = (255, 0, 0, 255)  # opaque red on the left, fully transparent black on the right
    spec = ImageSpec(40, fast_jpeg=False, fast_resize=False)
    ours = load_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"), None, spec)
    assert (ours[:, :20] == (255, 0, 0)).all() and (ours[:, 20:] == 255).all()
    la = Image.fromarray(rgba[..., [0, 3]].copy(), "LA")
    ours = load_image(save(la, tmp_path / "la.png"), None, spec)
    assert (ours[:, :20] == 255).all() and (ours[:, 20:] == 255).all()


def test_palette_with_transparency(tmp_path):
    palette = Image.new("P", (30, 30), 0)
    palette.putpalette([0, 0, 255] + [0, 255, 0] + [0, 0, 0] * 254)
    palette.paste(1, (0, 0, 15, 30))
    path = save(palette, tmp_path / "p.png", transparency=0)  # index 0 (blue) transparent
    ours = load_image(path, None, ImageSpec(30, fast_jpeg=False, fast_resize=False))
    assert (ours[:, :15] == (0, 255, 0)).all() and (ours[:, 15:] == 255).all()
    opaque = save(palette, tmp_path / "p-opaque.png")
    ours = load_image(opaque, None, ImageSpec(30, fast_jpeg=False, fast_resize=False))
    assert (ours[:, 15:] == (0, 0, 255)).all()


# ---- bad input ---------------------------------------------------------------------------------
def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height (no pixel data): enough for PIL to open it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.fixture()
def bad_files(photos, tmp_path) -> dict[str, tuple[str, str]]:
    """name → (path, expected reason code)."""
    jpeg = Path(photos[("astronaut", "jpg")]).read_bytes()
    png = Path(photos[("astronaut", "png")]).read_bytes()
    files = {
        "empty": (b"", "empty file"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated_png": (png[: len(png) // 2], "truncated"),
        "garbage": (os.urandom(5000), "not an image"),
        "text": (b"hello, I am not a picture\n" * 20, "not an image"),
        "corrupt_jpeg": (jpeg[:600] + bytes(4000) + jpeg[-2:], "corrupt"),
        "bomb_header": (png_header_only(100_000, 100_000), "too many pixels"),
    }
    out = {}
    for name, (data, code) in files.items():
        path = tmp_path / f"{name}.{'png' if 'png' in name or 'bomb' in name else 'jpg'}"
        path.write_bytes(data)
        out[name] = (str(path), code)
    out["missing"] = (str(tmp_path / "nope.jpg"), "missing file")
    (tmp_path / "folder.jpg").mkdir()
    out["directory"] = (str(tmp_path / "folder.jpg"), "not a file")
    return out


@pytest.mark.parametrize(
    "name", ["empty", "truncated_jpeg", "truncated_png", "garbage", "text", "bomb_header", "missing", "directory"]
)
def test_bad_input_is_skipped_with_reason(bad_files, name):
    path, code = bad_files[name]
    with pytest.raises(SkippedImage) as caught:
        load_image(path, None, ImageSpec(224))
    assert caught.value.reason.split(":")[0] == code, caught.value.reason


def test_corrupt_jpeg_is_skipped_or_decoded(bad_files):
    # libjpeg can recover from a zeroed stretch of entropy data (a grey block); it must not escape as an error
    path, _ = bad_files["corrupt_jpeg"]
    try:
        assert load_image(path, None, ImageSpec(64)).shape == (64, 64, 3)
    except SkippedImage as skip:
        assert skip.reason.split(":")[0] in {"corrupt", "truncated"}


def test_pixel_cap_is_checked_before_decoding(photos, tmp_path):
    with pytest.raises(SkippedImage, match=r"^too many pixels: 512x512 > 1000$"):
        load_image(photos[("astronaut", "png")], None, ImageSpec(64), max_pixels=1000)
    # above twice PIL's own limit PIL refuses on open: the same reason
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(20_000, 20_000))
    with pytest.raises(SkippedImage, match=r"^too many pixels"):
        load_image(bomb, None, ImageSpec(64), max_pixels=10**12)


def test_pil_bomb_warning_range_is_our_cap(tmp_path):
    # between PIL's limit and twice it PIL only warns; clipengine's own cap decides, silently
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(side, side))
    # a fresh interpreter where every warning is an error (pytest resets filters around tests)
    script = (
        "import warnings\n"
        "from clipengine.encode.geometry import ImageSpec\n"
        "from clipengine.encode.pipeline import iter_batches\n"
        "before = list(warnings.filters)\n"
        f"batch, = iter_batches([{str(path)!r}], None, ImageSpec(64))\n"
        "assert warnings.filters == before, 'the pipeline left its warning filters behind'\n"
        "print(batch.skipped[0][1])\n"
    )
    done = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"too many pixels: {side}x{side} > ")


def test_one_bad_file_never_stops_a_batch(bad_files, photos):
    good = [photos[(n, "jpg")] for n in ("astronaut", "coffee")]
    bad = [path for path, _ in bad_files.values()]
    files = [good[0], *bad, good[1]]
    spec = ImageSpec(64)
    batches = list(iter_batches(files, None, spec, batch_size=4, workers=2, prefetch_batches=2))
    indices = np.concatenate([b.indices for b in batches])
    skipped = dict(s for b in batches for s in b.skipped)
    assert indices[0] == 0 and indices[-1] == len(files) - 1
    assert sorted([*indices.tolist(), *skipped]) == list(range(len(files)))
    expected = {i + 1: code for i, (_, code) in enumerate(bad_files.values())}
    for index, reason in skipped.items():
        assert reason.split(":")[0] in ({expected[index]} | ({"corrupt", "truncated"} if expected[index] == "corrupt" else set()))


# ---- boxes -------------------------------------------------------------------------------------
def test_box_crop_equals_cropping_first(photos, tmp_path):
    path = photos[("astronaut", "png")]
    spec = ImageSpec(96, fast_jpeg=False, fast_resize=False)
    with Image.open(path) as opened:
        whole = opened.copy()
    cropped = save(whole.crop((100, 40, 300, 340)), tmp_path / "crop.png")
    np.testing.assert_array_equal(load_image(path, [100, 40, 300, 340], spec, box_margin=0.0), load_image(cropped, None, spec))
    # margin 0.1 of a 200×300 box: 20 px left/right, 30 px top (clipped at 0)/bottom
    widened = save(whole.crop((80, 10, 320, 370)), tmp_path / "widened.png")
    np.testing.assert_array_equal(load_image(path, [100, 40, 300, 340], spec, box_margin=0.1), load_image(widened, None, spec))
    # fractional box, widened by 5.55 / 5.92 px, rounded outwards, clipped at the image's edge
    clipped = save(whole.crop((0, 0, 52, 61)), tmp_path / "clipped.png")
    np.testing.assert_array_equal(load_image(path, [-10, -5, 45.5, 54.2], spec, box_margin=0.1), load_image(clipped, None, spec))


@pytest.mark.parametrize(
    "box, code",
    [
        ([10, 10, 10, 50], "degenerate box"),
        ([50, 10, 20, 40], "degenerate box"),
        ([600, 600, 700, 700], "box outside image"),
        ([-50, 10, 0, 40], "box outside image"),
        ([1, 2, 3], "bad box"),
        ([0, 0, float("nan"), 5], "bad box"),
    ],
)
def test_bad_boxes_are_skipped(photos, box, code):
    with pytest.raises(SkippedImage) as caught:
        load_image(photos[("astronaut", "png")], box, ImageSpec(64), box_margin=0.1)
    assert caught.value.reason.split(":")[0] == code


def test_batches_with_boxes(photos):
    path = photos[("coffee", "png")]
    boxes = [None, [10, 10, 200, 200], [0, 0, 0, 0], [50, 60, 300, 200]]
    spec = ImageSpec(48)
    (batch,) = iter_batches([path] * 4, boxes, spec, batch_size=8, workers=1, box_margin=0.05)
    assert batch.indices.tolist() == [0, 1, 3]
    assert [(i, r.split(":")[0]) for i, r in batch.skipped] == [(2, "degenerate box")]
    np.testing.assert_array_equal(batch.images[2], load_image(path, boxes[3], spec, box_margin=0.05))
    with pytest.raises(ClipengineError, match="boxes"):
        next(iter_batches([path] * 4, boxes[:3], spec))


# ---- batching, ordering, prefetch, crashes -----------------------------------------------------
@pytest.fixture(scope="module")
def many_files(photos) -> list[str]:
    names = [photos[(n, e)] for n in PHOTOS for e in ("png", "jpg")]
    return [names[i % len(names)] for i in range(23)]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_batches_are_in_input_order_and_deterministic(many_files, workers):
    spec = ImageSpec(32)
    batches = list(iter_batches(many_files, None, spec, batch_size=5, workers=workers, prefetch_batches=2))
    assert [b.indices.tolist() for b in batches] == [list(range(s, min(s + 5, 23))) for s in range(0, 23, 5)]
    assert all(isinstance(b, Batch) and b.images.shape == (len(b.indices), 32, 32, 3) for b in batches)
    for batch in batches:
        for index, image in zip(batch.indices, batch.images):
            np.testing.assert_array_equal(image, load_image(many_files[index], None, spec))


class CountingLoader:
    """Wraps load_image and counts how many items have started decoding."""

    def __init__(self):
        self.started = 0
        self.lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.started += 1
        return load_image(*args, **kwargs)


@pytest.mark.parametrize("workers, prefetch", [(1, 1), (2, 2), (2, 3)])
def test_prefetch_is_bounded_for_a_slow_consumer(many_files, workers, prefetch):
    loader = CountingLoader()
    batch_size = 2
    consumed = 0
    peak = 0
    for batch in iter_batches(
        many_files, None, ImageSpec(16), batch_size=batch_size, workers=workers, prefetch_batches=prefetch, load=loader
    ):
        time.sleep(0.15)  # a slow consumer: decoding races ahead as far as it is allowed
        with loader.lock:
            ahead = loader.started - consumed
        peak = max(peak, ahead)
        consumed += len(batch.indices) + len(batch.skipped)
    # the batch in hand plus at most `prefetch` batches decoding or decoded
    assert peak <= (prefetch + 1) * batch_size <= (prefetch + workers) * batch_size
    assert peak >= min(prefetch + 1, 3) * batch_size  # and the decode really runs ahead
    assert consumed == len(many_files)


def test_threads_survive_an_exception_in_a_worker(many_files):
    def fragile(file, box, spec, **kwargs):
        if file.endswith("rocket.png"):
            raise RuntimeError("decoder bug")
        return load_image(file, box, spec, **kwargs)

    batches = list(iter_batches(many_files, None, ImageSpec(16), batch_size=4, workers=2, load=fragile))
    skipped = [s for b in batches for s in b.skipped]
    rockets = [i for i, f in enumerate(many_files) if f.endswith("rocket.png")]
    assert [i for i, _ in skipped] == rockets
    assert all(reason == "error: RuntimeError: decoder bug" for _, reason in skipped)
    assert sum(len(b.indices) for b in batches) == len(many_files) - len(rockets)


def test_empty_input_yields_nothing():
    assert list(iter_batches([], None, ImageSpec(16))) == []


# ---- listing inputs ----------------------------------------------------------------------------
def test_list_image_files(tmp_path):
    for rel in ["b/2.jpg", "a/10.PNG", "a/9.png", "top.webp", ".hidden/x.jpg", "a/.x.jpg", "notes.txt", "a/c/d.tiff"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    listed = list_image_files(tmp_path)
    assert [os.path.relpath(p, tmp_path) for p in listed] == ["a/10.PNG", "a/9.png", "a/c/d.tiff", "b/2.jpg", "top.webp"]
    assert list_image_files(tmp_path) == listed

    listing = tmp_path / "files.txt"
    listing.write_text("# my images\na/9.png\n\n  /abs/photo.jpg  \nmissing.jpg\n")
    assert list_image_files(listing) == [str(tmp_path / "a/9.png"), "/abs/photo.jpg", str(tmp_path / "missing.jpg")]
    assert list_image_files(tmp_path / "top.webp") == [str(tmp_path / "top.webp")]
    with pytest.raises(ClipengineError, match="no such file"):
        list_image_files(tmp_path / "absent")
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(ClipengineError, match="expected a folder"):
        list_image_files(tmp_path / "data.csv")


# ---- decoding with torchvision (the GPU path, exercised on the CPU here) ---------------------------
def check_torch_path(device: str, photos, bad_files):
    from clipengine.encode.gpu_decode import iter_batches_torch

    good = [photos[(n, e)] for n in PHOTOS for e in ("jpg", "png")]
    bad = {path: code for path, code in bad_files.values()}
    files = [*good[:4], *bad, *good[4:]]
    boxes = [None] * len(files)
    boxes[0] = [50, 40, 400, 300]  # a box on a device-decoded JPEG
    boxes[2] = [600, 600, 700, 700]  # and one outside the image
    spec = ImageSpec(224, fast_jpeg=False, fast_resize=False)
    batches = list(iter_batches_torch(files, boxes, spec, device=device, batch_size=6, workers=2, box_margin=0.1))
    skipped = dict(s for b in batches for s in b.skipped)
    decoded = [i for b in batches for i in b.indices.tolist()]
    assert sorted(decoded + list(skipped)) == list(range(len(files))) and decoded == sorted(decoded)
    assert skipped.pop(2).startswith("box outside image")
    for index, reason in skipped.items():
        expected = bad[files[index]]
        assert reason.split(":")[0] in ({expected} | ({"corrupt", "truncated"} if expected == "corrupt" else set()))
    for batch in batches:
        for index, image in zip(batch.indices, batch.images):
            cpu = load_image(files[index], boxes[index], spec, box_margin=0.1).astype(np.int16)
            difference = np.abs(np.asarray(image, dtype=np.int16) - cpu)
            assert difference.mean() < 0.5 and difference.max() <= 8, (files[index], difference.max())


def test_torchvision_decode_path_on_cpu(photos, bad_files):
    check_torch_path("cpu", photos, bad_files)


@pytest.mark.gpu
def test_cuda_jpeg_decode_is_close_to_pil(photos, bad_files):
    check_torch_path("cuda", photos, bad_files)
