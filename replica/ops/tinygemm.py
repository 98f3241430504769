"""torch's own w4a16 matmul ("tinygemm", `aten._weight_int4pack_mm`) for the smallest batches,
and the conversion of our packed layout into its own at load.

Its convention differs from ours in two places:

- nibbles: it takes uint8 [N, K / 2], column 2i in the high nibble and 2i + 1 in the low one,
  tiled by `_convert_weight_to_int4pack` into an opaque layout (sm80+);
- zero points: w = (q - 8) * scale + zero, a float zero, with scale and zero stacked as
  [K / group, N, 2] in the activation dtype. Ours, w = (q - z) * s, is the same with
  zero = (8 - z) * s: 0 for a symmetric checkpoint (z = 8, exact), rounded to bf16 for an
  asymmetric one (close: the bound is measured on the GPU by benchmarks.int4_checks).

One stored layout per weight: a weight tinygemm serves is converted once (`TinyGemmInt4`) and our
packed words are dropped; it is served by tinygemm at every token count (no second copy for our
kernels). Which weights it owns is the linear table's to say (replica.ops.tables).

On the CPU torch has a packing op and matmul of the same convention (`*_for_cpu`, values 0..15 as
int32 [N, K]); `reference` is the pure-torch arithmetic of both, the oracle of the conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from replica.ops.packed import PackedInt4, unpack

GROUPS = (32, 64, 128, 256)  # the groups tinygemm takes


@dataclass
class TinyGemmInt4:
    """A 4-bit linear weight in tinygemm's layout, read as if it were a [N, K] tensor."""

    packed: Tensor  # `_convert_weight_to_int4pack`'s opaque tiles (CUDA) or uint8 (CPU)
    scales_and_zeros: Tensor  # [K / group, N, 2] in the activation dtype
    group_size: int
    n: int
    k: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, self.k))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.n * self.k

    def tensors(self) -> list[Tensor]:
        return [self.packed, self.scales_and_zeros]


def servable(weight: PackedInt4) -> bool:
    """tinygemm's limits: one matrix, a group it takes, N a multiple of 8, K of 32 (two of its
    16-column K tiles)."""
    n, k = weight.shape[-2:]
    return weight.qweight.dim() == 2 and weight.group_size in GROUPS and n % 8 == 0 and k % 32 == 0


def inner_k_tiles(k: int) -> int:
    """The most 16-column K tiles (8, 4 or 2) a tinygemm tile holds that still divide K."""
    return next(tiles for tiles in (8, 4, 2) if k % (16 * tiles) == 0)


def values(weight: PackedInt4) -> Tensor:
    """int32 [N, K] of 0..15 in column order, our interleaving undone."""
    return unpack(weight.qweight, weight.group_size)


def nibble_pairs(q: Tensor) -> Tensor:
    """uint8 [N, K / 2] of values [N, K]: column 2i in the high nibble, 2i + 1 in the low."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def scales_and_zeros(weight: PackedInt4, dtype: torch.dtype) -> Tensor:
    """[K / group, N, 2] in `dtype`: (scale, (8 - z) * scale), the float zero computed in fp32
    and rounded once."""
    scale = weight.scales.float()
    zero = (8.0 - weight.zeros.float()) * scale
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).to(dtype).contiguous()


def convert(weight: PackedInt4, dtype: torch.dtype = torch.bfloat16) -> TinyGemmInt4:
    """Our packed weight in tinygemm's layout for activations of `dtype` (its CUDA kernel takes
    bf16 only), on the weight's device."""
    if not servable(weight):
        raise ValueError(f"tinygemm cannot take {tuple(weight.shape)}, group {weight.group_size}")
    n, k = weight.shape
    q = values(weight)
    if q.is_cuda:
        packed = torch.ops.aten._convert_weight_to_int4pack(nibble_pairs(q), inner_k_tiles(k))
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles(k))
    return TinyGemmInt4(packed, scales_and_zeros(weight, dtype), weight.group_size, n, k)


def matmul(x: Tensor, weight: TinyGemmInt4) -> Tensor:
    """x [M, K] @ w.T -> [M, N] through torch's int4 matmul (fp32 accumulation)."""
    args = (x.contiguous(), weight.packed, weight.group_size, weight.scales_and_zeros)
    if x.is_cuda:
        return torch.ops.aten._weight_int4pack_mm(*args)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(*args)


def dequantize(weight: PackedInt4, dtype: torch.dtype) -> Tensor:
    """[N, K] in `dtype`: the weights tinygemm multiplies after `convert` to `dtype`,
    round((q - 8) * scale + zero) with scale and zero rounded to `dtype` first (one fma)."""
    sz = scales_and_zeros(weight, dtype).float().repeat_interleave(weight.group_size, dim=0)
    q = values(weight).float()
    return ((q - 8.0) * sz[..., 0].t() + sz[..., 1].t()).to(dtype)


def reference(x: Tensor, weight: PackedInt4) -> Tensor:
    """What `matmul(x, convert(weight, x.dtype))` computes, in pure torch."""
    return torch.nn.functional.linear(x, dequantize(weight, x.dtype))
