"""The second design's 4-bit kernels (issue 36) against the dequantize oracle in Triton's
interpreter, at shapes that straddle their tiles: run through tests/interpreted_kernels.py."""

from __future__ import annotations

import torch

from replica.ops.packed import PackedInt4, linear, quantize


def close_in_scale(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """fp32 scales round (128 + q) s, about 16x the weight: errors relative to the output's
    scale (tests/interpreted_kernels.py says why)."""
    error = (ours - reference).abs().max().item()
    assert error <= 2e-5 * reference.abs().max().item(), (error, reference.abs().max().item())


def asymmetric(n: int, k: int, group: int, lead: tuple[int, ...] = ()) -> PackedInt4:
    """Zero points spread over 0..15 (not 8 everywhere): a wrong zero shows."""
    return quantize(torch.randn(*lead, n, k) + torch.rand(*lead, n, 1) * 3, group_size=group)


def int4_splitk() -> None:
    """Tokens 1 to 40 (one and three token tiles, a tile cut short), 72 features (a block cut
    short), split-K of several lengths and none, groups of 128 and 256, a strided x."""
    from replica.kernels.int4_splitk import SplitKTile, splits, w4a16_splitk

    assert splits(3, 3, 2, torch.device("cpu")) == 3  # 8 "SMs": 16 programs wanted, 3 groups
    assert splits(3, 20, 2, torch.device("cpu")) == 5  # 6 slices of 4 would leave one empty
    for depth, group in ((384, 128), (1280, 128), (512, 256)):
        weight = asymmetric(72, depth, group)
        for tokens, tile in ((1, SplitKTile(16, 32, 4, 2)), (17, SplitKTile(16, 64, 4, 2)),
                             (40, SplitKTile(32, 32, 4, 2, waves=0))):  # fmt: skip
            x = torch.randn(tokens, 2 * depth)[:, :depth]
            close_in_scale(w4a16_splitk(x, weight, tile), linear(x, weight))
