"""Runtimes behind one ``Encoder`` interface (``clipengine.bindings.base.Encoder``).

Backends are chosen by name from a table of ``"module:Class"`` strings and imported
on first use, so that naming a backend never imports the others' heavy packages.

| backend | devices | precisions | image tower | text tower |
| --- | --- | --- | --- | --- |
| ``torch`` | cpu, cuda | fp32, bf16, int8 (cpu), fp16 (cuda) | CPU: torch eager, inference mode (fp32, bf16, int8: the fused forward of ``torch_vit_cpu``, int8 in its QKV and MLP matmuls); CUDA: fp16/bf16 weights with fp32 LayerNorm, ``torch.compile``, CUDA graphs, SDPA attention | torch |
| ``onnxruntime`` | cpu | fp32, int8 (dynamic quantization) | ONNX (exported once, cached) | torch fp32 |
| ``tensorrt`` | cuda | fp16 (LayerNorm/softmax/reductions fp32 in the graph), fp32 | strongly typed TensorRT plan built from the exported ONNX | torch on cuda |

Every backend class takes ``(towers: ModelTowers, *, device, precision, num_threads, cache_dir)``.

Choosing for ``auto``: on CUDA, :func:`select_backend` and :func:`default_precision` decide from the device
name ("cuda", "cuda:N") and the installed packages (TensorRT fp16 when ``tensorrt`` imports — a wheel whose
libraries fail to load counts as absent — else torch fp16). On the CPU no rule of thumb holds (bf16 is
several times faster than fp32 on CPUs with AMX and slower on CPUs with only AVX512-BF16), so the engine
measures: :mod:`clipengine.bindings.cpu_probe` times each CPU path on a short copy of the model's tower, and
the engine decides from that (``clipengine.encode.auto``). :func:`default_precision` on the CPU is fp32, the
precision that needs no measurement to be right.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from functools import lru_cache

from clipengine.kernels.cuda import parse_device

# backend name -> "module:Class"
BACKENDS: dict[str, str] = {
    "torch": "clipengine.bindings.torch:TorchEncoder",
    "onnxruntime": "clipengine.bindings.onnxruntime:OnnxRuntimeEncoder",
    "tensorrt": "clipengine.bindings.tensorrt:TensorRTEncoder",
}

# backend name -> the package it needs (probed with find_spec, never imported here)
BACKEND_PACKAGES: dict[str, str] = {"torch": "torch", "onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}

# backend name -> devices it runs on
BACKEND_DEVICES: dict[str, tuple[str, ...]] = {
    "torch": ("cpu", "cuda"),
    "onnxruntime": ("cpu",),
    "tensorrt": ("cuda",),
}

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
BACKEND_PRECISIONS: dict[str, tuple[str, ...]] = {
    "torch": ("fp32", "bf16", "fp16", "int8"),
    "onnxruntime": ("fp32", "int8"),
    "tensorrt": ("fp16", "fp32"),
}


def load_backend(name: str):
    """The backend class registered under ``name`` (imports its module now)."""
    module_name, attribute = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), attribute)


def backend_installed(name: str) -> bool:
    return importlib.util.find_spec(BACKEND_PACKAGES[name]) is not None


@lru_cache(maxsize=None)
def backend_imports(name: str) -> bool:
    """True when the package ``name`` needs imports (installed is not enough: TensorRT's wheels can be
    present while their libraries are not)."""
    if not backend_installed(name):
        return False
    try:
        importlib.import_module(BACKEND_PACKAGES[name])
    except Exception:
        return False
    return True


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def onednn_isa_limit() -> str | None:
    """The instruction-set ceiling set for oneDNN by ``ONEDNN_MAX_CPU_ISA`` (or its older name
    ``DNNL_MAX_CPU_ISA``), upper case; None when unset or ``ALL``/``DEFAULT``."""
    value = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return None if value in ("", "ALL", "DEFAULT") else value


def amx_in_use() -> bool:
    """True when the CPU has AMX tiles and oneDNN may use them (no ceiling below AMX set for it)."""
    limit = onednn_isa_limit()
    return "amx_bf16" in cpu_flags() and (limit is None or "AMX" in limit)


def cpu_supports_bf16() -> bool:
    """True when the CPU has bf16 instructions (AMX tiles or AVX512-BF16); whether they are faster than fp32
    is another question (:mod:`clipengine.bindings.cpu_probe` measures it)."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def select_backend(device: str, precision: str | None = None) -> str:
    """The backend for ``device`` ("cpu", "cuda" or "cuda:N") and ``precision`` without measuring: on CUDA,
    TensorRT when it imports (not for bf16), else torch; on the CPU torch (int8: onnxruntime), the one that
    runs every model (``auto`` on the CPU measures instead: ``clipengine.encode.auto``)."""
    if parse_device(device)[0] == "cuda":
        if precision == "bf16":
            return "torch"
        return "tensorrt" if backend_imports("tensorrt") else "torch"
    return "onnxruntime" if precision == "int8" else "torch"


def default_precision(backend: str, device: str) -> str:
    """The precision of ``backend`` on ``device`` without measuring: fp16 on CUDA; fp32 on the CPU (exact,
    and never the slow choice by much; ``auto`` on the CPU measures whether another one is faster)."""
    if parse_device(device)[0] == "cuda":
        return "fp16"
    return "fp32"


def check_backend(name: str, device: str, precision: str) -> str | None:
    """None if ``name`` can run ``precision`` on ``device``, else a one-line reason."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}"
    try:
        kind, _ = parse_device(device)
    except ValueError as error:
        return str(error)
    if kind not in BACKEND_DEVICES[name]:
        return f"backend {name!r} runs on {'/'.join(BACKEND_DEVICES[name])}, not on {device!r}"
    if precision not in BACKEND_PRECISIONS[name]:
        return f"backend {name!r} supports precision {', '.join(BACKEND_PRECISIONS[name])}, not {precision!r}"
    if name == "torch" and kind == "cuda" and precision == "int8":
        return "int8 on torch runs on the CPU only; use --precision fp16 or bf16 on CUDA"
    if name == "torch" and kind == "cpu" and precision == "fp16":
        return "fp16 on the CPU is slower than fp32 in torch; use --precision bf16 or fp32"
    if not backend_installed(name):
        extra = " (pip install 'clipengine[gpu]')" if name == "tensorrt" else ""
        return f"backend {name!r} needs the package {BACKEND_PACKAGES[name]!r}, which is not installed{extra}"
    return None
