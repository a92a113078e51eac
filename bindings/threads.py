"""torch's intra-op thread count, set for a block of work and restored after it.

A runtime that wants its own thread count sets it around its calls only: the caller's setting (and
the default torch gives threads started later) is what it was before. torch keeps the count per
thread (OpenMP's setting is per thread), so this changes only the calling thread's.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)``; the previous count is restored after it.
    ``count`` None or 0: the block runs with whatever the caller set."""
    import torch

    previous = torch.get_num_threads()
    if not count or int(count) == previous:
        yield
        return
    torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
