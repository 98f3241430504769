"""The fused 4-bit MoE on CUDA: packed experts (groups of 128 or more) through one gate-up and
one down kernel, shapes fixed by the token count (a decode step stays one CUDA-graph replay); it
serves every decode size and the smaller prefills (replica.ops.tables says which).

1. `segments`: the routed (token, expert) pairs, already filed in per-expert buckets
   (replica.kernels.moe_route), laid out as per-expert segments padded to BLOCK_M, a program per
   expert: each segment block names its expert; blocks past the last segment name none.
2. `_fused_up_kernel`, a program per (segment block, column block): the block's pairs through
   its expert's gate and up rows, dequantized in registers as the split-K tile does
   (replica.kernels.int4_splitk: tokens on the MMA's N side, bf16 pair magic), SiLU(gate) * up
   fused.
3. `_fused_down_kernel`: the down projection, each pair's routing weight in the epilogue.

An expert's weights are read once a segment block, so a decode step reads each touched expert
once for up to BLOCK_M of its pairs. Outputs do not depend on where the atomics filed a pair:
deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from replica.kernels.elementwise import rounded_silu_mul
from replica.kernels.int4_dequantize import Int4Weight
from replica.kernels.int4_ptx import packed_math
from replica.kernels.int4_splitk import MIN_GROUP, span_dots
from replica.kernels.moe_route import Routing


@dataclass(frozen=True)
class FusedTile:
    tokens: int  # BLOCK_M: a segment block's pairs (16 or more)
    up_features: int  # BLOCK_N of the gate-up kernel (intermediate columns)
    down_features: int  # BLOCK_N of the down kernel (hidden columns)
    warps: int
    stages: int
    ptx: bool = False  # nibbles to weights in packed 16-bit PTX (replica.kernels.int4_ptx)
    two_groups: bool = False  # int4_splitk.span_dots' TWO, in each kernel whose K has even groups


@dataclass(frozen=True)
class Segments:
    pairs: Tensor  # [blocks * BLOCK_M] int32: pair ids by segment, `total` past a segment's end
    experts: Tensor  # [blocks] int32: each block's expert, -1 past the last segment
    total: int  # pairs routed


@triton.jit
def _segments_kernel(
    counts_ptr, bucket_ptr, pairs_ptr, experts_ptr, num_experts, bucket_stride, total,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Expert e's pairs into its segment, which starts after the blocks of experts 0..e-1."""
    expert = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    first = tl.sum(tl.where(experts < expert, blocks, 0), 0)
    count = tl.load(counts_ptr + expert)
    places = tl.arange(0, BLOCK_T)
    mine = places < tl.cdiv(count, BLOCK_M) * BLOCK_M
    filed = tl.load(bucket_ptr + expert * bucket_stride + places, places < count, other=total)
    tl.store(pairs_ptr + first * BLOCK_M + places, filed, mask=mine)
    tl.store(
        experts_ptr + first + places,
        tl.zeros([BLOCK_T], tl.int32) + expert,
        mask=places < tl.cdiv(count, BLOCK_M),
    )


def max_blocks(pairs: int, experts: int, block_m: int) -> int:
    """Segment blocks that any routing of `pairs` over `experts` can fill: each touched expert
    (at most min(experts, pairs)) rounds its count up to a block."""
    return (pairs + min(experts, pairs) * (block_m - 1)) // block_m


def segments(routing: Routing, block_m: int) -> Segments:
    """The pairs of `routing` in per-expert segments padded to `block_m`."""
    experts, tokens = routing.bucket.shape
    total = routing.weights.numel()
    blocks = max_blocks(total, experts, block_m)
    device = routing.counts.device
    pairs = torch.full((blocks * block_m,), total, dtype=torch.int32, device=device)
    segment_experts = torch.full((blocks,), -1, dtype=torch.int32, device=device)
    _segments_kernel[(experts,)](
        routing.counts, routing.bucket, pairs, segment_experts, experts,
        routing.bucket.stride(0), total, BLOCK_M=block_m,
        BLOCK_E=triton.next_power_of_2(experts),
        BLOCK_T=triton.next_power_of_2(triton.cdiv(tokens, block_m) * block_m),
    )  # fmt: skip
    return Segments(pairs, segment_experts, total)


@triton.jit
def _segment_block(pairs_ptr, experts_ptr, total, BLOCK_M: tl.constexpr):
    """This program's expert (-1: none) and its pairs [BLOCK_M] (int64) and which are live."""
    block = tl.program_id(1)
    expert = tl.load(experts_ptr + block)
    pairs = tl.load(pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    return expert, pairs, pairs < total


@triton.jit
def _expert_dots(
    x_ptr, stride_x, rows, live, qweight_ptr, scales_ptr, zeros_ptr, features, feature_live,
    depth, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, PTX: tl.constexpr,
    TWO: tl.constexpr,
):  # fmt: skip
    """out.T [BLOCK_N, BLOCK_M] fp32: x rows `rows` times weight rows `features` over all K."""
    return span_dots(
        tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), x_ptr, stride_x, rows, live, qweight_ptr,
        scales_ptr, zeros_ptr, features, feature_live, 0, depth // GROUP, depth, GROUP, PTX,
        TWO, False,
    )  # fmt: skip


