"""The image pipeline: files (and optional object boxes) → square uint8 RGB arrays, in batches.

Geometry matches open_clip's inference preprocess (``open_clip.transform.image_transform``
with ``is_train=False``) bit for bit on RGB and grayscale images: PIL decode, resize in the
image's own mode (``shortest``: torchvision ``Resize(S)``, i.e. short side → S, long side
truncated; ``longest``: long side → S, rounded; ``squash``: both sides → S), center crop
(``longest`` pads with ``fill_color``), then ``convert("RGB")``. Mean/std normalization is left
to the device: the output is ``(S, S, 3) uint8``.

``ImageSpec.fast_jpeg`` (on by default) lets PIL decode a JPEG at 1/2, 1/4 or 1/8 DCT scale when
the decoded region stays ≥ ``DRAFT_MIN_FACTOR`` (2) × its resize target, then resizes only the
window the center crop keeps. It changes only JPEGs whose region's short side is ≥ 4·S (896 px at
S=224); measured against the exact path: max abs diff ≤ 14 levels, mean ≤ 0.25, embedding cosine
≥ 0.99999. ``ImageSpec.fast_resize`` (on by default) resizes RGB images with torch's vectorized antialiased
uint8 kernel instead of PIL's scalar one: the same filter, within 1 level of PIL when shrinking
and 2 when enlarging (mean difference under 0.02 levels), about 3× faster; resizing was over half the CPU time of decoding a 800×600
JPEG. ``fast_jpeg=False, fast_resize=False`` (``--exact-decode``) is bit-exact to open_clip on every file.

Where clipengine deliberately differs from open_clip (which feeds PIL's raw decode on):
- EXIF orientation is applied (``ImageOps.exif_transpose``): pixels are what a person sees;
  boxes are in that orientation's pixel coordinates. open_clip ignores the tag.
- Alpha (RGBA, LA, PA, P with a transparent index) is composited over white before resizing;
  open_clip resizes premultiplied and then drops alpha (transparent areas turn black/arbitrary).
- Palette and 1-bit images are converted before resizing (PIL would resize them nearest-neighbour).
- 16/32-bit integer grayscale (I;16, I) is scaled to 8 bits (÷257); PIL's ``convert("RGB")``
  clips at 255 and turns most such images white. Float (F) images are skipped.
- CMYK is converted with PIL's plain conversion (no ICC colour management).

Bad input never raises out of a batch: each item either decodes or is recorded as skipped with
a stable reason (the part before the first ``:`` is the code): ``missing file``, ``not a file``,
``empty file``, ``unreadable``, ``not an image``, ``too many pixels``, ``truncated`` (a JPEG/PNG cut short is
skipped rather than padded with grey: the missing rows would be invented content),
``corrupt``, ``unsupported mode``, ``bad box``, ``degenerate box``, ``box outside image``,
``error`` (anything unexpected), ``worker crashed`` (process pool only).

Decoding runs in a thread pool by default: PIL releases the GIL in decode and resize, and on the
2-core machine threads beat spawned processes (no start-up, no pickling of pixels). The process
pool exists for decoder crashes (a segfaulting codec kills one worker, the item is skipped).
``iter_batches_torch`` is a separate path decoding JPEGs with torchvision (nvJPEG on CUDA).
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BOX_MARGIN,
    DEFAULT_MAX_PIXELS,
    DEFAULT_PREFETCH_BATCHES,
)
from .errors import ClipengineError

# JPEG draft (reduced-DCT) decoding is used only when the decoded region stays at least this many
# times larger than the resize target, so that the bicubic resize after it still dominates.
# Measured (S=224, 30 photos of 2000–4200 px; 80 of 500–1700 px), draft vs exact decode: max abs
# pixel diff 14 (9), mean 0.23 (0.15), embedding cosine ≥ 0.999996, decode 3.8× (1.7×) faster.
# At factor 1 the max diff reaches 59 and the mean 0.7, hence 2.
DRAFT_MIN_FACTOR = 2.0
DEFAULT_FAST_JPEG = True
DEFAULT_FAST_RESIZE = True
DEFAULT_POOL = "thread"

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_RESIZE_MODES = ("shortest", "longest", "squash")
_EXIF_ORIENTATION = 0x0112
_WHITE = 255
# A resize whose output (before the center crop) exceeds this many S×S squares (aspect > 64:1)
# resizes only the kept window instead (open_clip would allocate the whole strip).
_MAX_RESIZED_AREA = 64

# clipengine enforces its own pixel cap (max_pixels, from the header, before decoding); PIL's warning
# for images between its limit and twice it would only repeat that (above twice, PIL raises: skipped).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# torch warns once when it wraps read-only memory; _resize_crop_vectorized only reads PIL's pixels
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning, module=__name__)


@dataclass(frozen=True)
class ImageSpec:
    """How the model wants its pixels: square side ``image_size`` (S), resize interpolation,
    open_clip ``resize_mode`` (shortest | longest | squash), pad colour for ``longest``, and
    whether JPEGs may be decoded at reduced DCT scale (``fast_jpeg``) and RGB images resized on
    torch's vectorized kernel (``fast_resize``); neither is bit-exact."""

    image_size: int
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0
    fast_jpeg: bool = DEFAULT_FAST_JPEG
    fast_resize: bool = DEFAULT_FAST_RESIZE

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ClipengineError(f"image_size must be a positive integer, got {self.image_size!r}")
        # open_clip maps 'random' to bicubic at inference
        if self.interpolation == "random":
            object.__setattr__(self, "interpolation", "bicubic")
        if self.interpolation not in _RESAMPLE:
            raise ClipengineError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")
        if self.resize_mode not in _RESIZE_MODES:
            raise ClipengineError(f"resize_mode must be one of {list(_RESIZE_MODES)}, got {self.resize_mode!r}")

    @classmethod
    def from_preprocess_cfg(cls, cfg: Mapping[str, Any] | Any, *, fast_jpeg: bool = DEFAULT_FAST_JPEG,
                            fast_resize: bool | None = None) -> "ImageSpec":
        """From an open_clip preprocess cfg (a dict with ``size``, ``interpolation``, ``resize_mode``,
        ``fill_color``, or a ``PreprocessCfg``). Non-square sizes are rejected (encoders take S×S).
        ``fast_resize`` None follows ``fast_jpeg``: ``fast_jpeg=False`` alone asks for the bit-exact path."""
        if not isinstance(cfg, Mapping):
            cfg = {k: getattr(cfg, k) for k in ("size", "interpolation", "resize_mode", "fill_color") if hasattr(cfg, k)}
        size = cfg.get("size", cfg.get("image_size", 224))
        if isinstance(size, (list, tuple)):
            if len(size) == 1 or (len(size) == 2 and size[0] == size[1]):
                size = size[0]
            else:
                raise ClipengineError(f"preprocess size {tuple(size)} is not square; only square inputs are supported")
        return cls(
            image_size=int(size),
            interpolation=cfg.get("interpolation") or "bicubic",
            resize_mode=cfg.get("resize_mode") or "shortest",
            fill_color=int(cfg.get("fill_color") or 0),
            fast_jpeg=fast_jpeg,
            fast_resize=fast_jpeg if fast_resize is None else fast_resize,
        )

    @classmethod
    def from_model(cls, model: Any, *, fast_jpeg: bool = DEFAULT_FAST_JPEG,
                   fast_resize: bool | None = None) -> "ImageSpec":
        """From a loaded open_clip model (its ``visual.preprocess_cfg``, else ``visual.image_size``)."""
        from open_clip import (
            get_model_preprocess_cfg,  # heavy: only when a model is at hand
        )

        return cls.from_preprocess_cfg(get_model_preprocess_cfg(model), fast_jpeg=fast_jpeg, fast_resize=fast_resize)


