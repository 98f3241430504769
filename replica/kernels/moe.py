"""The fused Qwen3-MoE layer on CUDA: routing and a grouped expert GEMM in Triton kernels.

1. `replica.kernels.moe_route`: softmax over the router's logits, top-k, renormalise, then file
   each token's k (token, expert) pairs in per-expert buckets (a program a token and an atomic
   counter per expert, or one launch for a decode step's tokens).
2. `_expert_up_kernel`, a program per (block of intermediate columns, expert): that expert's
   bucketed tokens, BLOCK_M at a time, times its gate and up rows, SiLU(gate) * up fused.
3. `_expert_down_kernel`, a program per (block of hidden columns, expert): the down projection,
   scaled by the routing weight, one output row per pair.

Column blocks vary fastest over the grid, so the programs running side by side share an expert's
tokens in L2 (`python -m benchmarks.tune_moe`).

Each expert's weights are read once per BLOCK_M of its tokens and untouched experts cost a
program that reads one counter, so a decode step reads only the experts it routes to. Every
shape is fixed by the token count, so a decode step stays one CUDA-graph replay. A pair's output
does not depend on where the atomics filed it, so results are deterministic; the k outputs of a
token are summed in a fixed order by the add + RMSNorm kernel, fused with the residual add.

After the routing (`route_pairs`), the experts run one of four ways, the caller's choice
(replica.ops.tables says which serves which pairs an expert):
- `experts_gemv`, per pair: `w4a16_gemv`, a program per pair and column block (packed experts),
  gate-up and down in two launches or, with tickets, one (`replica.kernels.moe_pairs`);
- `experts_gemv`, bucketed: a program per expert and column block that reads the expert's
  matrix once for all its pairs (packed experts);
- `experts_tiled`: the two GEMM kernels above, 16-bit experts as stored or packed ones
  dequantized tile by tile in registers (`int4_tile`, reduction steps inside one group);
- `experts_dequantized`: packed experts copied to 16 bits, at most `max_bytes` of them at a
  time, then the 16-bit kernels (never in a CUDA graph: its scratch would stay in the graph's
  pool).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from replica.kernels.int4_dequantize import Int4Weight, dequantized, int4_tile
from replica.kernels.int4_gemv import GemvTile, w4a16_gemv
from replica.kernels.launch import Tile
from replica.kernels.moe_pairs import experts_pairs_one_launch
from replica.kernels.moe_route import Routing


@triton.jit
def _program_tile(counts_ptr, first_expert, width, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """An expert GEMM program's expert, its index in the weights given (which start at expert
    `first_expert`), that expert's token count, its output columns (and which of them exist)
    and the reduction offsets."""
    index = tl.program_id(1).to(tl.int64)
    expert = index + first_expert
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    count = tl.load(counts_ptr + expert)
    return expert, index, count, cols, cols < width, tl.arange(0, BLOCK_K)


@triton.jit
def _weight_tile(
    w_ptr,
    scales_ptr,
    zeros_ptr,
    features,
    feature_live,
    k,
    depth,
    PACKED: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    dtype: tl.constexpr,
):
    """[BLOCK_K, BLOCK_N] of the stacked experts' weight rows `features` (int64, expert offset
    included), input columns k.. : 16-bit as stored, or 4-bit dequantized."""
    if PACKED:
        tile = tl.trans(
            int4_tile(
                w_ptr, scales_ptr, zeros_ptr, features, feature_live, k, depth,
                GROUP, BLOCK_K, BLOCK_N, dtype,
            )
        )  # fmt: skip
    else:  # both branches in the source are compiled only when taken (a constexpr test)
        ks = k + tl.arange(0, BLOCK_K)
        tile = tl.load(
            w_ptr + features[None, :] * depth + ks[:, None], mask=feature_live[None, :], other=0.0
        )
    return tile


@triton.jit
def _expert_up_kernel(
    x_ptr,
    w_ptr,  # [experts, 2 * inter, hidden], or its packed words
    scales_ptr,  # packed experts' scales and zeros (PACKED); else unused
    zeros_ptr,
    counts_ptr,
    bucket_ptr,
    out_ptr,  # [pairs, inter]
    hidden,
    inter,
    bucket_stride,
    first_expert,
    TOP_K: tl.constexpr,
    PACKED: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    expert, index, count, cols, col_live, ks = _program_tile(
        counts_ptr, first_expert, inter, BLOCK_N, BLOCK_K
    )
    gate_features = index * 2 * inter + cols.to(tl.int64)  # [BLOCK_K, BLOCK_N] tiles, transposed
    up_features = gate_features + inter
    dtype = x_ptr.dtype.element_ty
    for start in range(0, count, BLOCK_M):
        places = start + tl.arange(0, BLOCK_M)
        live = places < count
        pairs = tl.load(bucket_ptr + expert * bucket_stride + places, mask=live, other=0)
        x_tokens = x_ptr + (pairs // TOP_K).to(tl.int64)[:, None] * hidden + ks[None, :]
        gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, hidden, BLOCK_K):
            x = tl.load(x_tokens + k, mask=live[:, None], other=0.0)
            gate += tl.dot(x, _weight_tile(
                w_ptr, scales_ptr, zeros_ptr, gate_features, col_live, k, hidden,
                PACKED, GROUP, BLOCK_K, BLOCK_N, dtype,
            ))  # fmt: skip
            up += tl.dot(x, _weight_tile(
                w_ptr, scales_ptr, zeros_ptr, up_features, col_live, k, hidden,
                PACKED, GROUP, BLOCK_K, BLOCK_N, dtype,
            ))  # fmt: skip
        g = gate.to(dtype).to(tl.float32)  # rounded where transformers' linear rounds
        silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        product = (silu * up.to(dtype).to(tl.float32)).to(dtype)
        dst = out_ptr + pairs.to(tl.int64)[:, None] * inter + cols[None, :]
        tl.store(dst, product, mask=live[:, None] & col_live[None, :])


@triton.jit
def _expert_down_kernel(
    act_ptr,  # [pairs, inter]
    w_ptr,  # [experts, hidden, inter], or its packed words
    scales_ptr,
    zeros_ptr,
    weights_ptr,  # [pairs] fp32 routing weights
    counts_ptr,
    bucket_ptr,
    out_ptr,  # [pairs, hidden]
    hidden,
    inter,
    bucket_stride,
    first_expert,
    PACKED: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    expert, index, count, cols, col_live, ks = _program_tile(
        counts_ptr, first_expert, hidden, BLOCK_N, BLOCK_K
    )
    w_features = index * hidden + cols.to(tl.int64)
    dtype = act_ptr.dtype.element_ty
    for start in range(0, count, BLOCK_M):
        places = start + tl.arange(0, BLOCK_M)
        live = places < count
        pairs = tl.load(bucket_ptr + expert * bucket_stride + places, mask=live, other=0)
        pairs = pairs.to(tl.int64)
        act_pairs = act_ptr + pairs[:, None] * inter + ks[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, inter, BLOCK_K):
            a = tl.load(act_pairs + k, mask=live[:, None], other=0.0)
            acc += tl.dot(a, _weight_tile(
                w_ptr, scales_ptr, zeros_ptr, w_features, col_live, k, inter,
                PACKED, GROUP, BLOCK_K, BLOCK_N, dtype,
            ))  # fmt: skip
        scale = tl.load(weights_ptr + pairs, mask=live, other=0.0)
        y = (acc.to(dtype).to(tl.float32) * scale[:, None]).to(dtype)
        dst = out_ptr + pairs[:, None] * hidden + cols[None, :]
        tl.store(dst, y, mask=live[:, None] & col_live[None, :])


Experts = Tensor | Int4Weight  # stacked [experts, out, in]: 16-bit, or packed 4-bit


def experts_gemv(
    x: Tensor,
    gate_up: Int4Weight,
    down: Int4Weight,
    routing: Routing,
    tiles: tuple[GemvTile, GemvTile],
    bucketed: bool,
    tickets: Tensor | None = None,
) -> Tensor:
    """[T * top_k, hidden] through the GEMV, (up, down) `tiles`: a program a pair, or
    (`bucketed`) a program an expert over its bucket; a program a pair in one launch given
    `tickets` (replica.kernels.moe_pairs)."""
    if tickets is not None and not bucketed:
        return experts_pairs_one_launch(x, gate_up, down, routing, tiles, tickets)
    pairs: dict = {"experts": routing.experts}
    if bucketed:
        pairs = {"buckets": (routing.counts, routing.bucket)}
    up_tile, down_tile = tiles
    act = w4a16_gemv(x, gate_up, up_tile, outputs_per_token=routing.top_k, gated=True, **pairs)
    return w4a16_gemv(act, down, down_tile, route=routing.weights, **pairs)


def experts_tiled(
    x: Tensor, gate_up: Experts, down: Experts, routing: Routing, tiles: tuple[Tile, Tile]
) -> Tensor:
    """[T * top_k, hidden] through the expert GEMM kernels, (up, down) `tiles`."""
    launch = _ExpertGemms.of(x, down, routing, tiles)
    launch.up(gate_up, 0)
    launch.down(down, 0)
    return launch.out


def experts_dequantized(
    x: Tensor,
    gate_up: Int4Weight,
    down: Int4Weight,
    routing: Routing,
    tiles: tuple[Tile, Tile],
    max_bytes: int,
) -> Tensor:
    """[T * top_k, hidden]: packed experts copied to 16 bits, at most `max_bytes` of them at a
    time, through the 16-bit expert GEMM kernels."""
    launch = _ExpertGemms.of(x, down, routing, tiles)
    for first, last in expert_chunks(gate_up, down, x.dtype, max_bytes):
        launch.up(dequantized(gate_up[first:last], x.dtype), first)
        launch.down(dequantized(down[first:last], x.dtype), first)
    return launch.out


def expert_chunks(
    gate_up: Experts, down: Experts, dtype: torch.dtype, max_bytes: int
) -> list[tuple[int, int]]:
    """Expert ranges [first, last) whose 16-bit weights fit `max_bytes`, near equal."""
    experts = gate_up.shape[0]
    expert_bytes = (gate_up.shape.numel() + down.shape.numel()) // experts * dtype.itemsize
    per_chunk = triton.cdiv(experts, triton.cdiv(experts * expert_bytes, max_bytes))
    return [(first, min(first + per_chunk, experts)) for first in range(0, experts, per_chunk)]


def _block_k(dim: int, weight: Experts) -> int:
    """The widest reduction block (at most 128) that divides `dim` (no masks on the K loop)
    and, for packed experts, their group (one scale per feature and step)."""
    block = math.gcd(dim, 128, 128 if isinstance(weight, Tensor) else weight.group_size)
    if block < 16:
        raise ValueError(f"expert dimension {dim} is not a multiple of 16")
    return block


def _weight_args(weight: Experts) -> tuple[tuple[Tensor, Tensor, Tensor], dict]:
    """The kernels' (weight, scales, zeros) pointers and PACKED / GROUP constants."""
    if isinstance(weight, Tensor):
        return (weight, weight, weight), {"PACKED": False, "GROUP": 1}
    return (weight.qweight, weight.scales, weight.zeros), {
        "PACKED": True,
        "GROUP": weight.group_size,
    }


