"""The fused Qwen3-MoE layer on CUDA: routing and a grouped expert GEMM in three Triton kernels.

1. `_route_kernel`, a program per token: softmax over the router's logits, top-k, renormalise,
   then file the token's k (token, expert) pairs in per-expert buckets (an atomic counter per
   expert gives each pair its place).
2. `_expert_up_kernel`, a program per (block of intermediate columns, expert): that expert's
   bucketed tokens, BLOCK_M at a time, times its gate and up rows, SiLU(gate) * up fused.
3. `_expert_down_kernel`, a program per (block of hidden columns, expert): the down projection,
   scaled by the routing weight, one output row per pair.

Column blocks vary fastest over the grid, so the programs running side by side share an expert's
token rows in L2 (17% faster at prefill than expert-major order, `python -m benchmarks.tune_moe`).

Each expert's weights are read once per BLOCK_M of its tokens and untouched experts cost a
program that reads one counter, so a decode step reads only the experts it routes to. Every
shape is fixed by the token count, so a decode step stays one CUDA-graph replay. A pair's output
does not depend on where the atomics filed it, so results are deterministic; the k outputs of a
token are summed in a fixed order by `TritonOps.add_rms_norm`, fused with the residual add.

Packed 4-bit experts (w4a16) take one of four paths by the mean pairs an expert
(`_expert_path`), all after the same routing and with shapes fixed by the token count, so a
decode step is still one CUDA-graph replay:
- "pairs" (at most one an expert): `w4a16_gemv`, a program per pair and column block;
- "buckets" (up to PAIRS_PER_EXPERT_GEMV): `w4a16_gemv` over the buckets, a program per expert
  and column block that reads the expert's matrix once for all its pairs;
- "tiles": the two GEMM kernels above with PACKED set, each weight tile dequantized in registers
  by `replica.kernels.int4_linear.int4_tile` (reduction steps kept inside one group);
- "dequantized" (prefill, from DEQUANTIZE_FROM_PAIRS, never in a graph): the experts
  dequantized to 16 bits, at most DEQUANTIZED_BYTES of them at a time, then the 16-bit kernels,
  compute-bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import triton
import triton.language as tl
from torch import Tensor

from replica.kernels.int4_linear import (
    GemvTile,
    dequantized,
    gemv_serves,
    int4_tile,
    w4a16_gemv,
)
from replica.ops.mlp import SparseMoE
from replica.ops.packed import PackedInt4


@triton.jit
def _route_kernel(
    logits_ptr,
    weights_ptr,
    experts_ptr,
    counts_ptr,
    bucket_ptr,
    num_experts,
    bucket_stride,
    TOP_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    logits = tl.load(
        logits_ptr + token * num_experts + experts,
        mask=experts < num_experts,
        other=-float("inf"),
    )
    probs = tl.exp(logits - tl.max(logits, 0))
    probs = probs / tl.sum(probs, 0)
    slots = tl.arange(0, BLOCK_K)
    top_ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    top_probs = tl.zeros([BLOCK_K], dtype=tl.float32)
    remaining = tl.where(experts < num_experts, probs, -1.0)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(remaining, 0)
        top_ids = tl.where(slots == j, best, top_ids)
        top_probs = tl.where(slots == j, tl.max(remaining, 0), top_probs)
        remaining = tl.where(experts == best, -1.0, remaining)
    if NORMALIZE:
        top_probs = top_probs / tl.sum(top_probs, 0)
    live = slots < TOP_K
    pairs = token * TOP_K + slots
    tl.store(weights_ptr + pairs, top_probs, mask=live)
    tl.store(experts_ptr + pairs, top_ids, mask=live)
    place = tl.atomic_add(counts_ptr + top_ids, 1, mask=live)
    tl.store(bucket_ptr + top_ids.to(tl.int64) * bucket_stride + place, pairs, mask=live)


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
    rows,
    row_live,
    k,
    depth,
    PACKED: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    dtype: tl.constexpr,
):
    """[BLOCK_K, BLOCK_N] of the stacked experts' weight rows `rows` (int64, expert offset
    included), input columns k.. : 16-bit as stored, or 4-bit dequantized."""
    if PACKED:
        tile = tl.trans(
            int4_tile(
                w_ptr, scales_ptr, zeros_ptr, rows, row_live, k, depth,
                GROUP, BLOCK_K, BLOCK_N, dtype,
            )
        )  # fmt: skip
    else:  # both branches in the source are compiled only when taken (a constexpr test)
        ks = k + tl.arange(0, BLOCK_K)
        tile = tl.load(
            w_ptr + rows[None, :] * depth + ks[:, None], mask=row_live[None, :], other=0.0
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
    gate_rows = index * 2 * inter + cols.to(tl.int64)  # [BLOCK_K, BLOCK_N] tiles, transposed
    up_rows = gate_rows + inter
    dtype = x_ptr.dtype.element_ty
    for start in range(0, count, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_live = rows < count
        pairs = tl.load(bucket_ptr + expert * bucket_stride + rows, mask=row_live, other=0)
        x_rows = x_ptr + (pairs // TOP_K).to(tl.int64)[:, None] * hidden + ks[None, :]
        gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, hidden, BLOCK_K):
            x = tl.load(x_rows + k, mask=row_live[:, None], other=0.0)
            gate += tl.dot(x, _weight_tile(
                w_ptr, scales_ptr, zeros_ptr, gate_rows, col_live, k, hidden,
                PACKED, GROUP, BLOCK_K, BLOCK_N, dtype,
            ))  # fmt: skip
            up += tl.dot(x, _weight_tile(
                w_ptr, scales_ptr, zeros_ptr, up_rows, col_live, k, hidden,
                PACKED, GROUP, BLOCK_K, BLOCK_N, dtype,
            ))  # fmt: skip
        g = gate.to(dtype).to(tl.float32)  # rounded where transformers' linear rounds
        silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        product = (silu * up.to(dtype).to(tl.float32)).to(dtype)
        dst = out_ptr + pairs.to(tl.int64)[:, None] * inter + cols[None, :]
        tl.store(dst, product, mask=row_live[:, None] & col_live[None, :])


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
    w_rows = index * hidden + cols.to(tl.int64)
    dtype = act_ptr.dtype.element_ty
    for start in range(0, count, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_live = rows < count
        pairs = tl.load(bucket_ptr + expert * bucket_stride + rows, mask=row_live, other=0)
        pairs = pairs.to(tl.int64)
        act_rows = act_ptr + pairs[:, None] * inter + ks[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, inter, BLOCK_K):
            a = tl.load(act_rows + k, mask=row_live[:, None], other=0.0)
            acc += tl.dot(a, _weight_tile(
                w_ptr, scales_ptr, zeros_ptr, w_rows, col_live, k, inter,
                PACKED, GROUP, BLOCK_K, BLOCK_N, dtype,
            ))  # fmt: skip
        scale = tl.load(weights_ptr + pairs, mask=row_live, other=0.0)
        y = (acc.to(dtype).to(tl.float32) * scale[:, None]).to(dtype)
        dst = out_ptr + pairs[:, None] * hidden + cols[None, :]
        tl.store(dst, y, mask=row_live[:, None] & col_live[None, :])


# Packed experts by mean pairs an expert (PERF.md, fourth pass: the 30B's and 235B's layers)
PAIRS_PER_EXPERT_GEMV = 4  # up to here the GEMV's buckets (at 8 no faster than the tiles)
DEQUANTIZE_FROM_PAIRS = 8  # from here, outside graph capture, a 16-bit copy (1.5x the tiles)
DEQUANTIZED_BYTES = 1 << 30  # the most 16-bit expert weights dequantized at once


@dataclass(frozen=True)
class Tile:
    """Block sizes of one expert GEMM: rows (tokens), output columns (gate and up each, for the
    up kernel), reduction depth, warps and pipeline stages."""

    rows: int
    cols: int
    depth: int
    warps: int
    stages: int


def tiles_for(tokens_per_expert: float) -> tuple[Tile, Tile]:
    """(up, down) tiles by the mean tokens per expert.

    Decode (a few tokens per expert) is a weight stream: row blocks sized so that nearly every
    expert's tokens fit in one (each extra block re-reads the expert), thin column blocks so that
    many programs keep every SM reading. Prefill (hundreds per expert) is compute: wide tiles.
    Chosen with `python -m benchmarks.tune_moe` on an H100 (docs/PERF.md)."""
    if tokens_per_expert <= 24:
        rows = 16 if tokens_per_expert <= 8 else 32
        return Tile(rows, 32, 128, 4, 4), Tile(rows, 64, 128, 4, 4)
    return Tile(128, 128, 64, 8, 3), Tile(256, 128, 64, 8, 3)


def _block_k(dim: int, weight: Tensor | PackedInt4) -> int:
    """The widest reduction block (at most 128) that divides `dim` (no masks on the K loop)
    and, for packed experts, their group (one scale per row and step)."""
    block = math.gcd(dim, 128, weight.group_size if isinstance(weight, PackedInt4) else 128)
    if block < 16:
        raise ValueError(f"expert dimension {dim} is not a multiple of 16")
    return block


def _weight_args(weight: Tensor | PackedInt4) -> tuple[tuple[Tensor, Tensor, Tensor], dict]:
    """The kernels' (weight, scales, zeros) pointers and PACKED / GROUP constants."""
    if isinstance(weight, PackedInt4):
        return tuple(weight.tensors()), {"PACKED": True, "GROUP": weight.group_size}
    return (weight, weight, weight), {"PACKED": False, "GROUP": 1}


