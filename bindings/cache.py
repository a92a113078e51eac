"""Build-once files of the on-disk cache (ONNX exports, TensorRT plans)."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Callable


def ensure_built(path: Path, build: Callable[[Path], None]) -> Path:
    """``path``, calling ``build(path)`` first if it does not exist yet.

    A file lock beside ``path`` makes one process build while concurrent ones wait and then
    reuse the result; ``build`` must write ``path`` atomically.
    """
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            build(path)
    return path