@dataclass(frozen=True)
class _ExpertGemms:
    """The two expert GEMM launches of one MoE call, for all experts or a range of them."""

    x: Tensor
    act: Tensor  # [pairs, inter], SiLU(gate) * up
    out: Tensor  # [pairs, hidden]
    routing: Routing
    up_tile: Tile
    down_tile: Tile

    @classmethod
    def of(
        cls, x: Tensor, down: Experts, routing: Routing, tiles: tuple[Tile, Tile]
    ) -> _ExpertGemms:
        pairs, (hidden, inter) = routing.weights.numel(), down.shape[1:]
        act = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
        out = torch.empty(pairs, hidden, dtype=x.dtype, device=x.device)
        return cls(x, act, out, routing, *tiles)

    def up(self, gate_up: Experts, first_expert: int) -> None:
        """gate_up: experts first_expert.. stacked, [experts, 2 * inter, hidden]."""
        hidden, inter, tile = self.x.shape[1], self.act.shape[1], self.up_tile
        weight_ptrs, constants = _weight_args(gate_up)
        _expert_up_kernel[(triton.cdiv(inter, tile.features), gate_up.shape[0])](
            self.x,
            *weight_ptrs,
            self.routing.counts,
            self.routing.bucket,
            self.act,
            hidden,
            inter,
            self.routing.bucket.shape[1],
            first_expert,
            TOP_K=self.routing.top_k,
            **constants,
            BLOCK_M=tile.tokens,
            BLOCK_N=tile.features,
            BLOCK_K=min(tile.depth, _block_k(hidden, gate_up)),
            num_warps=tile.warps,
            num_stages=tile.stages,
        )

    def down(self, down: Experts, first_expert: int) -> None:
        """down: experts first_expert.. stacked, [experts, hidden, inter]."""
        hidden, inter, tile = self.x.shape[1], self.act.shape[1], self.down_tile
        weight_ptrs, constants = _weight_args(down)
        _expert_down_kernel[(triton.cdiv(hidden, tile.features), down.shape[0])](
            self.act,
            *weight_ptrs,
            self.routing.weights,
            self.routing.counts,
            self.routing.bucket,
            self.out,
            hidden,
            inter,
            self.routing.bucket.shape[1],
            first_expert,
            **constants,
            BLOCK_M=tile.tokens,
            BLOCK_N=tile.features,
            BLOCK_K=min(tile.depth, _block_k(inter, down)),
            num_warps=tile.warps,
            num_stages=tile.stages,
        )
