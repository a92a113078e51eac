"""The one place that decides where work runs: ``--device auto|cpu|cuda|cuda:N``.

A stage asks for the device of one runtime: ``torch`` (the encoders, GPU JPEG decoding) or
``cupy`` (the labelling and search kernels). ``auto`` picks CUDA only when a GPU is visible to
this process and that runtime can use it; an explicit ``cuda`` that cannot be used is a one-line
error. CUDA is never probed when ``CUDA_VISIBLE_DEVICES`` hides every GPU or the machine has no
NVIDIA device nodes, so a CPU machine never imports torch or CuPy to answer.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from clipengine import envs
from clipengine.errors import ClipengineError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
RUNTIMES = ("torch", "cupy")


def parse_device(device: str) -> tuple[str, int | None]:
    """``"auto"``/``"cpu"`` → (name, None); ``"cuda"`` → ("cuda", None); ``"cuda:1"`` → ("cuda", 1)."""
    from clipengine.kernels.cuda import parse_device as parse

    text = str(device).strip().lower()
    if text == "auto":
        return "auto", None
    try:
        return parse(text)
    except ValueError:
        raise ClipengineError(f"--device must be {DEVICE_CHOICES}, not {device!r}") from None


def gpu_visible() -> bool:
    """A GPU may be usable here: CUDA is not hidden and the NVIDIA device nodes exist (no import)."""
    return not envs.cuda_hidden() and (Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists())


def cuda_device_count(runtime: str = "torch") -> int:
    """How many CUDA devices ``runtime`` can use (0 when none or when the runtime is not installed)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
    if not gpu_visible():
        return 0
    if runtime == "torch":
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return 0
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # CuPy without a driver or a runtime it can load: no usable GPU
        return 0


def resolve_device(device: str, *, runtime: str = "torch") -> str:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` for a ``--device`` value and the runtime that will run.

    ``auto`` → ``"cuda"`` when ``runtime`` can use a GPU here, else ``"cpu"``; ``cuda``/``cuda:N`` are
    checked (the index must exist).
    """
    name, index = parse_device(device)
    if name == "cpu":
        return "cpu"
    count = cuda_device_count(runtime)
    if name == "auto":
        return "cuda" if count else "cpu"
    if not count:
        needs = "torch with CUDA" if runtime == "torch" else "CuPy (pip install 'clipengine[gpu]')"
        raise ClipengineError(f"--device {device}: no usable CUDA GPU is visible (needs {needs} and a visible GPU)")
    if index is not None and index >= count:
        raise ClipengineError(f"--device {device}: only {count} CUDA device(s) are visible (cuda:0 … cuda:{count - 1})")
    return "cuda" if index is None else f"cuda:{index}"


def is_cuda(device: str) -> bool:
    """Whether a resolved device string names a CUDA device."""
    return str(device).startswith("cuda")


@contextlib.contextmanager
def numba_threads(threads: int | None = None) -> Iterator[int]:
    """Run Numba's parallel kernels on ``threads`` threads (None: :func:`clipengine.envs.num_threads`,
    capped by Numba's pool) and restore the caller's setting afterwards."""
    import numba

    from clipengine.bindings.numba_start import prepare_numba

    prepare_numba()  # before the first kernel loads: Numba's start-up without scipy.linalg

    wanted = max(1, min(threads or envs.num_threads(), numba.config.NUMBA_NUM_THREADS))
    previous = numba.get_num_threads()
    numba.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        numba.set_num_threads(previous)


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run many small BLAS calls (few-shot fits on a few hundred labelled rows) on one thread, and
    restore the caller's BLAS thread counts afterwards: on small matrices a thread pool's hand-offs
    cost more than the arithmetic, by orders of magnitude when the cores are busy."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield
