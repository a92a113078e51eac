"""Shard files: the finished encode work of a running job, for both executors. The local executor
keeps them in ``OUT/shards``; the Ray executor anywhere pyarrow opens: a local path, ``file://``,
``s3://``, ``gs://``, ``hdfs://`` (:meth:`pyarrow.fs.FileSystem.from_uri`; credentials as pyarrow
finds them, on the driver and on every worker).

A shard folder holds ``state.json`` (the model identity the shards belong to) and one ``.npz`` per
finished shard. A shard is committed in one step, so a reader sees it whole or not at all:

- ``rename`` (local disks, NFS mounts, HDFS: filesystems whose rename is atomic): the bytes go to a
  temporary name beside it, then one ``move`` gives it its name.
- ``marker`` (object stores — S3, GCS, Azure — where a move is a copy + delete): the bytes go to a
  write-once object ``NAME.<token>``, then a small completion marker ``NAME.done`` holding the
  token is written; only a shard with a marker exists. A late writer of the same shard (a worker
  retried while the first was still alive) writes its own data object and marker; either one
  names a complete object of the same rows.

``_attempts/<job>/<stage>-<shard>/`` holds one write-once empty object per attempt of a shard in a
job: retries are counted there, so a shard whose worker dies every time ends the job (see
:meth:`ShardStore.count_attempt`) on every Ray version, whatever Ray's own retry defaults are.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid

import numpy as np

from clipengine.errors import ClipengineError

STATE_FILE = "state.json"
ATTEMPTS_DIR = "_attempts"
MARKER_SUFFIX = ".done"
RENAME_FILESYSTEMS = ("local", "hdfs")  # pyarrow type_name of filesystems with an atomic rename


def open_filesystem(location: str, option: str = "shard folder"):
    """``(pyarrow FileSystem, path inside it)`` of a folder path or URI; a ``ClipengineError`` naming
    ``location`` (as ``option`` calls it) when pyarrow cannot open it (unknown scheme, missing driver, unreachable host)."""
    from pyarrow import fs as pafs

    if "://" not in location:
        location = os.path.abspath(location)
    try:
        filesystem, path = pafs.FileSystem.from_uri(location)
    except Exception as error:  # ArrowInvalid (scheme), OSError (library, host)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ClipengineError(f"{option} {location}: cannot open it ({reason})") from None
    return filesystem, path.rstrip("/") or "/"


def plan_shards(keys: list[str], items_per_shard: int) -> list[tuple[int, str, range]]:
    """Consecutive item ranges: (number, file name, positions). The name carries a digest of the
    range's keys, so a shard file is only ever taken for the very same items."""
    plan = []
    for number, start in enumerate(range(0, len(keys), items_per_shard)):
        positions = range(start, min(start + items_per_shard, len(keys)))
        digest = hashlib.sha256("\n".join(keys[i] for i in positions).encode()).hexdigest()[:16]
        plan.append((number, f"shard-{number:06d}-{digest}.npz", positions))
    return plan


class ShardIndex:
    """What a shard file holds, without its rows: ``keys`` of the encoded items (in row order),
    ``skipped`` key → reason, ``labels_key`` (which labelling its label arrays come from; "" when
    it has none) and ``stats`` (K, 2) int64, the encoded files' size and mtime."""

    def __init__(self, keys: list[str], skipped: dict[str, str], labels_key: str, stats: np.ndarray):
        self.keys = keys
        self.skipped = skipped
        self.labels_key = labels_key
        self.stats = stats

    def files_unchanged(self, keys: list[str], stats: np.ndarray, positions: range) -> bool:
        """Whether every file encoded in this shard still has the stats it had then (``stats`` (N, 2)
        of the job's ``keys``; the shard covers ``positions``)."""
        from clipengine.artifacts import same_file

        now = {keys[i]: stats[i] for i in positions}
        return all(key in now and same_file(recorded, now[key]) for key, recorded in zip(self.keys, self.stats))