class SkippedImage(Exception):
    """An item that cannot be turned into pixels; ``reason`` is ``"<code>"`` or ``"<code>: <detail>"``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Batch:
    """One decoded batch: ``indices`` (B,) int64 positions into the inputs (ascending),
    ``images`` (B, S, S, 3) uint8 RGB, ``skipped`` [(index, reason)] of this batch's input range.
    B may be 0 when every item of the range was skipped."""

    indices: np.ndarray
    images: np.ndarray
    skipped: list[tuple[int, str]] = field(default_factory=list)


# ---- one image ---------------------------------------------------------------------------------
def load_image(
    file: str | os.PathLike,
    box: Sequence[float] | None,
    spec: ImageSpec,
    *,
    box_margin: float = DEFAULT_BOX_MARGIN,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode ``file`` (optionally its ``box`` [x0, y0, x1, y1] in pixels of the EXIF-oriented
    image, widened by ``box_margin`` × the box's width/height on each side and clipped to the image)
    and resize/crop it as the model's preprocess does → (S, S, 3) uint8 RGB.

    Raises ``SkippedImage`` with a stable reason for anything that cannot be decoded.
    """
    path = _check_file(file)
    raw_box = None if box is None else _check_box(box)
    try:
        with Image.open(path) as image:
            return _process(image, raw_box, spec, box_margin, max_pixels)
    except SkippedImage:
        raise
    except UnidentifiedImageError:
        raise SkippedImage("not an image") from None
    except Image.DecompressionBombError as error:
        raise SkippedImage(f"too many pixels: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        message = str(error) or type(error).__name__
        code = "truncated" if "truncat" in message.lower() or isinstance(error, EOFError) else "corrupt"
        raise SkippedImage(f"{code}: {message}") from None


def _check_file(file: str | os.PathLike) -> Path:
    path = Path(file)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise SkippedImage("missing file") from None
    except OSError as error:
        raise SkippedImage(f"unreadable: {error.strerror or error}") from None
    if not path.is_file():
        raise SkippedImage("not a file: a directory" if path.is_dir() else "not a file")
    if stat.st_size == 0:
        raise SkippedImage("empty file")
    return path


def _check_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise SkippedImage(f"bad box: {box!r}") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise SkippedImage(f"bad box: {list(box)!r}")
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise SkippedImage(f"degenerate box: {list(values)!r}")
    return values


def _process(image: Image.Image, box, spec: ImageSpec, margin: float, max_pixels: int) -> np.ndarray:
    width, height = image.size  # from the header, nothing decoded yet
    if width * height > max_pixels:
        raise SkippedImage(f"too many pixels: {width}x{height} > {max_pixels}")
    orientation = _orientation(image)
    transposed = orientation in (5, 6, 7, 8)
    oriented = (height, width) if transposed else (width, height)

    region = (0, 0, oriented[0], oriented[1]) if box is None else _box_region(box, oriented, margin)
    scale = 1
    if spec.fast_jpeg and image.format == "JPEG":
        scale = _draft_scale(region, spec)
        if scale > 1:
            drafted = image.draft(None, (width // scale, height // scale))
            # draft answers (mode, (0, 0, W / s, H / s)); it may decline (progressive, multi-tile)
            scale = round(width / drafted[1][2]) if drafted is not None else 1

    image.load()
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        image = ImageOps.exif_transpose(image)
    image = _to_resizable_mode(image)

    region_w, region_h = region[2] - region[0], region[3] - region[1]
    target = _resize_size(region_w, region_h, spec)
    if scale > 1 or target[0] * target[1] > _MAX_RESIZED_AREA * spec.image_size**2:
        # Reduced-DCT decode (already not bit-exact), or an extreme aspect ratio whose full resize
        # would take gigabytes: resize only the window the center crop keeps, read from the
        # (reduced) image as a fractional box, as PIL's thumbnail does, so the geometry is unchanged.
        # Skipping the cropped-away margins also saves about a quarter of the resize on 4:3 photos.
        if spec.resize_mode == "longest":
            window, output = (0, 0, target[0], target[1]), target
        else:
            window, output = _crop_window(target, spec.image_size), (spec.image_size, spec.image_size)
        sx, sy = region_w / target[0], region_h / target[1]
        fractional = (
            (region[0] + window[0] * sx) / scale,
            (region[1] + window[1] * sy) / scale,
            (region[0] + window[2] * sx) / scale,
            (region[1] + window[3] * sy) / scale,
        )
        image = image.resize(output, _RESAMPLE[spec.interpolation], box=_clip_box(fractional, image.size))
    elif spec.fast_resize and image.mode == "RGB" and spec.resize_mode != "longest":
        return _resize_crop_vectorized(image, region, target, spec)
    else:
        # open_clip's geometry: crop, then resize the whole region like torchvision's Resize
        if region != (0, 0, image.size[0], image.size[1]):
            image = image.crop(region)
        if target != image.size:
            if spec.fast_resize and image.mode == "RGB":
                image = _resize_vectorized(image, target, spec.interpolation)
            else:  # bit-exact with open_clip
                image = image.resize(target, _RESAMPLE[spec.interpolation])
    image = _center_crop(image, spec)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)  # writable (asarray of a PIL image is read-only)


def _resize_crop_vectorized(image: Image.Image, region, target: tuple[int, int], spec: ImageSpec) -> np.ndarray:
    """open_clip's crop → resize → center crop of an RGB ``image`` → (S, S, 3) uint8, on torch's
    vectorized antialiased uint8 kernel, reading PIL's pixels in place: the same result as
    :func:`_resize_vectorized` plus PIL crops, without three copies through PIL (a quarter less CPU)."""
    import torch

    pixels = _rgbx_pixels(image)
    if pixels is None:
        pixels = np.array(image, dtype=np.uint8)  # (H, W, 3)
    left, top, right, bottom = region
    window = torch.from_numpy(pixels)[top:bottom, left:right].permute(2, 0, 1).unsqueeze(0)  # (1, C, h, w)
    if target != (right - left, bottom - top):
        window = _interpolate_uint8(window, target, spec.interpolation)
    x0, y0, x1, y1 = _crop_window(target, spec.image_size)
    return np.ascontiguousarray(window[0, :3, y0:y1, x0:x1].permute(1, 2, 0).numpy())


def _rgbx_pixels(image: Image.Image) -> np.ndarray | None:
    """(H, W, 4) uint8 read-only view of an RGB image's own storage (PIL keeps RGB as RGBX), through
    Pillow's Arrow export; None where that is unavailable (older Pillow, rows not in one block)."""
    if not hasattr(image, "__arrow_c_array__"):
        return None
    import pyarrow as pa

    width, height = image.size
    try:
        array = pa.array(image)
    except (ValueError, TypeError, pa.ArrowException):  # e.g. "Image rows are not contiguous in memory"
        return None
    data = array.buffers()[-1]
    if len(array) != width * height or array.offset or data is None or data.size < 4 * width * height:
        return None
    return np.frombuffer(data, dtype=np.uint8, count=4 * width * height).reshape(height, width, 4)


def _resize_vectorized(image: Image.Image, size: tuple[int, int], interpolation: str) -> Image.Image:
    """``image.resize(size, interpolation)`` for RGB on torch's vectorized uint8 antialiased kernel:
    the same filter as PIL's (within 1 level shrinking, 2 enlarging), about 3× faster than PIL's scalar code."""
    import torch

    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)  # channels-last
    resized = _interpolate_uint8(pixels, size, interpolation)
    return Image.fromarray(resized[0].permute(1, 2, 0).contiguous().numpy(), "RGB")


def _interpolate_uint8(window, size: tuple[int, int], interpolation: str):
    """(1, C, h, w) uint8 tensor → (1, C, H, W) for ``size`` = (W, H), antialiased, on torch's
    vectorized uint8 kernel (channels-last layout), one torch thread inside decode workers."""
    import torch

    _limit_worker_torch_threads(torch)
    window = window.contiguous(memory_format=torch.channels_last)
    return torch.nn.functional.interpolate(window, size=(size[1], size[0]), mode=interpolation, antialias=True)


_worker_threads_limited = threading.local()
_decode_process = False  # set in the processes of the decode pool (pool="process")


def _limit_worker_torch_threads(torch) -> None:
    """One torch thread inside a decode worker thread or process: otherwise every worker opens its
    own OpenMP team of all cores (measured: half the throughput of two single-threaded workers). The
    main thread of any other process keeps its setting: the model may be running there."""
    if getattr(_worker_threads_limited, "done", False):
        return
    if _decode_process or threading.current_thread() is not threading.main_thread():
        # OpenMP's thread count is per thread, so the main thread keeps its own; torch also makes it
        # the default of threads started later, and clipengine never runs a model in such a thread
        torch.set_num_threads(1)
    _worker_threads_limited.done = True


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if value else 1
    except Exception:  # a broken EXIF block is not a reason to lose the pixels
        return 1


def _box_region(box, size: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """Integer crop [left, top, right, bottom) of the widened box, clipped to the image."""
    width, height = size
    x0, y0, x1, y1 = box
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise SkippedImage(f"box outside image: {list(box)!r} not within {width}x{height}")
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    left = max(0, math.floor(x0 - dx))
    top = max(0, math.floor(y0 - dy))
    right = min(width, math.ceil(x1 + dx))
    bottom = min(height, math.ceil(y1 + dy))
    if right - left < 1 or bottom - top < 1:
        raise SkippedImage(f"degenerate box: {list(box)!r} covers no whole pixel")
    return left, top, right, bottom


def _clip_box(box, size):
    return (max(0.0, box[0]), max(0.0, box[1]), min(float(size[0]), box[2]), min(float(size[1]), box[3]))


def _resize_size(width: int, height: int, spec: ImageSpec) -> tuple[int, int]:
    """(w, h) after open_clip's resize step (before the center crop)."""
    size = spec.image_size
    if spec.resize_mode == "squash":
        return size, size
    if spec.resize_mode == "longest":
        # open_clip ResizeKeepRatio(longest=1): ratio = max(h/S, w/S), sides rounded
        ratio = max(height / size, width / size)
        return round(width / ratio), round(height / ratio)
    # torchvision Resize(int): short side → S, long side int(S * long / short)
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _crop_window(size: tuple[int, int], side: int) -> tuple[int, int, int, int]:
    """[left, top, right, bottom) of torchvision's CenterCrop(side) in an image of ``size`` ≥ side."""
    top = int(round((size[1] - side) / 2.0))
    left = int(round((size[0] - side) / 2.0))
    return left, top, left + side, top + side


def _center_crop(image: Image.Image, spec: ImageSpec) -> Image.Image:
    size = spec.image_size
    width, height = image.size
    if width == size and height == size:
        return image
    if width < size or height < size:  # only in 'longest' mode: pad like open_clip's CenterCropOrPad
        fill = spec.fill_color if image.mode in ("RGB", "L") else 0
        canvas = Image.new(image.mode, (max(width, size), max(height, size)), _fill_for(image.mode, fill))
        canvas.paste(image, ((max(size - width, 0)) // 2, (max(size - height, 0)) // 2))
        image = canvas
        width, height = image.size
        if width == size and height == size:
            return image
    return image.crop(_crop_window((width, height), size))


def _fill_for(mode: str, fill: int):
    return (fill,) * len(mode) if len(mode) > 1 and mode in ("RGB", "RGBA") else fill


def _to_resizable_mode(image: Image.Image) -> Image.Image:
    """RGB and L stay as they are (open_clip resizes them natively: parity); everything else becomes
    RGB or L the way a viewer would show it."""
    mode = image.mode
    if mode in ("RGB", "L"):
        return image
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "RGBa", "La"):
        if mode in ("RGBa", "La"):
            image = image.convert(mode.upper())
        base = "RGB" if image.mode == "RGBA" else "L"
        background = Image.new(base, image.size, (_WHITE,) * 3 if base == "RGB" else _WHITE)
        background.paste(image.convert(base), mask=image.getchannel("A"))
        return background
    if mode == "1":
        return image.convert("L")
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        pixels = np.asarray(image).astype(np.float64)
        # 16-bit samples → 8 bits (65535 → 255); I (32-bit) is treated as 16-bit range
        return Image.fromarray(np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8), "L")
    if mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return image.convert("RGB")
    raise SkippedImage(f"unsupported mode: {mode}")


def _draft_scale(region, spec: ImageSpec) -> int:
    """Largest JPEG DCT reduction (1, 2, 4, 8) keeping the region ≥ DRAFT_MIN_FACTOR × its resize target."""
    region_w, region_h = region[2] - region[0], region[3] - region[1]
    target_w, target_h = _resize_size(region_w, region_h, spec)
    limit = min(region_w / (DRAFT_MIN_FACTOR * target_w), region_h / (DRAFT_MIN_FACTOR * target_h))
    for scale in (8, 4, 2):
        if scale <= limit:
            return scale
    return 1


# ---- batches -----------------------------------------------------------------------------------
def iter_batches(
    files: Sequence[str | os.PathLike],
    boxes: Sequence[Sequence[float] | None] | None,
    spec: ImageSpec,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    prefetch_batches: int = DEFAULT_PREFETCH_BATCHES,
    box_margin: float = DEFAULT_BOX_MARGIN,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    pool: str = DEFAULT_POOL,
    _load: Callable[..., np.ndarray] | None = None,
) -> Iterator[Batch]:
    """Decode ``files`` (with ``boxes[i]`` or None = whole image; ``boxes`` None = all whole)
    into batches over consecutive input ranges of ``batch_size``, in input order.

    Decoding runs in ``workers`` threads (``pool="thread"``, default: PIL releases the GIL while it
    decodes and resizes) or processes (``pool="process"``: isolates decoder crashes), overlapped
    with the consumer; at most ``prefetch_batches`` batches are decoding or decoded ahead of the
    one the consumer holds. ``workers=0`` decodes in the calling thread. ``workers=None``: one per core.
    Every input index appears exactly once: in some ``Batch.indices`` or ``Batch.skipped``.
    """
    if boxes is not None and len(boxes) != len(files):
        raise ClipengineError(f"got {len(boxes)} boxes for {len(files)} files; pass one box (or None) per file")
    if batch_size < 1:
        raise ClipengineError(f"batch_size must be ≥ 1, got {batch_size}")
    if pool not in ("thread", "process"):
        raise ClipengineError(f"pool must be 'thread' or 'process', got {pool!r}")
    workers = _default_workers() if workers is None else int(workers)
    ahead = max(1, int(prefetch_batches))
    load = _load or load_image
    options = (spec, box_margin, max_pixels, load)
    ranges = [(start, min(start + batch_size, len(files))) for start in range(0, len(files), batch_size)]

    def task(start: int, stop: int) -> tuple:
        return (
            [os.fspath(f) for f in files[start:stop]],
            None if boxes is None else list(boxes[start:stop]),
            start,
        )

    if workers <= 0:
        for start, stop in ranges:
            yield _decode_range(*task(start, stop), *options)
        return

    if pool == "thread":
        yield from _run_threads(ranges, task, options, workers, ahead)
    else:
        yield from _run_processes(ranges, task, options, workers, ahead)


def _run_threads(ranges, task, options, workers: int, ahead: int, work=None) -> Iterator:
    """Run ``work(*task(*range), *options)`` for each range in ``workers`` threads, results in order,
    at most ``ahead`` submitted beyond the one the consumer holds."""
    work = work or _decode_range
    from concurrent.futures import ThreadPoolExecutor

    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipengine-decode")
    pending: deque = deque()
    position = 0

    def refill():
        nonlocal position
        while position < len(ranges) and len(pending) < ahead:
            pending.append(executor.submit(work, *task(*ranges[position]), *options))
            position += 1

    try:
        refill()
        while pending:
            batch = pending.popleft().result()
            refill()  # before handing the batch over, so decoding overlaps the consumer
            yield batch
    finally:
        for future in pending:
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)


def _run_processes(ranges, task, options, workers: int, ahead: int) -> Iterator[Batch]:
    from concurrent.futures.process import BrokenProcessPool

    executor = _process_pool(workers)
    pending: deque = deque()  # (range, future | None when the pool was already broken)
    position = 0

    def submit(span):
        try:
            return executor.submit(_decode_range, *task(*span), *options)
        except BrokenProcessPool:
            return None

    def refill():
        nonlocal position
        while position < len(ranges) and len(pending) < ahead:
            pending.append((ranges[position], submit(ranges[position])))
            position += 1

    try:
        refill()
        while pending:
            span, future = pending.popleft()
            try:
                if future is None:
                    raise BrokenProcessPool("submitted to a broken pool")
                batch = future.result()
            except BrokenProcessPool:
                # A worker died (decoder segfault, OOM kill) and took every queued future of its pool
                # with it: redo this range item by item in fresh pools to find the culprit, resubmit the
                # rest (a range that only shared the pool with the culprit decodes normally next time).
                executor.shutdown(wait=False, cancel_futures=True)
                batch, executor = _isolate_crash(span, task, options, workers)
                pending = deque((s, submit(s)) for s, _ in pending)
            refill()
            yield batch
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _isolate_crash(span, task, options, workers: int):
    from concurrent.futures.process import BrokenProcessPool

    files, boxes, start = task(*span)
    parts: list[Batch] = []
    executor = _process_pool(workers)
    for offset, file in enumerate(files):
        box = None if boxes is None else [boxes[offset]]
        try:
            parts.append(executor.submit(_decode_range, [file], box, start + offset, *options).result())
        except BrokenProcessPool:
            executor.shutdown(wait=False, cancel_futures=True)
            executor = _process_pool(workers)
            parts.append(_empty_batch(options[0], [(start + offset, "worker crashed: the decoder process died")]))
    return _concat(parts, options[0]), executor


def _process_pool(workers: int):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent may hold torch/CUDA threads that a fork would copy half-locked
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_become_decode_process)