@triton.jit
def _fused_up_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, pairs_ptr, experts_ptr, act_ptr, hidden, inter,
    total, TOP_K: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PTX: tl.constexpr, TWO: tl.constexpr,
):  # fmt: skip
    expert, pairs, live = _segment_block(pairs_ptr, experts_ptr, total, BLOCK_M)
    if expert >= 0:
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_live = cols < inter
        gate_rows = expert.to(tl.int64) * 2 * inter + cols
        tokens = pairs // TOP_K
        gate = _expert_dots(
            x_ptr, hidden, tokens, live, qweight_ptr, scales_ptr, zeros_ptr, gate_rows,
            col_live, hidden, GROUP, BLOCK_N, BLOCK_M, PTX, TWO,
        )  # fmt: skip
        up = _expert_dots(
            x_ptr, hidden, tokens, live, qweight_ptr, scales_ptr, zeros_ptr, gate_rows + inter,
            col_live, hidden, GROUP, BLOCK_N, BLOCK_M, PTX, TWO,
        )  # fmt: skip
        dtype = x_ptr.dtype.element_ty
        product = rounded_silu_mul(gate, up, dtype).to(dtype)
        dst = act_ptr + pairs[None, :] * inter + cols[:, None]
        tl.store(dst, product, mask=col_live[:, None] & live[None, :])


@triton.jit
def _fused_down_kernel(
    act_ptr, qweight_ptr, scales_ptr, zeros_ptr, route_ptr, pairs_ptr, experts_ptr, out_ptr,
    hidden, inter, total, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PTX: tl.constexpr, TWO: tl.constexpr,
):  # fmt: skip
    expert, pairs, live = _segment_block(pairs_ptr, experts_ptr, total, BLOCK_M)
    if expert >= 0:
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_live = cols < hidden
        acc = _expert_dots(
            act_ptr, inter, pairs, live, qweight_ptr, scales_ptr, zeros_ptr,
            expert.to(tl.int64) * hidden + cols, col_live, inter, GROUP, BLOCK_N, BLOCK_M, PTX,
            TWO,
        )  # fmt: skip
        dtype = act_ptr.dtype.element_ty
        route = tl.load(route_ptr + pairs, mask=live, other=0.0)
        y = (acc.to(dtype).to(tl.float32) * route[None, :]).to(dtype)
        dst = out_ptr + pairs[None, :] * hidden + cols[:, None]
        tl.store(dst, y, mask=col_live[:, None] & live[None, :])


def even_groups(weight: Int4Weight) -> bool:
    """Whether a row of `weight` holds an even count of groups (two a step cover it)."""
    return weight.shape[-1] // weight.group_size % 2 == 0


def experts_fused(
    x: Tensor, gate_up: Int4Weight, down: Int4Weight, routing: Routing, tile: FusedTile
) -> Tensor:
    """[T * top_k, hidden]: row t * top_k + j is token t's j-th expert output, weighted."""
    if min(gate_up.group_size, down.group_size) < MIN_GROUP:
        raise ValueError(f"the fused experts need groups of {MIN_GROUP} or more")
    hidden, inter = down.shape[1:]
    x = x.contiguous()
    seg = segments(routing, tile.tokens)
    act = torch.empty(seg.total, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(seg.total, hidden, dtype=x.dtype, device=x.device)
    blocks = seg.experts.numel()
    launch = {"num_warps": tile.warps, "num_stages": tile.stages}
    ptx = tile.ptx and packed_math(x, gate_up) and packed_math(x, down)
    _fused_up_kernel[(triton.cdiv(inter, tile.up_features), blocks)](
        x, gate_up.qweight, gate_up.scales, gate_up.zeros, seg.pairs, seg.experts, act, hidden,
        inter, seg.total, TOP_K=routing.top_k, GROUP=gate_up.group_size, BLOCK_M=tile.tokens,
        BLOCK_N=tile.up_features, PTX=ptx, TWO=tile.two_groups and even_groups(gate_up), **launch,
    )  # fmt: skip
    _fused_down_kernel[(triton.cdiv(hidden, tile.down_features), blocks)](
        act, down.qweight, down.scales, down.zeros, routing.weights, seg.pairs, seg.experts, out,
        hidden, inter, seg.total, GROUP=down.group_size, BLOCK_M=tile.tokens,
        BLOCK_N=tile.down_features, PTX=ptx, TWO=tile.two_groups and even_groups(down), **launch,
    )  # fmt: skip
    return out