class ShardStore:
    """A shard folder at ``location`` (a path or URI) for the model ``identity``; ``commit`` is
    ``"rename"`` or ``"marker"`` (None: by filesystem, see the module notes). Cheap to rebuild from
    ``(location, identity, commit)``, which is what travels to the workers."""

    def __init__(self, location: str, identity: dict, commit: str | None = None, option: str = "shard folder"):
        self.location = str(location)
        self.identity = identity
        self.option = option  # how messages name the location (the CLI option that gave it)
        self.fs, self.folder = open_filesystem(self.location, option)
        self.commit = commit or ("rename" if self.fs.type_name in RENAME_FILESYSTEMS else "marker")
        if self.commit not in ("rename", "marker"):
            raise ValueError(f"commit must be 'rename' or 'marker', not {commit!r}")

    def args(self) -> tuple[str, dict, str, str]:
        return self.location, self.identity, self.commit, self.option

    # -- driver side
    def open(self) -> "ShardStore":
        """Check the folder is reachable; drop the shards of another model (and attempt counts of
        earlier jobs). A ``ClipengineError`` names the location when it cannot be used."""
        try:
            state = self._get(STATE_FILE)
        except Exception as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ClipengineError(f"{self.option} {self.location}: cannot read it ({reason})") from None
        try:
            same = state is not None and json.loads(state) == self.identity
        except ValueError:
            same = False
        if not same:
            self.clear()
        else:
            self._delete_dir(f"{self.folder}/{ATTEMPTS_DIR}")
        return self

    def prepare(self) -> None:
        """Create the folder and its ``state.json`` (before any worker writes a shard)."""
        try:
            self.fs.create_dir(self.folder, recursive=True)
            if self._get(STATE_FILE) is None:
                self._put(STATE_FILE, json.dumps(self.identity, sort_keys=True).encode())
        except Exception as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ClipengineError(f"{self.option} {self.location}: cannot write there ({reason})") from None

    def names(self) -> set[str]:
        """Names of the committed shards (one listing of the folder, not one request per shard)."""
        from pyarrow import fs as pafs

        entries = self.fs.get_file_info(pafs.FileSelector(self.folder, allow_not_found=True))
        if self.commit == "marker":
            return {e.base_name[:-len(MARKER_SUFFIX)] for e in entries
                    if e.base_name.startswith("shard-") and e.base_name.endswith(MARKER_SUFFIX)}
        return {e.base_name for e in entries if e.base_name.startswith("shard-") and e.base_name.endswith(".npz")}

    def index(self, name: str) -> ShardIndex | None:
        """The finished shard ``name`` (None when absent, unreadable or of another model)."""
        data = self.read(name, rows=False)
        if data is None:
            return None
        return ShardIndex(data["keys"].tolist(), dict(zip(data["skipped_keys"].tolist(),
                                                          data["skipped_reasons"].tolist())),
                          str(data["labels_key"]) if "labels_key" in data else "", data["stats"])

    def read(self, name: str, *, rows: bool = True) -> dict[str, np.ndarray] | None:
        """The arrays of the finished shard ``name`` (``keys``, ``rows`` (K, D) float32 with ``rows``,
        skips, label arrays), or None when absent, unreadable or of another model (then removed)."""
        try:
            path = self._committed_path(name)
            if path is None:
                return None
            # random access: an .npz is a zip, so only the arrays asked for are read (ranged reads on object stores)
            with self.fs.open_input_file(path) as handle, np.load(handle, allow_pickle=False) as data:
                if json.loads(str(data["identity"])) != self.identity:
                    return None
                return {key: data[key] for key in data.files if rows or key != "rows"}
        except FileNotFoundError:
            return None
        except Exception:  # commits are atomic, so this is unreachable; never trust a bad file anyway
            self.remove(name)
            return None

    def clear(self) -> None:
        """Remove this store's own files (state, shards, markers, attempt counts) and then the folder
        if nothing else is in it; files of anyone else stay."""
        from pyarrow import fs as pafs

        try:
            entries = self.fs.get_file_info(pafs.FileSelector(self.folder, allow_not_found=True))
        except OSError:
            return
        for entry in entries:
            name = entry.base_name
            if entry.type == pafs.FileType.Directory:
                if name == ATTEMPTS_DIR:
                    self._delete_dir(entry.path)
            elif name == STATE_FILE or name.startswith((f"{STATE_FILE}.", f".{STATE_FILE}.", "shard-", ".shard-")):
                self.fs.delete_file(entry.path)
        try:
            if self.fs.type_name in RENAME_FILESYSTEMS and not self.fs.get_file_info(
                    pafs.FileSelector(self.folder, allow_not_found=True)):
                self.fs.delete_dir(self.folder)
        except OSError:
            pass

    # -- worker side
    def write(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        """Commit one finished shard: ``arrays`` (keys, rows, skips, labels) and the identity."""
        buffer = io.BytesIO()
        np.savez(buffer, **arrays, identity=np.asarray(json.dumps(self.identity, sort_keys=True)))
        self._put(name, buffer.getvalue())

    def count_attempt(self, job: str, stage: str, name: str) -> int:
        """Record one more attempt of ``stage`` on shard ``name`` in job ``job``; how many so far."""
        from pyarrow import fs as pafs

        folder = f"{self.folder}/{ATTEMPTS_DIR}/{job}/{stage}-{name}"
        self.fs.create_dir(folder, recursive=True)
        with self.fs.open_output_stream(f"{folder}/{uuid.uuid4().hex}"):
            pass
        return len(self.fs.get_file_info(pafs.FileSelector(folder)))

    # -- committing and reading one object
    def _put(self, name: str, blob: bytes) -> None:
        token = uuid.uuid4().hex
        if self.commit == "rename":
            tmp = f"{self.folder}/.{name}.{token}.tmp"
            with self.fs.open_output_stream(tmp) as stream:
                stream.write(blob)
            self.fs.move(tmp, f"{self.folder}/{name}")
        else:
            with self.fs.open_output_stream(f"{self.folder}/{name}.{token}") as stream:
                stream.write(blob)
            with self.fs.open_output_stream(f"{self.folder}/{name}{MARKER_SUFFIX}") as stream:
                stream.write(token.encode())

    def _committed_path(self, name: str) -> str | None:
        """Where the committed object ``name`` is (None when it is not committed)."""
        if self.commit == "marker":
            token = self._read(f"{self.folder}/{name}{MARKER_SUFFIX}")
            return None if token is None else f"{self.folder}/{name}.{token.decode()}"
        return f"{self.folder}/{name}"

    def _get(self, name: str) -> bytes | None:
        path = self._committed_path(name)
        return None if path is None else self._read(path)

    def _read(self, path: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(path) as stream:
                return stream.read()
        except FileNotFoundError:
            return None

    def remove(self, name: str) -> None:
        """Delete the shard ``name`` (its object, and in marker mode its marker and any partial uploads)."""
        from pyarrow import fs as pafs

        paths = [f"{self.folder}/{name}"]
        if self.commit == "marker":
            paths = [info.path for info in self.fs.get_file_info(pafs.FileSelector(self.folder, allow_not_found=True))
                     if info.base_name.startswith(name)]
        for path in paths:
            try:
                self.fs.delete_file(path)
            except OSError:
                pass

    def _delete_dir(self, path: str) -> None:
        try:
            self.fs.delete_dir(path)
        except (FileNotFoundError, OSError):
            pass


__all__ = ["ShardIndex", "ShardStore", "open_filesystem", "plan_shards"]
