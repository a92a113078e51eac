"""JPEG decoding on the encoder's device: torchvision's ``decode_jpeg`` (nvJPEG on CUDA), batched, with the
resize and center crop done there too; everything else falls back to the CPU decoder. And the choice
between it and the CPU pipeline (:func:`plan_decode`), which the encode outputs record.

The work is split in two halves so that executors can run them in different places:

- :func:`prepare_range` (CPU, in worker threads or a Ray decode task): read the files and check the
  headers (size cap, EXIF orientation, mode, a complete JPEG); plain baseline RGB/grayscale JPEGs are kept
  as their compressed bytes, anything else (PNG, CMYK, EXIF-rotated, truncated, …) is decoded right there by
  :func:`clipengine.encode.decode.load_image`, with the same skip reasons.
- :func:`finish_range` (the thread that owns the device, or a Ray GPU actor): one batched ``decode_jpeg``
  call on the device, crop/resize/center crop there, the CPU-decoded pixels copied in, one
  (B, S, S, 3) uint8 batch. Only compressed bytes and uint8 pixels cross PCIe.

The device resize is antialiased like PIL's but not bit-exact (within a few levels), so ``--exact-decode``
keeps the CPU decoder.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from clipengine import envs
from clipengine.config import (
    DECODE_CHOICES,
    DEFAULT_BATCH_SIZE,
    DEFAULT_BOX_MARGIN,
    DEFAULT_MAX_PIXELS,
    DEFAULT_PREFETCH_BATCHES,
)
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
from clipengine.encode.pipeline import Batch, decoding_warnings_silenced, iter_batches, run_in_threads
from clipengine.errors import ClipengineError

# torchvision 0.29 deprecates its image codecs in favour of torchcodec; they still work
_CODEC_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"


@dataclass(frozen=True)
class PreparedRange:
    """The CPU half of one input range: ``start`` (its first input index); ``items`` one per file that was
    not skipped, ``(index, "jpeg", compressed bytes, region)`` for a JPEG the device decodes (``region``
    [left, top, right, bottom) in its pixels) or ``(index, "pixels", (S, S, 3) uint8, None)`` for one
    decoded on the CPU; ``files``/``boxes`` of the range (for a JPEG the device refuses, decoded on the
    CPU instead); ``skipped`` [(index, reason)]. Picklable (it travels between Ray tasks)."""

    start: int
    items: list = field(default_factory=list)
    files: list = field(default_factory=list)
    boxes: list | None = None
    skipped: list = field(default_factory=list)


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
    ``torchvision.io.decode_jpeg(device=device)`` (nvJPEG on CUDA) and resized there with antialiased
    bicubic/bilinear interpolation (close to PIL, not bit-exact).

    :func:`prepare_range` runs in ``workers`` threads (None: one per core), at most ``prefetch_batches``
    ranges ahead; :func:`finish_range` runs in the calling thread, so every device call comes from the
    thread that consumes the batches. ``to_numpy=False`` leaves ``Batch.images`` as a (B, S, S, 3) uint8
    torch tensor on ``device``.
    """
    if boxes is not None and len(boxes) != len(files):
        raise ClipengineError(f"got {len(boxes)} boxes for {len(files)} files; pass one box (or None) per file")
    if batch_size < 1:
        raise ClipengineError(f"batch_size must be ≥ 1, got {batch_size}")
    problem = device_decode_problem(device)
    if problem:
        raise ClipengineError(problem)
    workers = max(1, envs.num_threads() if workers is None else int(workers))
    ranges = [(start, min(start + batch_size, len(files))) for start in range(0, len(files), batch_size)]

    def task(start: int, stop: int) -> tuple:
        return [os.fspath(f) for f in files[start:stop]], None if boxes is None else list(boxes[start:stop]), start

    options = (spec, box_margin, max_pixels)
    with decoding_warnings_silenced():
        for prepared in run_in_threads(ranges, task, options, workers, max(1, prefetch_batches), prepare_range):
            yield finish_range(prepared, spec, device, box_margin=box_margin, max_pixels=max_pixels,
                               to_numpy=to_numpy)


def prepare_range(files, boxes, start: int, spec: ImageSpec, box_margin: float, max_pixels: int) -> PreparedRange:
    """The CPU half (see the module's docstring) of the files of one range, the first being input ``start``."""
    prepared = PreparedRange(start=start, files=list(files), boxes=None if boxes is None else list(boxes))
    with decoding_warnings_silenced():
        _prepare_files(prepared, files, boxes, start, spec, box_margin, max_pixels)
    return prepared