def _expert_path(pairs: int, moe: SparseMoE, device: torch.device) -> str:
    """How packed experts run at this many pairs: "pairs", the GEMV a program a pair (at most
    one an expert: a bucket would mostly be one pair); "buckets", the GEMV a program an expert,
    reading its matrix once for all its pairs; "tiles" (the 4-bit expert kernels), or
    "dequantized": prefill, where the 16-bit kernels on a dequantized copy are compute-bound
    (never in a graph: its scratch would stay in the graph's pool)."""
    per_expert = pairs / moe.num_experts
    if not isinstance(moe.gate_up, PackedInt4):
        return "tiles"  # 16-bit experts
    gemv = gemv_serves(1, moe.gate_up) and gemv_serves(1, moe.down)
    if gemv and per_expert <= 1:
        return "pairs"
    if gemv and per_expert <= PAIRS_PER_EXPERT_GEMV:
        return "buckets"
    prefill = device.type == "cuda" and not torch.cuda.is_current_stream_capturing()
    return "dequantized" if per_expert >= DEQUANTIZE_FROM_PAIRS and prefill else "tiles"


def router_logits(x: Tensor, router: Tensor) -> Tensor:
    """[T, experts] in fp32. bf16 inputs widen to fp32 exactly, so one GEMM that accumulates
    and writes fp32 gives fp32 logits without casting x (on a 16k-token prefill the cast and an
    fp32 GEMM took 0.28 ms a layer). CUDA only; the interpreter's CPU runs take the plain way."""
    if x.is_cuda:
        return torch.mm(x, router.t(), out_dtype=torch.float32)
    return torch.nn.functional.linear(x.float(), router.float())


