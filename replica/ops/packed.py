"""4-bit weights with per-group scales and zero points (w4a16), and their PyTorch oracle.

Every checkpoint format and `--quantize int4` is converted at load into this one layout, so the
kernels know a single one. A linear's weight [N, K] (output, input; experts stacked in front):

- `qweight` int32 [..., N, K // 8], unsigned 0..15 in each nibble, interleaved within each
  group of G columns (W = G / 8 words): bits 4j..4j+3 of the group's word w hold its column
  jW + w. So a kernel reading a group's W words takes nibble j of each against W neighbouring
  activations, one vector load (`pack`; the checkpoint formats' sequential order, column 8i + j
  in word i, is `pack_nibbles`, converted at load);
- `scales` and `zeros` [..., N, K // group], floats: w = (q - zero) * scale, in fp32, then rounded
  once to the activation dtype. Zero points are small integers, exact in any float dtype; a
  symmetric format has zero 8 everywhere. Scales keep the checkpoint's dtype (fp16 scales in bf16
  would lose three mantissa bits).

`linear` is the CPU path and the oracle: dequantize, then the activation dtype's matmul. A Triton
kernel dequantizes the same way in registers, so its weights are bit for bit the oracle's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

NIBBLES = 8  # 4-bit values per int32 word
GROUP_SIZE = 128
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


@dataclass
class PackedInt4:
    """A 4-bit linear weight (or stacked experts), read as if it were a [..., N, K] tensor."""

    qweight: Tensor  # int32 [..., N, K // 8]
    scales: Tensor  # [..., N, K // group]
    zeros: Tensor  # [..., N, K // group], same dtype as scales
    group_size: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.qweight.shape[:-1], self.qweight.shape[-1] * NIBBLES))

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def numel(self) -> int:
        """Weights it stands for (not bytes): what a token multiplies."""
        return self.shape.numel()

    def tensors(self) -> list[Tensor]:
        return [self.qweight, self.scales, self.zeros]

    def __getitem__(self, index: int | slice) -> PackedInt4:
        """One expert of stacked experts, or a range of them."""
        return PackedInt4(
            self.qweight[index], self.scales[index], self.zeros[index], self.group_size
        )


def stored(weight: Tensor | PackedInt4) -> list[Tensor]:
    """The tensors holding a weight's bytes (any 4-bit layout lists its own: torch's int4 one
    too, replica.ops.tinygemm)."""
    return [weight] if isinstance(weight, Tensor) else weight.tensors()


def servable_group(group_size: int) -> bool:
    """A group the kernels take: a power of two (its words are one `tl.arange`), 16 to 256."""
    return 16 <= group_size <= 256 and group_size & (group_size - 1) == 0


def pack_nibbles(q: Tensor) -> Tensor:
    """int32 [..., K // 8] from values 0..15 [..., K] in sequential order, the checkpoint
    formats': column 8i + j in bits 4j of word i."""
    words = q.to(torch.int32).unflatten(-1, (-1, NIBBLES)) << _SHIFTS.to(q.device)
    return words.sum(-1, dtype=torch.int32)  # disjoint bits: the sum is the bitwise or


def unpack_nibbles(words: Tensor) -> Tensor:
    """Values 0..15 [..., 8 * W] (int32) of packed words [..., W]: `pack_nibbles` undone."""
    return ((words[..., None] >> _SHIFTS.to(words.device)) & 0xF).flatten(-2)


def pack(q: Tensor, group_size: int) -> Tensor:
    """Our words [..., K // 8] of values 0..15 [..., K]: nibble j of a group's word w is the
    group's column jW + w."""
    words = group_size // NIBBLES
    grouped = q.unflatten(-1, (-1, NIBBLES, words)).transpose(-1, -2)  # [..., groups, w, j]
    return pack_nibbles(grouped.flatten(-3))


def unpack(words: Tensor, group_size: int) -> Tensor:
    """Values 0..15 [..., K] of our words: `pack` undone."""
    per_group = group_size // NIBBLES
    values = unpack_nibbles(words).unflatten(-1, (-1, per_group, NIBBLES))  # [..., groups, w, j]
    return values.transpose(-1, -2).flatten(-3)


def dequantize(weight: PackedInt4, dtype: torch.dtype) -> Tensor:
    """[..., N, K] in `dtype`: (q - zero) * scale in fp32, rounded once."""
    q = unpack(weight.qweight, weight.group_size).float().unflatten(-1, (-1, weight.group_size))
    w = (q - weight.zeros.float()[..., None]) * weight.scales.float()[..., None]
    return w.flatten(-2).to(dtype)


def linear(x: Tensor, weight: Tensor | PackedInt4) -> Tensor:
    """x @ weight.T for a 16-bit weight or a packed one (dequantized first: the oracle)."""
    if isinstance(weight, PackedInt4):
        weight = dequantize(weight, x.dtype)
    return F.linear(x, weight)


def quantize(
    weight: Tensor, group_size: int = GROUP_SIZE, symmetric: bool = False, rows: int = 8192
) -> PackedInt4:
    """Round-to-nearest 4-bit quantization per group of `group_size` input columns, on the
    weight's device, `rows` output rows at a time (bounded scratch: a 235B expert stack is 3 GB).

    Asymmetric (the default): scale = (max - min) / 15 and an integer zero point, so a group's
    range maps onto all 16 levels. Symmetric: scale = max |w| / 7, zero 8. Scales are in the
    weight's dtype, and q is rounded against the rounded scale, so dequantizing is the nearest
    grid point of what is stored. `--quantize int4` uses the asymmetric form."""
    *lead, n, k = weight.shape
    group_size = min(group_size, k)  # a linear narrower than a group is one group
    if k % group_size or not servable_group(group_size):
        raise ValueError(f"input width {k}: no group of 16 to 256, a power of two, divides it")
    flat = weight.reshape(-1, k // group_size, group_size)
    parts = [_quantize_rows(chunk, symmetric, weight.dtype) for chunk in flat.split(rows)]
    qweight, scales, zeros = (torch.cat(p).reshape(*lead, n, -1) for p in zip(*parts, strict=True))
    return PackedInt4(qweight, scales, zeros, group_size)


def _quantize_rows(
    groups: Tensor, symmetric: bool, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """(qweight, scales, zeros) of [rows, groups, group_size] weights."""
    w = groups.float()
    if symmetric:
        scale = w.abs().amax(-1) / 7
        zero = torch.full_like(scale, 8.0)
    else:
        low, high = w.amin(-1), w.amax(-1)
        scale = (high - low) / 15
    scale = torch.where(scale > 0, scale, 1.0).to(dtype)
    step = scale.float()
    if not symmetric:
        zero = (-low / step).round().clamp(0, 15)
    q = (w / step[..., None]).round() + zero[..., None]
    return pack(q.clamp(0, 15).flatten(-2), groups.shape[-1]), scale, zero.to(dtype)


def random_packed(
    shape: tuple[int, ...], std: float, dtype: torch.dtype, generator: torch.Generator
) -> PackedInt4:
    """Random 4-bit weights of logical `shape` whose dequantized values have about `std`
    (uniform levels 0..15 around zero 8 have a standard deviation of ~4.6 steps): the GPU
    benchmarks' weights, made packed so a 235B model never exists in 16 bits."""
    *lead, n, k = shape
    device = generator.device
    qweight = torch.randint(
        -(2**31), 2**31 - 1, (*lead, n, k // NIBBLES), generator=generator, device=device
    ).to(torch.int32)
    group_size = min(GROUP_SIZE, k)
    groups = (*lead, n, k // group_size)
    scales = torch.full(groups, std / 4.6, dtype=dtype, device=device)
    zeros = torch.full(groups, 8.0, dtype=dtype, device=device)
    return PackedInt4(qweight, scales, zeros, group_size)
