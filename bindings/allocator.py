"""glibc malloc settings for the CPU encoders' forwards: freed activations stay in the heap for the next batch.

A ViT forward on a batch allocates and frees its activations block by block: tens of MB each (at batch 64
and ViT-B/32 the MLP's hidden rows are 3,200 × 3,072 floats, 39 MB). With glibc's defaults a chunk that large
is a fresh ``mmap`` (the threshold adapts upward to at most 32 MiB, and a 39 MB chunk stays above it), and
the heap is trimmed back as soon as 128 KiB are free at its top, so every batch faults every page of its
activations in again, a large part of a fast (bf16 with AMX, int8) forward's time.
:func:`keep_freed_memory_mapped` raises the mmap threshold above those chunks and lets freed memory
stay mapped up to :data:`TRIM_THRESHOLD_BYTES` before it is returned to the system: the process holds that
much more at most, and its batches stop faulting.

Process-wide and set once; left alone where the user tuned malloc (``MALLOC_*_`` variables or
``GLIBC_TUNABLES``) or where the C library is not glibc. This module never imports the engine.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

MMAP_THRESHOLD_BYTES = 64 << 20  # above a batch-64 ViT-B/32 MLP activation (39 MB in fp32)
TRIM_THRESHOLD_BYTES = 256 << 20  # freed memory kept mapped before the heap is trimmed
TOP_PAD_BYTES = 64 << 20  # grow the heap in steps this large, not page by page
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's <malloc.h> parameter numbers
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")

_lock = threading.Lock()
_state: dict[str, str] = {}


def keep_freed_memory_mapped() -> str:
    """Apply the settings above once per process; returns what happened (the encoders keep it as
    ``malloc_settings``): ``"applied"``, or why not (not glibc, the user's own malloc settings, mallopt refused)."""
    with _lock:
        if "outcome" not in _state:
            _state["outcome"] = _apply()
        return _state["outcome"]


def _apply() -> str:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not applied: the C library is not glibc"
    user = [name for name in USER_SETTINGS if name in os.environ]
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        user.append("GLIBC_TUNABLES")
    if user:
        return f"not applied: the user's own settings ({', '.join(user)})"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "not applied: mallopt not found"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    refused = [name for name, parameter, value in (("M_MMAP_THRESHOLD", _M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
                                                   ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
                                                   ("M_TOP_PAD", _M_TOP_PAD, TOP_PAD_BYTES))
               if mallopt(parameter, value) != 1]
    return f"not applied: mallopt refused {', '.join(refused)}" if refused else "applied"


def environment() -> dict[str, str]:
    """The same settings as glibc's environment variables, for a process that is not clipengine's (the
    encode benchmark's tuned peers get them, so that they pay what clipengine pays)."""
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD_BYTES),
            "MALLOC_TOP_PAD_": str(TOP_PAD_BYTES)}
