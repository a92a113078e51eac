"""The image pipeline: files (and optional object boxes) → batches of the model's uint8 input.

Decoding runs in a pool of threads overlapped with the consumer (the model): PIL releases the
GIL while it decodes and resizes, and threads need no start-up and no pickling of pixels. At most
``prefetch_batches`` batches are decoding or decoded ahead of the one the consumer holds, so memory
stays bounded whatever the number of files. A bad file becomes a skip record, never an exception.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from clipengine import envs
from clipengine.config import DEFAULT_BATCH_SIZE, DEFAULT_BOX_MARGIN, DEFAULT_MAX_PIXELS, DEFAULT_PREFETCH_BATCHES
from clipengine.encode.decode import SkippedImage, load_image
from clipengine.encode.geometry import ImageSpec
from clipengine.errors import ClipengineError


@dataclass(frozen=True)
class Batch:
    """One decoded batch: ``indices`` (B,) int64 positions into the inputs (ascending),
    ``images`` (B, S, S, 3) uint8 RGB (a NumPy array; a torch tensor on the device where the device
    decoded and the batch stays there), ``skipped`` [(index, reason)] of this batch's input range.
    B may be 0 when every item of the range was skipped."""

    indices: np.ndarray
    images: Any
    skipped: list[tuple[int, str]] = field(default_factory=list)


@contextlib.contextmanager
def decoding_warnings_silenced() -> Iterator[None]:
    """While the pipeline runs, silence warnings that say nothing to the user (restored after): PIL's
    decompression-bomb warning (clipengine enforces its own pixel cap from the header before decoding;
    above twice PIL's limit PIL raises and the file is skipped), PIL's warnings about a damaged file
    (e.g. "Corrupt EXIF data": the file is decoded or skipped with a reason all the same), and torch's
    warning about wrapping read-only memory (the vectorized resize only reads PIL's pixels)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        yield


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
    load: Callable[..., np.ndarray] = load_image,
) -> Iterator[Batch]:
    """Decode ``files`` (with ``boxes[i]`` or None = whole image; ``boxes`` None = all whole)
    into batches over consecutive input ranges of ``batch_size``, in input order.

    Decoding runs in ``workers`` threads overlapped with the consumer; ``workers=0`` decodes in the
    calling thread, ``workers=None`` uses one per core. ``load`` decodes one item (the default is
    :func:`clipengine.encode.decode.load_image`). Every input index appears exactly once: in some
    ``Batch.indices`` or ``Batch.skipped``.
    """
    if boxes is not None and len(boxes) != len(files):
        raise ClipengineError(f"got {len(boxes)} boxes for {len(files)} files; pass one box (or None) per file")
    if batch_size < 1:
        raise ClipengineError(f"batch_size must be ≥ 1, got {batch_size}")
    workers = envs.num_threads() if workers is None else int(workers)
    ahead = max(1, int(prefetch_batches))
    options = (spec, box_margin, max_pixels, load)
    ranges = [(start, min(start + batch_size, len(files))) for start in range(0, len(files), batch_size)]

    def task(start: int, stop: int) -> tuple:
        return (
            [os.fspath(f) for f in files[start:stop]],
            None if boxes is None else list(boxes[start:stop]),
            start,
        )

    with decoding_warnings_silenced():
        if workers <= 0:
            for start, stop in ranges:
                yield _decode_range(*task(start, stop), *options)
        else:
            yield from run_in_threads(ranges, task, options, workers, ahead, _decode_range)


def run_in_threads(ranges, task, options, workers: int, ahead: int, work) -> Iterator:
    """Run ``work(*task(*range), *options)`` for each range in ``workers`` threads, results in order,
    at most ``ahead`` submitted beyond the one the consumer holds."""
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
