"""JPEG decoding on the device: torchvision's ``decode_jpeg`` (nvJPEG on CUDA), batched, with the
resize and center crop done there too; everything else falls back to the CPU decoder.

Worker threads read the files and check headers (size cap, EXIF orientation, mode, a complete
JPEG); plain baseline RGB/grayscale JPEGs go to the device in one batched call, anything else
(PNG, CMYK, EXIF-rotated, truncated, …) is decoded by :func:`clipengine.encode.decode.load_image`
in those threads, with the same skip reasons. The device resize is antialiased like PIL's but not
bit-exact (within 1–2 levels).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from clipengine import envs
from clipengine.config import DEFAULT_BATCH_SIZE, DEFAULT_BOX_MARGIN, DEFAULT_MAX_PIXELS, DEFAULT_PREFETCH_BATCHES
from clipengine.encode.decode import (
    IMAGE_FORMATS,
    SkippedImage,
    box_region,
    check_box,
    check_file,
    exif_orientation,
    load_image,
)
from clipengine.encode.geometry import ImageSpec, crop_window, resize_size
from clipengine.encode.pipeline import Batch, run_in_threads
from clipengine.errors import ClipengineError


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
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ClipengineError("GPU JPEG decoding needs CUDA, and no CUDA device is available")
    workers = max(1, envs.num_threads() if workers is None else int(workers))
    ranges = [(start, min(start + batch_size, len(files))) for start in range(0, len(files), max(1, batch_size))]

    def task(start: int, stop: int) -> tuple:
        return [os.fspath(f) for f in files[start:stop]], None if boxes is None else list(boxes[start:stop]), start

    options = (spec, box_margin, max_pixels)
    size = spec.image_size
    prepared_ranges = run_in_threads(ranges, task, options, workers, max(1, prefetch_batches), _prepare_range)
    for prepared in prepared_ranges:
        start, items, skipped = prepared
        images, indices = [], []
        on_device = [(i, data, region) for i, kind, data, region in items if kind == "jpeg"]
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its image codecs in favour of torchcodec; they still work
            warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
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
            path = check_file(file)
            raw_box = None if box is None else check_box(box)
            data = path.read_bytes()
            region = None
            # only plain, complete JPEGs go to the device; the rest is PIL's
            if data[:2] == b"\xff\xd8" and b"\xff\xd9" in data[-64:]:
                try:
                    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                        width, height = image.size
                        plain = image.mode in ("RGB", "L") and exif_orientation(image) == 1
                except Exception:
                    plain = False
                if plain:
                    if width * height > max_pixels:
                        raise SkippedImage(f"too many pixels: {width}x{height} > {max_pixels}")
                    region = (0, 0, width, height) if raw_box is None else box_region(raw_box, (width, height), box_margin)
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
    target_w, target_h = resize_size(width, height, spec)
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
    x0, y0, x1, y1 = crop_window((target_w, target_h), size)
    return crop[:, y0:y1, x0:x1].permute(1, 2, 0).contiguous()


# ---- inputs ------------------------------------------------------------------------------------
