"""Progress bars for long jobs, on stderr, silenced by ``quiet``."""

from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


class _Silent:
    """What a disabled bar is: the calls the pipeline makes, doing nothing (tqdm is not imported: its
    import is a measurable part of a short command's start-up)."""

    def __init__(self, total: int | None = None):
        self.total = total
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_description(self, description: str) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, description: str, *, enabled: bool = True, unit: str = "it"):
    """A tqdm bar (or a silent stand-in) with ``update(n)``, ``set_description``, ``set_postfix_str``
    and ``close()``."""
    if not enabled:
        return _Silent(total)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, leave=False)


def track(iterable: Iterable[T], description: str, *, total: int | None = None, enabled: bool = True) -> Iterable[T]:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, total=total, dynamic_ncols=True, leave=False)
