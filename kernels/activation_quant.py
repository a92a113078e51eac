"""Dynamic uint8 quantization of a float32 activation tensor, for int8 matmuls (CPU, Numba).

One scale and zero point per tensor, taken from the tensor itself at each call (dynamic): the range
``[lo, hi]`` is the tensor's own, widened to hold 0 (so zero, the padding and the bias-free value, is exact),
``scale = (hi − lo) / 255`` and ``zero_point = rint(−lo / scale)`` in [0, 255]; each value becomes
``clip(rint(x · (1 / scale)) + zero_point, 0, 255)``, and ``scale · (q − zero_point)`` is within
``scale / 2`` of ``x`` in the range. An unsigned code with a zero point spends all 256 codes on a skewed
range (a GELU's output lies in [−0.17, max]), where a symmetric int8 code would spend half on values
that never occur.

:func:`quantize_uint8` is one pass over the rows (reads 4 bytes, writes 1 per value), parallel or on the
calling thread alone (a caller that already runs beside others on the other cores); the range
comes from the caller (torch's ``aminmax`` is one vectorized pass). :func:`quantize_uint8_reference` is
the NumPy definition it is tested against, bit for bit. This module never imports the engine.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

UINT8_LEVELS = 255


def affine_uint8_parameters(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero_point) that map ``[min(lo, 0), max(hi, 0)]`` onto the codes 0..255 (scale 1 for an
    all-zero tensor)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError(f"cannot quantize a tensor holding non-finite values (range {lo}..{hi})")
    scale = float(np.float32((hi - lo) / UINT8_LEVELS)) or 1.0
    zero_point = int(min(max(round(-lo / scale), 0), UINT8_LEVELS))
    return scale, zero_point


def quantize_uint8(x: np.ndarray, scale: float, zero_point: int, out: np.ndarray | None = None, *,
                   parallel: bool = True) -> np.ndarray:
    """(R, C) float32, C-contiguous → (R, C) uint8 ``clip(rint(x · float32(1 / scale)) + zero_point, 0, 255)``
    (into ``out`` when given). ``parallel``: on Numba's threads (the caller's setting), else on the calling
    thread only."""
    if x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous:
        raise ValueError(f"quantize_uint8 takes a C-contiguous 2-D float32 array, not {x.dtype} {x.shape}")
    if out is None:
        out = np.empty(x.shape, dtype=np.uint8)
    (_quantize if parallel else _quantize_serial)(x, np.float32(1.0 / scale), np.float32(zero_point), out)
    return out


def quantize_uint8_reference(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """The NumPy definition of :func:`quantize_uint8`."""
    codes = np.rint(x.astype(np.float32) * np.float32(1.0 / scale)) + np.float32(zero_point)
    return np.clip(codes, 0, UINT8_LEVELS).astype(np.uint8)


@njit(cache=True)
def _quantize_row(x, row, inverse_scale, zero_point, out):
    top = np.float32(UINT8_LEVELS)
    for column in range(x.shape[1]):
        code = np.rint(x[row, column] * inverse_scale) + zero_point
        out[row, column] = np.uint8(min(max(code, np.float32(0.0)), top))


@njit(parallel=True, cache=True)
def _quantize(x, inverse_scale, zero_point, out):
    for row in prange(x.shape[0]):
        _quantize_row(x, row, inverse_scale, zero_point, out)


@njit(cache=True)
def _quantize_serial(x, inverse_scale, zero_point, out):
    for row in range(x.shape[0]):
        _quantize_row(x, row, inverse_scale, zero_point, out)