def fused_moe(
    x: Tensor,
    moe: SparseMoE,
    path: str | None = None,
    tiles: tuple[Tile, Tile] | GemvTile | None = None,
) -> Tensor:
    """[T * top_k, hidden]: row t * top_k + j is token t's j-th expert output, weighted.
    `path` overrides `_expert_path`, `tiles` the kernels' (up, down) `tiles_for` or the GEMV's
    tile (the sweeps)."""
    tokens, hidden = x.shape
    experts, inter = moe.num_experts, moe.down.shape[2]
    top_k = moe.top_k
    pairs = tokens * top_k
    counts = moe.expert_tokens
    counts.zero_()
    bucket = torch.empty(experts, tokens, dtype=torch.int32, device=x.device)
    weights = torch.empty(pairs, dtype=torch.float32, device=x.device)
    pair_experts = torch.empty(pairs, dtype=torch.int32, device=x.device)
    logits = router_logits(x, moe.router)
    _route_kernel[(tokens,)](
        logits,
        weights,
        pair_experts,
        counts,
        bucket,
        experts,
        tokens,
        TOP_K=top_k,
        NORMALIZE=moe.norm_topk_prob,
        BLOCK_E=triton.next_power_of_2(experts),
        BLOCK_K=triton.next_power_of_2(top_k),
        num_warps=4,
    )
    path = path or _expert_path(pairs, moe, x.device)
    if path in ("pairs", "buckets"):
        rows = {"experts": pair_experts} if path == "pairs" else {"buckets": (counts, bucket)}
        gemv = partial(w4a16_gemv, tile=tiles, **rows)
        return gemv(gemv(x, moe.gate_up, x_row_of=top_k, gated=True), moe.down, route=weights)
    up, down = tiles or tiles_for(pairs / experts)
    act = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(pairs, hidden, dtype=x.dtype, device=x.device)
    launch = _ExpertGemms(x, act, out, weights, counts, bucket, top_k, up, down)
    if path == "dequantized":
        for first, last in _expert_chunks(moe, x.dtype):
            launch.up(dequantized(moe.gate_up[first:last], x.dtype), first)
            launch.down(dequantized(moe.down[first:last], x.dtype), first)
    else:
        launch.up(moe.gate_up, 0)
        launch.down(moe.down, 0)
    return out


