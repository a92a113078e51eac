"""One image file (and optionally one object box in it) → the model's (S, S, 3) uint8 RGB input.

Geometry matches open_clip's inference preprocess bit for bit on RGB and grayscale images with
``fast_jpeg`` and ``fast_resize`` off (:mod:`clipengine.encode.geometry`): PIL decode, resize in the
image's own mode, center crop, ``convert("RGB")``. Mean/std normalization is left to the device.

Which decoder reads a file is decided by its content, never its name, and only among
:data:`IMAGE_FORMATS`: JPEG (a camera's multi-picture MPO file is read as its first picture), PNG,
WebP, BMP, TIFF, GIF (first frame) and the Netpbm family (PBM, PGM, PPM: the ``.pbm``/``.pgm``/
``.ppm``/``.pnm`` of :data:`clipengine.encode.inputs.IMAGE_EXTENSIONS`). Every other format Pillow
knows is ``not an image`` here: among them EPS/PostScript, which Pillow renders by running
Ghostscript (an interpreter of the file's program), and formats no image pipeline needs. Pillow's
registry is left as it is (``formats=`` is passed to each ``Image.open``).

Where clipengine deliberately differs from open_clip (which feeds PIL's raw decode on):
- EXIF orientation is applied (``ImageOps.exif_transpose``): pixels are what a person sees;
  boxes are in that orientation's pixel coordinates. open_clip ignores the tag.
- Alpha (RGBA, LA, PA, P with a transparent index) is composited over white before resizing;
  open_clip resizes premultiplied and then drops alpha (transparent areas turn black/arbitrary).
- Palette and 1-bit images are converted (to RGB, RGBA or L) before resizing, and resized with the
  model's filter like any other image; open_clip hands them to PIL in their own mode, which resizes
  them nearest-neighbour whatever filter is asked for (a 1-bit scan or line drawing shrunk that way
  loses its thin strokes).
- 16/32-bit integer grayscale (I;16, I) is scaled to 8 bits (÷257); PIL's ``convert("RGB")``
  clips at 255 and turns most such images white. Float (F) images are skipped.
- CMYK is converted with PIL's plain conversion (no ICC colour management).

Bad input never raises out of :func:`load_image` except as :class:`SkippedImage` with a stable reason
(the part before the first ``:`` is the code): ``missing file``, ``not a file``, ``empty file``,
``unreadable``, ``not an image``, ``too many pixels``, ``truncated`` (a JPEG/PNG cut short is skipped
rather than padded with grey: the missing rows would be invented content), ``corrupt``,
``unsupported mode``, ``bad box``, ``degenerate box``, ``box outside image``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipengine.config import DEFAULT_BOX_MARGIN, DEFAULT_MAX_PIXELS
from clipengine.encode.geometry import (
    MAX_RESIZED_AREA,
    RESAMPLE,
    ImageSpec,
    center_crop,
    clip_box,
    crop_window,
    draft_scale,
    resize_crop_vectorized,
    resize_size,
    resize_vectorized,
)

_EXIF_ORIENTATION = 0x0112
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM")  # Pillow's names; PPM reads PBM/PGM/PPM
_WHITE = 255


class SkippedImage(Exception):
    """An item that cannot be turned into pixels; ``reason`` is ``"<code>"`` or ``"<code>: <detail>"``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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
    path = check_file(file)
    raw_box = None if box is None else check_box(box)
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            return _process(image, raw_box, spec, box_margin, max_pixels)
    except SkippedImage:
        raise
    except UnidentifiedImageError:
        raise SkippedImage("not an image: not JPEG, PNG, WebP, BMP, TIFF, GIF or PNM") from None
    except Image.DecompressionBombError as error:
        raise SkippedImage(f"too many pixels: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        message = str(error) or type(error).__name__
        code = "truncated" if "truncat" in message.lower() or isinstance(error, EOFError) else "corrupt"
        raise SkippedImage(f"{code}: {message}") from None


def check_file(file: str | os.PathLike) -> Path:
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


def check_box(box: Sequence[float]) -> tuple[float, float, float, float]:
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
    orientation = exif_orientation(image)
    transposed = orientation in (5, 6, 7, 8)
    oriented = (height, width) if transposed else (width, height)

    region = (0, 0, oriented[0], oriented[1]) if box is None else box_region(box, oriented, margin)
    scale = 1
    if spec.fast_jpeg and image.format == "JPEG":
        scale = draft_scale(region, spec)
        if scale > 1:
            drafted = image.draft(None, (width // scale, height // scale))
            # draft answers (mode, (0, 0, W / s, H / s)); it may decline (progressive, multi-tile)
            scale = round(width / drafted[1][2]) if drafted is not None else 1

    image.load()
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        image = ImageOps.exif_transpose(image)
    image = to_resizable_mode(image)

    region_w, region_h = region[2] - region[0], region[3] - region[1]
    target = resize_size(region_w, region_h, spec)
    if scale > 1 or target[0] * target[1] > MAX_RESIZED_AREA * spec.image_size**2:
        # Reduced-DCT decode (already not bit-exact), or an extreme aspect ratio whose full resize
        # would take gigabytes: resize only the window the center crop keeps, read from the
        # (reduced) image as a fractional box, as PIL's thumbnail does, so the geometry is unchanged.
        # Skipping the cropped-away margins also saves about a quarter of the resize on 4:3 photos.
        if spec.resize_mode == "longest":
            window, output = (0, 0, target[0], target[1]), target
        else:
            window, output = crop_window(target, spec.image_size), (spec.image_size, spec.image_size)
        sx, sy = region_w / target[0], region_h / target[1]
        fractional = (
            (region[0] + window[0] * sx) / scale,
            (region[1] + window[1] * sy) / scale,
            (region[0] + window[2] * sx) / scale,
            (region[1] + window[3] * sy) / scale,
        )
        image = image.resize(output, RESAMPLE[spec.interpolation], box=clip_box(fractional, image.size))
    elif spec.fast_resize and image.mode == "RGB" and spec.resize_mode != "longest":
        return resize_crop_vectorized(image, region, target, spec)
    else:
        # open_clip's geometry: crop, then resize the whole region like torchvision's Resize
        if region != (0, 0, image.size[0], image.size[1]):
            image = image.crop(region)
        if target != image.size:
            if spec.fast_resize and image.mode == "RGB":
                image = resize_vectorized(image, target, spec.interpolation)
            else:  # bit-exact with open_clip
                image = image.resize(target, RESAMPLE[spec.interpolation])
    image = center_crop(image, spec)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)  # writable (asarray of a PIL image is read-only)


def exif_orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if value else 1
    except Exception:  # a broken EXIF block is not a reason to lose the pixels
        return 1


def to_resizable_mode(image: Image.Image) -> Image.Image:
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


def box_region(box, size: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
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