def _become_decode_process() -> None:
    global _decode_process
    _decode_process = True


def _decode_range(files, boxes, start, spec, box_margin, max_pixels, load) -> Batch:
    """Decode one input range → Batch; every failure becomes a skip record, never an exception."""
    size = spec.image_size
    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    indices: list[int] = []
    skipped: list[tuple[int, str]] = []
    for offset, file in enumerate(files):
        index = start + offset
        box = None if boxes is None else boxes[offset]
        try:
            images[len(indices)] = load(file, box, spec, box_margin=box_margin, max_pixels=max_pixels)
        except SkippedImage as skip:
            skipped.append((index, skip.reason))
            continue
        except MemoryError:
            skipped.append((index, "error: out of memory while decoding"))
            continue
        except Exception as error:  # one bad file never stops a batch
            skipped.append((index, f"error: {type(error).__name__}: {error}"))
            continue
        indices.append(index)
    count = len(indices)
    return Batch(np.asarray(indices, dtype=np.int64), images[:count] if count < len(files) else images, skipped)


def _empty_batch(spec: ImageSpec, skipped) -> Batch:
    size = spec.image_size
    return Batch(np.empty(0, dtype=np.int64), np.empty((0, size, size, 3), dtype=np.uint8), list(skipped))


def _concat(parts: list[Batch], spec: ImageSpec) -> Batch:
    if not parts:
        return _empty_batch(spec, [])
    return Batch(
        np.concatenate([p.indices for p in parts]),
        np.concatenate([p.images for p in parts]),
        [s for p in parts for s in p.skipped],
    )


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


