"""CUDA plumbing shared by the GPU kernels: device names, and the CUDA C sources compiled with NVRTC.

Device names: ``"cuda"`` (the current device of the calling thread) or ``"cuda:N"`` (device N), as
torch writes them; :func:`parse_device` reads them without importing any GPU package.

Every CUDA C source of the package is listed in :data:`CUDA_SOURCES` (``"module:ATTRIBUTE"``), so the
default test suite compiles each one for every architecture of :data:`NVRTC_ARCHITECTURES` with
:func:`compile_cuda` — NVRTC from the ``cuda-bindings`` and ``nvidia-cuda-nvrtc`` wheels, which compiles on
a machine without a GPU. At run time CuPy compiles the same sources with its own NVRTC (``RawKernel``).
This module never imports the engine.
"""

from __future__ import annotations

import ctypes
import glob
import importlib
import importlib.util
import os
import re
from functools import cache

# every CUDA C source in the package: "module:ATTRIBUTE" -> the kernel names it defines (extern "C")
CUDA_SOURCES: dict[str, tuple[str, ...]] = {
    "clipengine.kernels.similarity:CUDA_SOURCE": ("label_segments",),
    "clipengine.kernels.quantized:CUDA_SOURCE": ("screen_int8",),
}
NVRTC_ARCHITECTURES = ("sm_80", "sm_90")  # A100, H100/H200
_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def parse_device(device) -> tuple[str, int | None]:
    """``"cpu"`` → ("cpu", None); ``"cuda"`` → ("cuda", None); ``"cuda:1"`` → ("cuda", 1).

    Accepts a ``torch.device`` too (by its string). Raises ``ValueError`` for anything else."""
    match = _DEVICE.match(str(device).strip())
    if match is None or (match.group(1) == "cpu" and match.group(2) is not None):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {str(device)!r}")
    index = match.group(2)
    return match.group(1), None if index is None else int(index)


def is_cuda(device) -> bool:
    """True for "cuda" and "cuda:N"."""
    return parse_device(device)[0] == "cuda"


def cupy_device(device):
    """The ``cupy.cuda.Device`` that ``device`` ("cuda" or "cuda:N") names: "cuda" is CuPy's current device.

    Use it as a context manager (``with cupy_device(device):``): it restores the caller's device after."""
    import cupy

    kind, index = parse_device(device)
    if kind != "cuda":
        raise ValueError(f"not a CUDA device: {device!r}")
    return cupy.cuda.Device(cupy.cuda.runtime.getDevice() if index is None else index)


# ---- NVRTC ------------------------------------------------------------------------------------


class CudaCompileError(RuntimeError):
    """NVRTC rejected a source; the message carries the compiler's log."""


def read_source(entry: str) -> str:
    """The CUDA C text of a :data:`CUDA_SOURCES` entry ``"module:ATTRIBUTE"``."""
    module_name, attribute = entry.split(":")
    return getattr(importlib.import_module(module_name), attribute)


def compile_cuda(source: str, *, name: str = "kernel.cu", architecture: str = "sm_90",
                 options: tuple[str, ...] = ()) -> bytes:
    """Compile CUDA C ``source`` to a cubin for ``architecture`` (e.g. "sm_90") with NVRTC; no GPU needed.

    Raises :class:`CudaCompileError` with NVRTC's log when the source does not compile, ``ImportError`` when
    ``cuda-bindings`` or the NVRTC library is missing."""
    nvrtc = _nvrtc()
    result, program = nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], [])
    _check(nvrtc, result, "nvrtcCreateProgram")
    try:
        arguments = [f"--gpu-architecture={architecture}".encode(), b"-std=c++17", *(o.encode() for o in options)]
        (result,) = nvrtc.nvrtcCompileProgram(program, len(arguments), arguments)
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CudaCompileError(f"{name} ({architecture}) does not compile:\n{_log(nvrtc, program)}")
        result, size = nvrtc.nvrtcGetCUBINSize(program)
        _check(nvrtc, result, "nvrtcGetCUBINSize")
        cubin = b" " * size
        (result,) = nvrtc.nvrtcGetCUBIN(program, cubin)
        _check(nvrtc, result, "nvrtcGetCUBIN")
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def kernel_names_in(cubin: bytes) -> set[str]:
    """The ``extern "C"`` kernel names found in a cubin's symbol table (an ELF string table scan)."""
    return {m.decode() for m in re.findall(rb"\.text\.([A-Za-z_][A-Za-z0-9_]*)\x00", cubin)}


def _check(nvrtc, result, what: str) -> None:
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CudaCompileError(f"{what} failed: {nvrtc.nvrtcGetErrorString(result)[1].decode()}")


def _log(nvrtc, program) -> str:
    result, size = nvrtc.nvrtcGetProgramLogSize(program)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(program, log)
    return log.rstrip(b"\x00 ").decode(errors="replace")


@cache
def _nvrtc():
    """``cuda.bindings.nvrtc`` with its library loaded.

    ``cuda-bindings`` finds ``libnvrtc`` in the site-packages folders of the running interpreter; where the
    ``nvidia-cuda-nvrtc`` wheel sits on ``sys.path`` by other means (a ``.pth`` file, ``PYTHONPATH``), its
    libraries are loaded here from the ``nvidia`` namespace package instead."""
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        raise ImportError("compiling CUDA sources needs 'cuda-bindings' and 'nvidia-cuda-nvrtc' "
                          "(pip install 'clipengine[dev]')") from None
    try:
        nvrtc.nvrtcVersion()
        return nvrtc
    except Exception:  # the library was not found where cuda-bindings looks
        pass
    spec = importlib.util.find_spec("nvidia")
    folders = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    # the builtins library first: libnvrtc opens it by name when it compiles
    for pattern in ("libnvrtc-builtins.so.*", "libnvrtc.so.*"):
        for folder in folders:
            for path in sorted(glob.glob(os.path.join(folder, "*", "lib", pattern))):
                if ".alt." not in os.path.basename(path):
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    nvrtc.nvrtcVersion()  # raises when it is still not found
    return nvrtc
