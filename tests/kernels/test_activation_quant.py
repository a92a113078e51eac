"""Dynamic uint8 quantization of activations against its NumPy definition."""

import numpy as np
import pytest

from clipengine.kernels.activation_quant import affine_uint8_parameters, quantize_uint8, quantize_uint8_reference


@pytest.mark.parametrize("parallel", [True, False])
def test_matches_the_reference_bit_for_bit_including_ties_and_clipping(parallel):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((301, 77)) * 3).astype(np.float32)
    scale, zero_point = affine_uint8_parameters(x.min(), x.max())
    x[0, :4] = np.float32(scale) * np.array([0.5, 1.5, 2.5, -0.5], np.float32)  # ties: round half to even
    x[1, :2] = [1e6, -1e6]  # beyond the range: clipped
    codes = quantize_uint8(x, scale, zero_point, parallel=parallel)
    assert codes.dtype == np.uint8 and codes.shape == x.shape
    np.testing.assert_array_equal(codes, quantize_uint8_reference(x, scale, zero_point))
    assert codes[1, 0] == 255 and codes[1, 1] == 0
    out = np.full_like(codes, 7)  # every value written: none of the 7s is left over
    assert quantize_uint8(x, scale, zero_point, out=out, parallel=parallel) is out
    np.testing.assert_array_equal(out, codes)


def test_range_holds_zero_exactly_and_every_value_within_half_a_step():
    rng = np.random.default_rng(1)
    for low, high in ((0.5, 4.0), (-3.0, -1.0), (-0.17, 9.0)):
        x = rng.uniform(low, high, (64, 33)).astype(np.float32)
        scale, zero_point = affine_uint8_parameters(x.min(), x.max())
        assert 0 <= zero_point <= 255
        assert quantize_uint8(np.zeros((1, 1), np.float32), scale, zero_point)[0, 0] == zero_point
        restored = (quantize_uint8(x, scale, zero_point).astype(np.float64) - zero_point) * scale
        assert np.abs(restored - x).max() <= scale * 0.5 + 1e-6 * abs(x).max()


def test_an_all_zero_tensor_and_bad_input():
    assert affine_uint8_parameters(0.0, 0.0) == (1.0, 0)
    with pytest.raises(ValueError, match="non-finite"):
        affine_uint8_parameters(float("nan"), 1.0)
    with pytest.raises(ValueError, match="float32"):
        quantize_uint8(np.zeros((2, 2)), 1.0, 0)


def test_the_serial_pass_never_enters_numba_s_threads(monkeypatch):
    from clipengine.kernels import activation_quant

    def parallel_kernel(*args):
        raise AssertionError("the parallel kernel ran")

    monkeypatch.setattr(activation_quant, "_quantize", parallel_kernel)
    x = np.ones((4, 3), np.float32)
    np.testing.assert_array_equal(quantize_uint8(x, 0.5, 0, parallel=False), quantize_uint8_reference(x, 0.5, 0))
    with pytest.raises(AssertionError, match="parallel kernel ran"):
        quantize_uint8(x, 0.5, 0)
