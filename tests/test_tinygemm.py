"""torch's int4 matmul (tinygemm) on our weights: the conversion's nibble order and zero points
checked on the CPU against the dequantize oracle (the CUDA kernel is checked on the GPU by
benchmarks.int4_checks)."""

from __future__ import annotations

import pytest
import torch

from replica.ops import tinygemm
from replica.ops.packed import dequantize, quantize


def weight(symmetric: bool, n: int = 32, k: int = 384, group: int = 128, dtype=torch.float32):
    return quantize(torch.randn(n, k, dtype=dtype), group_size=group, symmetric=symmetric)


def test_nibble_pairs_put_the_even_column_high():
    q = torch.randint(0, 16, (8, 64), dtype=torch.int32)
    pairs = tinygemm.nibble_pairs(q)
    assert pairs.shape == (8, 32) and pairs.dtype == torch.uint8
    assert torch.equal((pairs >> 4).int(), q[:, 0::2]) and torch.equal(
        (pairs & 15).int(), q[:, 1::2]
    )


def test_values_are_column_order():
    w = weight(symmetric=False, group=64)
    levels = ((w.scales.float()[..., None] ** -1) * dequantize(w, torch.float32).unflatten(
        -1, (-1, 64)) + w.zeros.float()[..., None]).round().flatten(-2)  # fmt: skip
    assert torch.equal(tinygemm.values(w).float(), levels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_symmetric_weights_convert_exactly(dtype):
    """Scales in the activation dtype (a bf16 checkpoint's) and zero 8: bit for bit ours."""
    w = weight(symmetric=True, dtype=dtype)
    sz = tinygemm.scales_and_zeros(w, dtype)
    assert sz.shape == (3, 32, 2) and not sz[..., 1].any()  # zero 8: no float zero
    assert torch.equal(tinygemm.dequantize(w, dtype), dequantize(w, dtype))


def test_asymmetric_weights_convert_within_the_rounded_zero():
    """(8 - z) * s rounded to bf16: within half a bf16 step of the largest zero, plus the
    weight's own rounding."""
    w = weight(symmetric=False)
    ours = tinygemm.dequantize(w, torch.bfloat16).float()
    exact = dequantize(w, torch.float32)
    bound = 8 * w.scales.float().amax() * 2**-8 + exact.abs().amax() * 2**-8
    assert (ours - exact).abs().max() <= bound


@pytest.mark.parametrize("symmetric", [False, True])
def test_torch_cpu_kernel_computes_the_reference(symmetric):
    """The CPU twin of the CUDA op: our conversion's convention is the one torch multiplies."""
    w = weight(symmetric)
    x = torch.randn(5, 384).to(torch.bfloat16)
    ours = tinygemm.matmul(x, tinygemm.convert(w, torch.bfloat16)).float()
    expected = tinygemm.reference(x.float(), w).float()
    torch.testing.assert_close(ours, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_unservable_shapes_are_refused():
    assert tinygemm.inner_k_tiles(2560) == 8 and tinygemm.inner_k_tiles(96) == 2
    assert not tinygemm.servable(weight(True, group=16, k=64))
    assert not tinygemm.servable(quantize(torch.randn(2, 8, 128)))
    with pytest.raises(ValueError):
        tinygemm.convert(weight(True, n=36))


def test_a_weight_converted_at_load_is_served_by_torch_int4_matmul():
    from replica.ops.linear import TritonLinear, serving_layout

    w = weight(symmetric=True, dtype=torch.bfloat16)
    assert serving_layout(w, to_tinygemm=False) is w
    served = serving_layout(w, to_tinygemm=True)
    assert isinstance(served, tinygemm.TinyGemmInt4) and served.shape == w.shape
    x = torch.randn(3, 384).to(torch.bfloat16)
    expected = tinygemm.reference(x.float(), w)
    torch.testing.assert_close(TritonLinear()(x, served).float(), expected, rtol=2e-2, atol=0.1)
