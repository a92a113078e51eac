"""Atomic writes: every artifact appears whole or not at all.

Each writer writes to a temporary file in the destination's folder, flushes and
fsyncs it, then renames it over the destination (``os.replace`` is atomic on
POSIX within one file system).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which would race other threads.
_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; on success rename it over it."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    # mkstemp creates 0600 files; artifacts get the permissions an ordinary open() would give.
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, destination)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(destination: str | os.PathLike, data: bytes) -> None:
    with atomic_path(destination) as tmp:
        tmp.write_bytes(data)


def write_text(destination: str | os.PathLike, text: str) -> None:
    write_bytes(destination, text.encode("utf-8"))


def write_json(destination: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    write_text(destination, json.dumps(obj, indent=indent, sort_keys=False, ensure_ascii=False) + "\n")


def save_npy(destination: str | os.PathLike, array) -> None:
    """``numpy.save`` atomically (the name is kept exactly, no ``.npy`` appended)."""
    import numpy as np

    with atomic_path(destination) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)


def write_parquet(destination: str | os.PathLike, frame, *, metadata: dict[str, str] | None = None) -> None:
    """Write a Polars frame as Parquet atomically, with optional key/value file metadata."""
    with atomic_path(destination) as tmp:
        if metadata:
            import pyarrow.parquet as pq

            table = frame.to_arrow()
            existing = dict(table.schema.metadata or {})
            existing.update({key.encode(): str(value).encode() for key, value in metadata.items()})
            pq.write_table(table.replace_schema_metadata(existing), tmp)
        else:
            frame.write_parquet(tmp)


def read_parquet_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The key/value metadata written by :func:`write_parquet` (Arrow's own keys left out)."""
    import pyarrow.parquet as pq

    raw = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if not k.startswith(b"ARROW")}
