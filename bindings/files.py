"""Files on disk: written whole or not at all, hashed by content, built once.

The leaf helpers both layers use: the runtimes (``bindings``) for the exported graphs and plans of
the on-disk cache, the engine for every run-directory artifact. Nothing here imports the rest of
clipengine.

Every writer writes to a temporary file in the destination's folder, flushes and fsyncs it, then
renames it over the destination (``os.replace`` is atomic on POSIX within one file system).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


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


# ---- content hashes -------------------------------------------------------------------------
_HASHES: dict[tuple, str] = {}


def sha256_file(path: str | os.PathLike, *, memo_dir: str | os.PathLike | None = None) -> str:
    """sha256 of a file's content, memoized per path, device, inode, size, mtime and ctime: within the
    process, and across processes in ``memo_dir`` when given (one small file per key). Rewriting a file
    changes its ctime, which no user can set, so a stale digest is never reused."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key in _HASHES:
        return _HASHES[key]
    memo = None
    if memo_dir is not None:
        memo = Path(memo_dir) / hashlib.sha256(repr(key).encode()).hexdigest()
        try:
            recorded = memo.read_text(encoding="ascii").strip()
            if len(recorded) == 64 and all(c in "0123456789abcdef" for c in recorded):
                _HASHES[key] = recorded
                return recorded
        except (OSError, UnicodeDecodeError):
            pass
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    _HASHES[key] = digest.hexdigest()
    if memo is not None:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            write_text(memo, _HASHES[key])
        except OSError:  # a read-only cache only costs the hash next time
            pass
    return _HASHES[key]


def sha256_files(paths: Iterable[str | os.PathLike]) -> str:
    """One sha256 over the contents of several files, in order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ---- build-once cache entries ---------------------------------------------------------------
def ensure_built(path: Path, build: Callable[[Path], None]) -> Path:
    """``path``, calling ``build(path)`` first if it does not exist yet.

    A file lock beside ``path`` makes one process build while concurrent ones wait and then
    reuse the result; ``build`` must write ``path`` atomically (e.g. through :func:`atomic_path`).
    """
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            build(path)
    return path
