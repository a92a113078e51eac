"""Where an image's pixels go: the model's square input geometry and the resizes that produce it.

``ImageSpec`` says what the model wants (side S, interpolation, open_clip's ``resize_mode``, pad
colour). The functions reproduce open_clip's inference preprocess (``open_clip.transform.image_transform``
with ``is_train=False``): resize in the image's own mode (``shortest``: torchvision ``Resize(S)``,
short side → S, long side truncated; ``longest``: long side → S, rounded; ``squash``: both sides → S),
then center crop (``longest`` pads with ``fill_color``).

Two faster paths are on by default and are not bit-exact (``--exact-decode`` turns both off):
``fast_jpeg`` lets PIL decode a JPEG at 1/2, 1/4 or 1/8 DCT scale when the decoded region stays
≥ ``DRAFT_MIN_FACTOR`` × its resize target; ``fast_resize`` resizes RGB images with torch's vectorized
antialiased uint8 kernel instead of PIL's scalar one (the same filter, within 1 level of PIL when
shrinking and 2 when enlarging). ``bench/images.py`` measures both against open_clip's preprocess.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from PIL import Image

from clipengine.errors import ClipengineError

# JPEG draft (reduced-DCT) decoding is used only when the decoded region stays at least this many
# times larger than the resize target, so that the resize after it still dominates the result: at
# factor 1 the pixel differences to an exact decode grow several-fold (bench/images.py compares them).
DRAFT_MIN_FACTOR = 2.0
DEFAULT_FAST_JPEG = True
DEFAULT_FAST_RESIZE = True

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
RESIZE_MODES = ("shortest", "longest", "squash")
# A resize whose output (before the center crop) exceeds this many S×S squares (aspect > 64:1)
# resizes only the kept window instead (open_clip would allocate the whole strip).
MAX_RESIZED_AREA = 64


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
        if self.interpolation not in RESAMPLE:
            raise ClipengineError(f"interpolation must be one of {sorted(RESAMPLE)}, got {self.interpolation!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ClipengineError(f"resize_mode must be one of {list(RESIZE_MODES)}, got {self.resize_mode!r}")

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


def resize_size(width: int, height: int, spec: ImageSpec) -> tuple[int, int]:
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


def crop_window(size: tuple[int, int], side: int) -> tuple[int, int, int, int]:
    """[left, top, right, bottom) of torchvision's CenterCrop(side) in an image of ``size`` ≥ side."""
    top = int(round((size[1] - side) / 2.0))
    left = int(round((size[0] - side) / 2.0))
    return left, top, left + side, top + side


def center_crop(image: Image.Image, spec: ImageSpec) -> Image.Image:
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
    return image.crop(crop_window((width, height), size))


def _fill_for(mode: str, fill: int):
    return (fill,) * len(mode) if len(mode) > 1 and mode in ("RGB", "RGBA") else fill


def clip_box(box, size):
    return (max(0.0, box[0]), max(0.0, box[1]), min(float(size[0]), box[2]), min(float(size[1]), box[3]))


def draft_scale(region, spec: ImageSpec) -> int:
    """Largest JPEG DCT reduction (1, 2, 4, 8) keeping the region ≥ DRAFT_MIN_FACTOR × its resize target."""
    region_w, region_h = region[2] - region[0], region[3] - region[1]
    target_w, target_h = resize_size(region_w, region_h, spec)
    limit = min(region_w / (DRAFT_MIN_FACTOR * target_w), region_h / (DRAFT_MIN_FACTOR * target_h))
    for scale in (8, 4, 2):
        if scale <= limit:
            return scale
    return 1


# ---- batches -----------------------------------------------------------------------------------


def resize_crop_vectorized(image: Image.Image, region, target: tuple[int, int], spec: ImageSpec) -> np.ndarray:
    """open_clip's crop → resize → center crop of an RGB ``image`` → (S, S, 3) uint8, on torch's
    vectorized antialiased uint8 kernel, reading PIL's pixels in place: the same result as
    :func:`resize_vectorized` plus PIL crops, without three copies through PIL (a quarter less CPU)."""
    import torch

    pixels = _rgbx_pixels(image)
    if pixels is None:
        pixels = np.array(image, dtype=np.uint8)  # (H, W, 3)
    left, top, right, bottom = region
    window = torch.from_numpy(pixels)[top:bottom, left:right].permute(2, 0, 1).unsqueeze(0)  # (1, C, h, w)
    if target != (right - left, bottom - top):
        window = interpolate_uint8(window, target, spec.interpolation)
    x0, y0, x1, y1 = crop_window(target, spec.image_size)
    return np.ascontiguousarray(window[0, :3, y0:y1, x0:x1].permute(1, 2, 0).numpy())


def _rgbx_pixels(image: Image.Image) -> np.ndarray | None:
    """(H, W, 4) uint8 read-only view of an RGB image's own storage (PIL keeps RGB as RGBX), through
    Pillow's Arrow export; None where the rows are not in one block."""
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


def resize_vectorized(image: Image.Image, size: tuple[int, int], interpolation: str) -> Image.Image:
    """``image.resize(size, interpolation)`` for RGB on torch's vectorized uint8 antialiased kernel:
    the same filter as PIL's (within 1 level shrinking, 2 enlarging); bench/images.py times both."""
    import torch

    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)  # channels-last
    resized = interpolate_uint8(pixels, size, interpolation)
    return Image.fromarray(resized[0].permute(1, 2, 0).contiguous().numpy(), "RGB")


def interpolate_uint8(window, size: tuple[int, int], interpolation: str):
    """(1, C, h, w) uint8 tensor → (1, C, H, W) for ``size`` = (W, H), antialiased, on torch's
    vectorized uint8 kernel (channels-last layout), one torch thread inside decode workers."""
    import torch

    _limit_worker_torch_threads(torch)
    window = window.contiguous(memory_format=torch.channels_last)
    return torch.nn.functional.interpolate(window, size=(size[1], size[0]), mode=interpolation, antialias=True)


_worker_threads_limited = threading.local()


def _limit_worker_torch_threads(torch) -> None:
    """One torch thread inside a decode worker thread: otherwise every worker opens its own OpenMP
    team of all cores and they oversubscribe the machine. The main thread keeps its setting: the
    model runs there."""
    if getattr(_worker_threads_limited, "done", False):
        return
    if threading.current_thread() is not threading.main_thread():
        # OpenMP's thread count is per thread, so the main thread keeps its own; torch also makes it
        # the default of threads started later, and clipengine never runs a model in such a thread
        torch.set_num_threads(1)
    _worker_threads_limited.done = True
