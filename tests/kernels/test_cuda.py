"""CUDA sources compiled with NVRTC (no GPU needed), and device names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from clipengine.kernels import cuda

KERNELS_DIR = Path(cuda.__file__).parent


@pytest.mark.parametrize("architecture", cuda.NVRTC_ARCHITECTURES)
@pytest.mark.parametrize("entry", sorted(cuda.CUDA_SOURCES))
def test_nvrtc_compiles_every_cuda_source(entry, architecture):
    cubin = cuda.compile_cuda(cuda.read_source(entry), name=f"{entry}.cu", architecture=architecture)
    assert cubin[:4] == b"\x7fELF"
    assert set(cuda.CUDA_SOURCES[entry]) <= cuda.kernel_names_in(cubin)


def test_nvrtc_fails_a_broken_kernel_with_its_compiler_log():
    source = cuda.read_source("clipengine.kernels.quantized:CUDA_SOURCE")
    broken = source.replace("const int lane = threadIdx.x & 31;", "const int lane = threadIdx.x & 31")
    assert broken != source
    with pytest.raises(cuda.CudaCompileError) as failure:
        cuda.compile_cuda(broken, name="screen_int8.cu", architecture="sm_90")
    message = str(failure.value)
    assert "screen_int8.cu (sm_90) does not compile" in message
    assert 'error: expected a ";"' in message  # NVRTC's own log, with the offending line


def _raw_kernel_sources() -> set[str]:
    """"module:NAME" of every source passed to cupy.RawKernel/RawModule inside kernels/."""
    found = set()
    for path in KERNELS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("RawKernel", "RawModule") and node.args):
                argument = node.args[0]
                assert isinstance(argument, ast.Name), f"{path.name}: pass a module-level source constant"
                found.add(f"clipengine.kernels.{path.stem}:{argument.id}")
    return found


def test_nvrtc_registry_lists_every_raw_kernel_source():
    sources = _raw_kernel_sources()
    assert len(sources) >= 2
    assert sources <= set(cuda.CUDA_SOURCES)


@pytest.mark.parametrize(
    "device, parsed",
    [("cpu", ("cpu", None)), ("cuda", ("cuda", None)), ("cuda:0", ("cuda", 0)), ("cuda:3", ("cuda", 3)), (" cuda:1 ", ("cuda", 1))],
)
def test_parse_device(device, parsed):
    assert cuda.parse_device(device) == parsed


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "cpu:0", "cuda:-1", ""])
def test_parse_device_rejects(device):
    with pytest.raises(ValueError, match="device must be"):
        cuda.parse_device(device)


def test_parse_device_takes_a_torch_device():
    import torch

    assert cuda.parse_device(torch.device("cuda", 2)) == ("cuda", 2)
    assert cuda.is_cuda("cuda:2") and not cuda.is_cuda("cpu")