# ---- JPEG decoding on the device (torchvision / nvJPEG) -----------------------------------------
def iter_batches_torch(
    files: Sequence[str | os.PathLike],
    boxes: Sequence[Sequence[float] | None] | None,
    spec: ImageSpec,
    *,
    device: str = "cuda",
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    prefetch_batches: int = DEFAULT_PREFETCH_BATCHES,
    box_margin: float = DEFAULT_BOX_MARGIN,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    to_numpy: bool = True,
) -> Iterator[Batch]:
    """Like ``iter_batches``, but baseline RGB/grayscale JPEGs are decoded in batches by
    ``torchvision.io.decode_jpeg(device=device)`` (nvJPEG on ``"cuda"``) and resized there with
    antialiased bicubic/bilinear interpolation (close to PIL, not bit-exact: ±1–2 levels).

    Worker threads read the files and check headers (size cap, EXIF, mode, complete JPEG);
    anything else (PNG, CMYK, EXIF-rotated, truncated, …) is decoded on the CPU by ``load_image``
    in those threads, with the same skip reasons. ``to_numpy=False`` leaves ``Batch.images`` as a
    (B, S, S, 3) uint8 torch tensor on ``device``.
    """
    if boxes is not None and len(boxes) != len(files):
        raise ClipengineError(f"got {len(boxes)} boxes for {len(files)} files; pass one box (or None) per file")
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as error:  # pragma: no cover - torch/torchvision are dependencies
        from .errors import MissingDependencyError

        raise MissingDependencyError(error.name or "torchvision", purpose="JPEG decoding on the GPU") from None
    # torchvision 0.29 deprecates its image codecs in favour of torchcodec; they still work
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ClipengineError("GPU JPEG decoding needs CUDA, and no CUDA device is available")
    workers = max(1, _default_workers() if workers is None else int(workers))
    ranges = [(start, min(start + batch_size, len(files))) for start in range(0, len(files), max(1, batch_size))]

    def task(start: int, stop: int) -> tuple:
        return [os.fspath(f) for f in files[start:stop]], None if boxes is None else list(boxes[start:stop]), start

    options = (spec, box_margin, max_pixels)
    size = spec.image_size
    for prepared in _run_threads(ranges, task, options, workers, max(1, prefetch_batches), work=_prepare_range):
        start, items, skipped = prepared
        images, indices = [], []
        on_device = [(i, data, region) for i, kind, data, region in items if kind == "jpeg"]
        decoded = _decode_jpegs([d for _, d, _ in on_device], device, decode_jpeg, ImageReadMode.RGB, torch)
        outputs: dict[int, Any] = {}
        for (index, data, region), image in zip(on_device, decoded):
            if image is None:  # the device decoder refused it: let PIL decide (pixels or a reason)
                try:
                    image = torch.from_numpy(load_image(files[index], None if boxes is None else boxes[index], spec,
                                                        box_margin=box_margin, max_pixels=max_pixels)).to(device)
                    outputs[index] = image
                except SkippedImage as skip:
                    skipped.append((index, skip.reason))
                continue
            outputs[index] = _resize_tensor(image, region, spec, torch)
        for index, kind, pixels, _ in items:
            if kind == "pixels":
                outputs[index] = torch.from_numpy(pixels).to(device)
        for index in sorted(outputs):
            indices.append(index)
            images.append(outputs[index])
        stacked = torch.stack(images) if images else torch.empty((0, size, size, 3), dtype=torch.uint8, device=device)
        yield Batch(
            np.asarray(indices, dtype=np.int64),
            stacked.cpu().numpy() if to_numpy else stacked,
            sorted(skipped),
        )


