"""Packed 4-bit weights (w4a16) dequantized on CUDA: `int4_tile`, the one dequantizing read every
4-bit kernel shares, and `dequantized`, a whole weight copied to 16 bits.

The layout is replica.ops.packed's (this module only reads it): a weight [..., N, K] as int32
words [..., N, K / 8], nibble j of a group's word w holding the group's column jW + w
(W = group / 8), scales and zeros [..., N, K / group]; w = (q - zero) * scale in fp32, rounded
once. A tile never straddles a quantization group, so it needs one scale and one zero per output
feature.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import triton
import triton.language as tl
from torch import Tensor


class Int4Weight(Protocol):
    """What the kernels read of a packed weight (replica.ops.packed.PackedInt4 is one)."""

    qweight: Tensor  # int32 [..., N, K // 8]
    scales: Tensor  # [..., N, K // group]
    zeros: Tensor  # [..., N, K // group]
    group_size: int

    @property
    def shape(self) -> torch.Size: ...

    def __getitem__(self, index: slice) -> Int4Weight:
        """Experts first..last of stacked experts."""


@triton.jit
def int4_tile(
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    features,  # [BLOCK_N] int64: the weight rows (output features) of the tile
    feature_live,
    k,  # first input column; k and k + BLOCK_K - 1 lie in one group
    depth,  # K, the weight's input width
    GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    dtype: tl.constexpr,
):
    """Weights [BLOCK_N, BLOCK_K] (output feature, input column) in `dtype`. The tile's columns
    are nibbles first..first + BLOCK_K / W - 1 of its group's W words (our interleaved layout:
    nibble j of word w is the group's column jW + w), so every feature reads the group's W words,
    and the nibbles [features, j, w] are already the tile's columns in order.

    Arithmetic per weight, cheap on purpose (a decode step must dequantize as fast as it reads):
    the nibble or'ed into the mantissa of 2^23 is 2^23 + q as a float (no int-to-float
    conversion), minus 2^23 is q exactly, and one fma q * scale - zero * scale gives (q - zero) *
    scale exactly in fp32 (every product has at most 15 significant bits), rounded once."""
    words_per_group: tl.constexpr = GROUP // 8
    nibbles_taken: tl.constexpr = BLOCK_K // words_per_group
    words = tl.load(
        qweight_ptr
        + features[:, None] * (depth // 8)
        + (k // GROUP * words_per_group + tl.arange(0, words_per_group))[None, :],
        mask=feature_live[:, None],
        other=0,
    )
    shifts = (k % GROUP // words_per_group + tl.arange(0, nibbles_taken)) * 4
    nibbles = ((words[:, None, :] >> shifts[None, :, None]) & 0xF) | 0x4B000000
    q = tl.reshape(nibbles.to(tl.float32, bitcast=True), (BLOCK_N, BLOCK_K)) - 8388608.0
    group = features * (depth // GROUP) + k // GROUP
    scale = tl.load(scales_ptr + group, mask=feature_live, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + group, mask=feature_live, other=0.0).to(tl.float32)
    return (q * scale[:, None] - (zero * scale)[:, None]).to(dtype)


@triton.jit
def _dequantize_kernel(
    qweight_ptr, scales_ptr, zeros_ptr, out_ptr, n, depth,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    features = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K
    live = features < n
    w = int4_tile(
        qweight_ptr, scales_ptr, zeros_ptr, features, live, k, depth,
        GROUP, BLOCK_K, BLOCK_N, out_ptr.dtype.element_ty,
    )  # fmt: skip
    dst = out_ptr + features[:, None] * depth + k + tl.arange(0, BLOCK_K)[None, :]
    tl.store(dst, w, live[:, None])


def block_depth(preferred: int, depth: int, group: int) -> int:
    """The widest reduction step (at most `preferred`) inside one group that divides K."""
    block = math.gcd(preferred, group, depth)
    if block < 16:
        raise ValueError(f"4-bit width {depth}, group {group}: no reduction block of 16 or more")
    return block


def dequantized(weight: Int4Weight, dtype: torch.dtype) -> Tensor:
    """[..., N, K] in `dtype`, bit for bit `replica.ops.packed.dequantize`, in one kernel: a
    prefill's 16-bit copy of a weight (it reads 0.5 bytes and writes 2 a weight)."""
    depth = weight.shape[-1]
    features = weight.qweight.numel() // (depth // 8)
    out = torch.empty(*weight.shape, dtype=dtype, device=weight.qweight.device)
    block_k = block_depth(128, depth, weight.group_size)
    _dequantize_kernel[(triton.cdiv(features, 32), depth // block_k)](
        weight.qweight, weight.scales, weight.zeros, out, features, depth,
        GROUP=weight.group_size, BLOCK_N=32, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return out