def _prepare_files(prepared: PreparedRange, files, boxes, start, spec, box_margin, max_pixels) -> None:
    for offset, file in enumerate(files):
        index = start + offset
        box = None if boxes is None else boxes[offset]
        try:
            region, data = _device_region(file, box, box_margin, max_pixels)
            if region is not None:
                prepared.items.append((index, "jpeg", data, region))
            else:
                pixels = load_image(file, box, spec, box_margin=box_margin, max_pixels=max_pixels)
                prepared.items.append((index, "pixels", pixels, None))
        except SkippedImage as skip:
            prepared.skipped.append((index, skip.reason))
        except MemoryError:
            prepared.skipped.append((index, "error: out of memory while decoding"))
        except Exception as error:  # one bad file never stops a batch
            prepared.skipped.append((index, f"error: {type(error).__name__}: {error}"))


def _device_region(file, box, box_margin: float, max_pixels: int) -> tuple[tuple[int, int, int, int] | None, bytes]:
    """(the region of a plain, complete RGB/grayscale JPEG without EXIF rotation, its bytes), or (None, b"")
    for a file the CPU decodes. Raises ``SkippedImage`` for what the CPU decoder would skip from the header."""
    path = check_file(file)
    raw_box = None if box is None else check_box(box)
    data = path.read_bytes()
    if data[:2] != b"\xff\xd8" or b"\xff\xd9" not in data[-64:]:
        return None, b""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            plain = image.format == "JPEG" and image.mode in ("RGB", "L") and exif_orientation(image) == 1
    except Exception:  # PIL decides what it is, on the CPU
        return None, b""
    if not plain:
        return None, b""
    if width * height > max_pixels:
        raise SkippedImage(f"too many pixels: {width}x{height} > {max_pixels}")
    region = (0, 0, width, height) if raw_box is None else box_region(raw_box, (width, height), box_margin)
    return region, data