def _prepare_range(files, boxes, start, spec, box_margin, max_pixels):
    """Worker side of ``iter_batches_torch``: (start, [(index, "jpeg", bytes, region) |
    (index, "pixels", (S,S,3) uint8, None)], skipped)."""
    import io

    items, skipped = [], []
    for offset, file in enumerate(files):
        index = start + offset
        box = None if boxes is None else boxes[offset]
        try:
            path = _check_file(file)
            raw_box = None if box is None else _check_box(box)
            data = path.read_bytes()
            region = None
            # only plain, complete JPEGs go to the device; the rest is PIL's
            if data[:2] == b"\xff\xd8" and b"\xff\xd9" in data[-64:]:
                try:
                    with Image.open(io.BytesIO(data)) as image:
                        width, height = image.size
                        plain = image.mode in ("RGB", "L") and _orientation(image) == 1
                except Exception:
                    plain = False
                if plain:
                    if width * height > max_pixels:
                        raise SkippedImage(f"too many pixels: {width}x{height} > {max_pixels}")
                    region = (0, 0, width, height) if raw_box is None else _box_region(raw_box, (width, height), box_margin)
            if region is not None:
                items.append((index, "jpeg", data, region))
            else:
                items.append((index, "pixels", load_image(file, box, spec, box_margin=box_margin, max_pixels=max_pixels), None))
        except SkippedImage as skip:
            skipped.append((index, skip.reason))
        except Exception as error:  # one bad file never stops a batch
            skipped.append((index, f"error: {type(error).__name__}: {error}"))
    return start, items, skipped