def _expert_chunks(moe: SparseMoE, dtype: torch.dtype) -> list[tuple[int, int]]:
    """Expert ranges [first, last) whose 16-bit weights fit DEQUANTIZED_BYTES, near equal."""
    experts = moe.num_experts
    expert_bytes = (moe.gate_up.numel() + moe.down.numel()) // experts * dtype.itemsize
    per_chunk = triton.cdiv(experts, triton.cdiv(experts * expert_bytes, DEQUANTIZED_BYTES))
    return [(first, min(first + per_chunk, experts)) for first in range(0, experts, per_chunk)]


@dataclass(frozen=True)
class _ExpertGemms:
    """The two expert GEMM launches of one MoE call, for all experts or a range of them."""

    x: Tensor
    act: Tensor  # [pairs, inter], SiLU(gate) * up
    out: Tensor  # [pairs, hidden]
    weights: Tensor  # [pairs] routing weights
    counts: Tensor
    bucket: Tensor
    top_k: int
    up_tile: Tile
    down_tile: Tile

    def up(self, gate_up: Tensor | PackedInt4, first_expert: int) -> None:
        """gate_up: experts first_expert.. stacked, [experts, 2 * inter, hidden]."""
        hidden, inter, tile = self.x.shape[1], self.act.shape[1], self.up_tile
        weight_ptrs, constants = _weight_args(gate_up)
        _expert_up_kernel[(triton.cdiv(inter, tile.cols), gate_up.shape[0])](
            self.x,
            *weight_ptrs,
            self.counts,
            self.bucket,
            self.act,
            hidden,
            inter,
            self.bucket.shape[1],
            first_expert,
            TOP_K=self.top_k,
            **constants,
            BLOCK_M=tile.rows,
            BLOCK_N=tile.cols,
            BLOCK_K=min(tile.depth, _block_k(hidden, gate_up)),
            num_warps=tile.warps,
            num_stages=tile.stages,
        )

    def down(self, down: Tensor | PackedInt4, first_expert: int) -> None:
        """down: experts first_expert.. stacked, [experts, hidden, inter]."""
        hidden, inter, tile = self.x.shape[1], self.act.shape[1], self.down_tile
        weight_ptrs, constants = _weight_args(down)
        _expert_down_kernel[(triton.cdiv(hidden, tile.cols), down.shape[0])](
            self.act,
            *weight_ptrs,
            self.weights,
            self.counts,
            self.bucket,
            self.out,
            hidden,
            inter,
            self.bucket.shape[1],
            first_expert,
            **constants,
            BLOCK_M=tile.rows,
            BLOCK_N=tile.cols,
            BLOCK_K=min(tile.depth, _block_k(inter, down)),
            num_warps=tile.warps,
            num_stages=tile.stages,
        )