def finish_range(prepared: PreparedRange, spec: ImageSpec, device: str, *, box_margin: float = DEFAULT_BOX_MARGIN,
                 max_pixels: int = DEFAULT_MAX_PIXELS, to_numpy: bool = True) -> Batch:
    """The device half: ``prepared`` → one ``Batch`` (indices ascending; images (B, S, S, 3) uint8, a NumPy
    array, or with ``to_numpy=False`` a torch tensor on ``device``). A JPEG the device decoder refuses is
    decoded by PIL from its file (pixels, or the skip reason PIL gives)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    skipped = list(prepared.skipped)
    on_device = [(index, data, region) for index, kind, data, region in prepared.items if kind == "jpeg"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CODEC_DEPRECATION)
        decoded = _decode_jpegs([data for _, data, _ in on_device], device, decode_jpeg, ImageReadMode.RGB, torch)
    outputs: dict[int, Any] = {}
    for (index, _, region), image in zip(on_device, decoded):
        if image is not None:
            outputs[index] = _resize_tensor(image, region, spec, torch)
            continue
        offset = index - prepared.start
        box = None if prepared.boxes is None else prepared.boxes[offset]
        try:
            pixels = load_image(prepared.files[offset], box, spec, box_margin=box_margin, max_pixels=max_pixels)
            outputs[index] = torch.from_numpy(pixels).to(device)
        except SkippedImage as skip:
            skipped.append((index, skip.reason))
        except Exception as error:
            skipped.append((index, f"error: {type(error).__name__}: {error}"))
    for index, kind, pixels, _ in prepared.items:
        if kind == "pixels":
            outputs[index] = torch.from_numpy(pixels).to(device)
    indices = sorted(outputs)
    size = spec.image_size
    if indices:
        stacked = torch.stack([outputs[index] for index in indices])
    else:
        stacked = torch.empty((0, size, size, 3), dtype=torch.uint8, device=device)
    return Batch(np.asarray(indices, dtype=np.int64), stacked.cpu().numpy() if to_numpy else stacked, sorted(skipped))


@lru_cache(maxsize=None)
def device_decode_problem(device: str) -> str | None:
    """None when torchvision decodes JPEGs on ``device`` here (checked once per device on a tiny JPEG made
    in memory), else a one-line reason."""
    try:
        import torch
        from torchvision.io import decode_jpeg, encode_jpeg
    except ImportError as error:
        return f"JPEG decoding on {device} needs torchvision ({error})"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        return f"JPEG decoding on {device} needs CUDA, and no CUDA device is available"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_CODEC_DEPRECATION)
            tiny = encode_jpeg(torch.full((3, 16, 16), 128, dtype=torch.uint8))
            decode_jpeg(tiny, device=device)
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        return f"torchvision cannot decode JPEGs on {device} here ({type(error).__name__}: {first})"
    return None


# ---- the choice ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodePlan:
    """Where the encode stage decodes: ``where`` "cpu" (PIL in threads) or "device" (JPEGs by torchvision on
    ``device``); ``keep_on_device``: batches go to the encoder as tensors on ``device`` (it takes them
    there); ``exact``: the CPU decoder is bit-exact (``--exact-decode``); ``reason``: why, when ``auto`` did not
    pick the device (None otherwise); ``shown``: the device as the model record names it ("cuda", "cuda:1")."""

    where: str
    device: str = "cpu"
    keep_on_device: bool = False
    exact: bool = False
    reason: str | None = None
    shown: str | None = None

    def describe(self) -> str:
        """The line ``model.json`` records (the same whichever executor or thread count ran it)."""
        if self.where == "device":
            library = "nvJPEG" if self.device.startswith("cuda") else "libjpeg"
            text = (f"device: JPEGs decoded by torchvision ({library}) and resized on {self.shown or self.device}; "
                    "other formats and files it refuses: PIL on the CPU")
        elif self.exact:
            text = "cpu: PIL, bit-exact with open_clip's preprocess"
        else:
            text = "cpu: PIL, reduced-DCT JPEG decode and vectorized resize"
        return text + (f" ({self.reason})" if self.reason else "")

    def batches(self, files, boxes, spec: ImageSpec, *, batch_size: int, workers: int | None,
                prefetch_batches: int, box_margin: float, max_pixels: int) -> Iterator[Batch]:
        """The batches of ``files`` as this plan decodes them (``iter_batches`` or :func:`iter_batches_torch`)."""
        if self.where == "device":
            return iter_batches_torch(files, boxes, spec, device=self.device, batch_size=batch_size, workers=workers,
                                      prefetch_batches=prefetch_batches, box_margin=box_margin, max_pixels=max_pixels,
                                      to_numpy=not self.keep_on_device)
        return iter_batches(files, boxes, spec, batch_size=batch_size, workers=workers,
                            prefetch_batches=prefetch_batches, box_margin=box_margin, max_pixels=max_pixels)


def check_decode_choice(decode: str, exact_decode: bool) -> None:
    """A one-line ``ClipengineError`` for a ``decode`` setting that cannot be honoured whatever the device."""
    if decode not in DECODE_CHOICES:
        raise ClipengineError(f"--decode must be one of {', '.join(DECODE_CHOICES)}, not {decode!r}")
    if decode == "device" and exact_decode:
        raise ClipengineError("--exact-decode needs the CPU decoder (--decode cpu or auto): the device's resize is "
                              "not bit-exact with open_clip's preprocess")


def plan_decode(decode: str, exact_decode: bool, device: str, encoder=None) -> DecodePlan:
    """The :class:`DecodePlan` for the ``decode`` setting (``auto`` | ``cpu`` | ``device``) of an encoder running
    on ``device`` ("cpu", "cuda", "cuda:N"; the encoder's ``tensor_device`` names it exactly where it has one).

    ``auto``: the device when it is a GPU, torchvision decodes JPEGs there and ``exact_decode`` is off, else
    the CPU; ``device``: torchvision on the encoder's device, a CPU one included (an error where it cannot).
    Batches stay on the device when the encoder takes tensors there."""
    check_decode_choice(decode, exact_decode)
    if decode == "cpu":
        return DecodePlan("cpu", exact=exact_decode)
    target = getattr(encoder, "tensor_device", None) or str(device)
    if decode == "auto":
        if not target.startswith("cuda"):
            return DecodePlan("cpu", exact=exact_decode)
        if exact_decode:
            return DecodePlan("cpu", exact=True, reason="auto: --exact-decode keeps JPEGs on the CPU")
    problem = device_decode_problem(target)
    if problem:
        if decode == "device":
            raise ClipengineError(f"--decode device: {problem}")
        return DecodePlan("cpu", exact=exact_decode, reason=f"auto: {problem}")
    return DecodePlan("device", device=target, keep_on_device=getattr(encoder, "tensor_device", None) == target,
                      shown=str(device))


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

