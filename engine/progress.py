"""Progress bars for long jobs, on stderr, silenced by ``quiet``."""

from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


def progress_bar(total: int | None, description: str, *, enabled: bool = True, unit: str = "it"):
    """A tqdm bar (or a silent stand-in) with ``update(n)`` and ``close()``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit=unit, disable=not enabled, dynamic_ncols=True, leave=False)


def track(iterable: Iterable[T], description: str, *, total: int | None = None, enabled: bool = True) -> Iterable[T]:
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, total=total, disable=not enabled, dynamic_ncols=True, leave=False)