def _decode_jpegs(datas: list[bytes], device: str, decode_jpeg, mode, torch) -> list:
    """[(3, H, W) uint8 tensor on device | None where the decoder refused that file]."""
    if not datas:
        return []
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        return list(decode_jpeg(tensors, mode=mode, device=device))
    except RuntimeError:  # one bad stream fails the whole batched call: retry one by one
        results = []
        for tensor in tensors:
            try:
                results.append(decode_jpeg(tensor, mode=mode, device=device))
            except RuntimeError:
                results.append(None)
        return results


def _resize_tensor(image, region, spec: ImageSpec, torch):
    """(3, H, W) uint8 → (S, S, 3) uint8: crop region, resize as open_clip does, center crop/pad."""
    left, top, right, bottom = region
    crop = image[:, top:bottom, left:right]
    width, height = right - left, bottom - top
    target_w, target_h = _resize_size(width, height, spec)
    if (target_w, target_h) != (width, height):
        resized = torch.nn.functional.interpolate(
            crop[None].float(), size=(target_h, target_w), mode=spec.interpolation, antialias=True, align_corners=False
        )[0]
        crop = resized.round_().clamp_(0, 255).to(torch.uint8)
    size = spec.image_size
    if target_w < size or target_h < size:
        canvas = torch.full((3, max(size, target_h), max(size, target_w)), spec.fill_color, dtype=torch.uint8, device=crop.device)
        y, x = max(size - target_h, 0) // 2, max(size - target_w, 0) // 2
        canvas[:, y : y + target_h, x : x + target_w] = crop
        crop, target_w, target_h = canvas, canvas.shape[2], canvas.shape[1]
    x0, y0, x1, y1 = _crop_window((target_w, target_h), size)
    return crop[:, y0:y1, x0:x1].permute(1, 2, 0).contiguous()


# ---- inputs ------------------------------------------------------------------------------------
def list_image_files(source: str | os.PathLike) -> list[str]:
    """Image files to encode: a folder → every image file below it (by extension, hidden entries
    left out, sorted by relative path); a text file (.txt/.lst/.list) → its lines (blank lines and
    ``#`` comments dropped; relative paths are relative to the list file's folder); an image file → itself."""
    path = Path(source)
    if path.is_dir():
        found: list[str] = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel_root = Path(root).relative_to(path)
            found.extend(
                (rel_root / name).as_posix()
                for name in names
                if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
            )
        return [str(path / rel) for rel in sorted(found)]
    if not path.exists():
        raise ClipengineError(f"{source}: no such file or folder")
    if path.suffix.lower() in LIST_EXTENSIONS:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ClipengineError(f"{source}: a list of image paths must be UTF-8 text") from None
        entries = [line.strip() for line in lines]
        return [str(path.parent / e) if not os.path.isabs(e) else e for e in entries if e and not e.startswith("#")]
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return [str(path)]
    raise ClipengineError(
        f"{source}: expected a folder of images, an image, or a text file of paths (.txt, .lst, .list)"
    )
