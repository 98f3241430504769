"""4-bit nibbles to 16-bit weights in packed half-precision arithmetic (inline PTX), for the dots of
the split-K tile and the fused experts (replica.kernels.int4_splitk.group_dots): two words make
their 16 weights in two prmt and, each pair of weights, a shift, a lop3 and two packed fmas,
where the plain path takes each weight through fp32 and back (a shift or mask, an fma, half a
pack). Compiled for sm_90 or sm_80,
the tiles' loops issue about a third fewer instructions a weight (a static count; not yet
timed: PERF.md, issue 36's eighth session), so the tables serve no PTX tile yet.

Exact, as the plain path: each half of `lop3(word, 0x000F000F, MAGIC)` is the 16-bit C + q
(C = 128 in bf16, 1024 in fp16, whose mantissas hold q whole), C + q - (C + z) is q - z exactly,
and (q - z) s rounds once: the oracle's weight, bit for bit, when the scale has the activations'
dtype (`packed_math`). Triton's interpreter cannot run PTX, so the CPU takes the plain path;
tests/test_int4_ptx.py runs these instructions in a small emulator against the oracle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from replica.kernels.int4_dequantize import Int4Weight

# The halves' magic exponent, one, and C, each as a 16-bit pattern (C's as a float)
HALVES = {"bf16": (0x4300, 0x3F80, 128.0), "f16": (0x6400, 0x3C00, 1024.0)}


def slabs_ptx(half: str) -> str:
    """Two words ($8, $9) to their 16 weights: $(2p) the nibbles p (a packed pair: word $8's
    in the low half), $(2p + 1) the nibbles p + 4, from -(C + z) ($10) and the scale ($11),
    each a packed pair. Elementwise: element i of each output comes from word i alone, however
    Triton pairs the elements. The words' low halves (nibbles 0-3) and high halves (4-7) are
    gathered once (prmt), so each pair of weights then takes a shift, a lop3 and two fmas."""
    magic, one, _ = HALVES[half]
    lines = [
        ".reg .b32 low, high, t, one, nz;",
        "prmt.b32 low, $8, $9, 0x5410;",
        "prmt.b32 high, $8, $9, 0x7632;",
        f"mov.b32 one, {one << 16 | one:#x};",
        "mov.b32 nz, 0x80008000;",
    ]
    for p in range(4):
        for out, halves in ((2 * p, "low"), (2 * p + 1, "high")):
            source = halves
            if p:
                lines.append(f"shr.u32 t, {halves}, {4 * p};")
                source = "t"
            lines += [
                f"lop3.b32 t, {source}, 0x000F000F, {magic << 16 | magic:#x}, 0xEA;",
                f"fma.rn.{half}x2 t, t, one, $10;",
                f"fma.rn.{half}x2 ${out}, t, $11, nz;",
            ]
    return "{\n" + "\n".join(lines) + "\n}"


BF16_SLABS: tl.constexpr = tl.constexpr(slabs_ptx("bf16"))
F16_SLABS: tl.constexpr = tl.constexpr(slabs_ptx("f16"))
SLAB_CONSTRAINTS: tl.constexpr = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 4))
BF16_X8: tl.constexpr = tl.constexpr((tl.bfloat16,) * 8)  # the slabs' dtypes
F16_X8: tl.constexpr = tl.constexpr((tl.float16,) * 8)
BF16_C: tl.constexpr = tl.constexpr(HALVES["bf16"][2])
F16_C: tl.constexpr = tl.constexpr(HALVES["f16"][2])


@triton.jit
def ptx_slabs(words, scale, zero, dtype: tl.constexpr):
    """A group's words [N, W] (int32) as `dtype` weights (q - zero) * scale, scale and zero
    [N, 1] (the scale in `dtype`, the zero any float): 8 slabs [N, W] in the order nibble 0,
    4, 1, 5, 2, 6, 3, 7 (nibble j of word w is the group's column jW + w)."""
    f16: tl.constexpr = dtype == tl.float16
    scale = tl.broadcast_to(scale.to(dtype), words.shape)
    negzero = (-(zero.to(tl.float32) + (F16_C if f16 else BF16_C))).to(dtype)
    negzero = tl.broadcast_to(negzero, words.shape)
    return tl.inline_asm_elementwise(
        F16_SLABS if f16 else BF16_SLABS,
        SLAB_CONSTRAINTS,
        [words, negzero, scale],
        F16_X8 if f16 else BF16_X8,
        True,
        2,
    )


def packed_math(x: Tensor, weight: Int4Weight) -> bool:
    """Whether the PTX path gives the oracle's weights here: on a GPU of sm_80 or later (the
    interpreter runs no PTX; bf16 fma needs sm_80), 16-bit activations, scales of their dtype."""
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    return weight.scales.dtype == x.dtype and torch.cuda.get_device_capability(x.device) >= (8, 0)
