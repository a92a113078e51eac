"""A CPU forward run as independent streams: a batch split into parts, each part's forward in its own thread
with its own share of torch's threads, the rows joined back in order.

One forward on all the cores parallelizes every op inside itself: each matmul, LayerNorm and attention call
is a parallel region whose threads meet at a barrier, and the small ops and the Python between them run on
one core while the others wait; a core shared with other work (the pipeline's own decode threads, another
process) slows every op. Independent streams meet only once per batch. On the 2-core machines this was
measured on, two single-threaded streams kept pace with one forward on both cores when nothing else ran, were
far faster when one core was shared, and ran a small CNN (ConSE's classifier) faster in any case (the README's
benchmarks have the figures). Many cores want several threads per stream instead of one: each stream reads
all the weights once per part, and a part of few images makes its matmuls short (:func:`stream_plan`).

Threads: the first stream runs in the calling thread, the others in this module's own (a pool per
:class:`CpuStreams`); each sets torch's thread count for itself, and the caller's count is set again after
the streams have run, so the caller and threads that start later keep the caller's count, not a stream's.
A profiler that records the calling thread's ops sees one whole stream, run beside the others.

This module never imports the engine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

# the fewest images a stream gets: fewer make its matmuls short, and each stream reads all the weights
MIN_STREAM_IMAGES = 8

_local = threading.local()


def stream_plan(images: int, threads: int, min_images: int = MIN_STREAM_IMAGES) -> list[tuple[int, int]]:
    """How ``images`` rows run on ``threads`` torch threads: one ``(rows, threads)`` entry per stream, in batch
    order. As many streams as threads, fewer where a stream would get under ``min_images``; the rows and the
    threads are spread as evenly as they divide (the first streams take the remainders). One entry
    ``(images, threads)`` means one forward, unsplit."""
    threads = max(1, int(threads))
    return split_evenly(images, threads, max(1, min(threads, images // max(1, min_images))))


def split_evenly(rows: int, threads: int, count: int) -> list[tuple[int, int]]:
    """``count`` streams' ``(rows, threads)``: both spread as evenly as they divide, the first streams taking
    the remainders (at least one thread each)."""
    rows_each, threads_each = divmod(rows, count), divmod(threads, count)
    return [(rows_each[0] + (index < rows_each[1]), max(1, threads_each[0] + (index < threads_each[1])))
            for index in range(count)]


def in_stream() -> bool:
    """Whether the calling thread runs one of several streams (its parallel passes should then stay serial:
    another stream holds the other cores, and not every Numba threading layer may be entered by two threads)."""
    return getattr(_local, "in_stream", False)


def run_in_streams(streams: CpuStreams | None, forward: Callable, batch):
    """``forward(batch)``: through ``streams`` where an encoder has them, else as one call."""
    return forward(batch) if streams is None else streams.run(forward, batch)


class CpuStreams:
    """Runs ``forward`` (N, ...) → (N, ...) on a batch as :func:`stream_plan`'s streams, for ``threads`` torch
    threads in all. Safe to call from one thread at a time (the encode stage's consumer)."""

    @classmethod
    def for_threads(cls, threads: int) -> CpuStreams | None:
        """Streams for ``threads`` torch threads, or None where there is one thread (nothing to split)."""
        return cls(threads) if threads > 1 else None

    def __init__(self, threads: int, min_images: int = MIN_STREAM_IMAGES):
        self.threads = max(1, int(threads))
        self.min_images = min_images
        self._pool: ThreadPoolExecutor | None = None

    def plan(self, images: int) -> list[tuple[int, int]]:
        return stream_plan(images, self.threads, self.min_images)

    def run(self, forward: Callable, batch):
        """``forward(batch)``, split into streams along the first dimension where the plan has several; the
        parts' outputs are concatenated in batch order (torch tensors). The first stream runs in the calling
        thread (it would only wait otherwise), the others in the pool's."""
        import torch

        plan = self.plan(len(batch))
        if len(plan) == 1:
            return forward(batch)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads - 1, thread_name_prefix="clipengine-stream")
        caller_threads = torch.get_num_threads()
        parts, start = [], 0
        for rows, threads in plan:
            parts.append((batch[start:start + rows], threads))
            start += rows
        futures = [self._pool.submit(_run_stream, forward, part, threads) for part, threads in parts[1:]]
        try:
            outputs = [_run_stream(forward, *parts[0])] + [future.result() for future in futures]
        finally:
            for future in futures:  # a failed stream: the others finish before the error goes up
                future.exception()
            torch.set_num_threads(caller_threads)  # the caller's own count, and the one new threads start with
        return torch.cat(outputs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _run_stream(forward: Callable, part, threads: int):
    import torch

    torch.set_num_threads(threads)
    _local.in_stream = True
    try:
        with torch.inference_mode():
            return forward(part)
    finally:
        _local.in_stream = False
