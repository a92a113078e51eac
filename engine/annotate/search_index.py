"""The int8 search index of an embeddings folder: built once, kept beside ``embeddings.npy``, memory-mapped.

``EMB_DIR/search_index/`` holds ``codes.npy`` (N, D) int8, ``scales.npy`` and ``residuals.npy`` (N,) float32
(see :mod:`clipengine.kernels.quantized`) and ``index.json``, written last: the format, ``max_norm``, and the
key of the embeddings file it was built from (size, mtime_ns, shape, dtype). An index whose key does not
match the current ``embeddings.npy`` is stale: it is rebuilt, never used. Safe to delete. When
``EMB_DIR`` cannot be written (a shared read-only dataset), the index goes under the cache directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from clipengine.artifacts import EMBEDDINGS, SEARCH_INDEX_DIR
from clipengine.bindings.files import atomic_path, save_npy, write_json
from clipengine.errors import ClipengineError

INDEX_FORMAT = 1
_ARRAYS = ("codes", "scales", "residuals")


def index_key(embeddings_path: str | os.PathLike, embeddings: np.ndarray) -> dict:
    """What identifies the embeddings an index was built from."""
    stat = Path(embeddings_path).stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "shape": list(embeddings.shape),
            "dtype": str(embeddings.dtype)}


def index_folders(emb_dir: str | os.PathLike) -> list[Path]:
    """Where the index of ``emb_dir`` may live, in order: ``emb_dir/search_index/``, then (for a
    folder that cannot be written) a folder of the cache directory named after ``emb_dir``'s real path."""
    from clipengine import envs

    real = os.path.realpath(emb_dir)
    name = hashlib.sha256(real.encode()).hexdigest()[:16]
    return [Path(emb_dir) / SEARCH_INDEX_DIR, envs.cache_dir() / "search-index" / name]


def open_search_index(emb_dir: str | os.PathLike, embeddings: np.ndarray, *, progress: bool = True):
    """The :class:`~clipengine.kernels.quantized.QuantizedRows` of ``emb_dir/embeddings.npy``, memory-mapped.

    Built (once, with a progress bar) when missing or stale, in the first of :func:`index_folders`
    that can be written. Returns None when none can (the caller then searches the float32 rows).
    """
    key = index_key(Path(emb_dir) / EMBEDDINGS, embeddings)
    folders = index_folders(emb_dir)
    for folder in folders:
        index = load_search_index(folder, key)
        if index is not None:
            return index
    errors = []
    for folder in folders:
        try:
            build_search_index(folder, key, embeddings, progress=progress)
        except OSError as error:
            errors.append(f"{folder}: {error.strerror or error}")
            continue
        except ValueError as error:  # non-finite rows
            raise ClipengineError(f"{Path(emb_dir) / EMBEDDINGS}: {error}") from None
        return load_search_index(folder, key)
    print(f"clipengine: cannot write the search index ({'; '.join(errors)}); searching the float32 rows",
          file=sys.stderr)
    return None


def load_search_index(folder: str | os.PathLike, key: dict):
    """The index in ``folder`` when it was built from the embeddings ``key`` names, else None."""
    from clipengine.kernels.quantized import QuantizedRows

    folder = Path(folder)
    try:
        record = json.loads((folder / "index.json").read_text())
        if record.get("format") != INDEX_FORMAT or record.get("key") != key:
            return None
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
    except (OSError, ValueError):
        return None
    n, dim = key["shape"]
    if (arrays["codes"].shape, arrays["codes"].dtype) != ((n, dim), np.int8) or any(
        (arrays[name].shape, arrays[name].dtype) != ((n,), np.float32) for name in ("scales", "residuals")
    ):
        return None
    return QuantizedRows(arrays["codes"], arrays["scales"], arrays["residuals"], float(record["max_norm"]))


def build_search_index(folder: str | os.PathLike, key: dict, embeddings: np.ndarray, *, progress: bool = True) -> None:
    """Quantize ``embeddings`` (N, D) into ``folder`` (each file atomic; ``index.json`` last)."""
    from clipengine.kernels.quantized import QuantizedRows, quantize_rows
    from clipengine.progress import progress_bar

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.json").unlink(missing_ok=True)  # whatever follows is not an index until the record is back
    n, dim = embeddings.shape
    scales, residuals = np.empty(n, np.float32), np.empty(n, np.float32)
    bar = progress_bar(n, "building the int8 search index (once)", enabled=progress, unit="row")
    try:
        with atomic_path(folder / "codes.npy") as tmp:
            codes = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int8, shape=(n, dim))
            out = QuantizedRows(codes, scales, residuals, 0.0)
            max_norm = quantize_rows(embeddings, out=out, on_chunk=bar.update).max_norm
            codes.flush()
            del codes, out
    finally:
        bar.close()
    save_npy(folder / "scales.npy", scales)
    save_npy(folder / "residuals.npy", residuals)
    write_json(folder / "index.json", {"format": INDEX_FORMAT, "key": key, "max_norm": max_norm})
