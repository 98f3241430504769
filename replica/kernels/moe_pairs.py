"""A decode step's expert pairs (a few tokens' top-k) through their packed gate-up and down in
one launch: the pair GEMV (`replica.kernels.moe.experts_gemv`) without the kernel boundary
between its gate-up and its down.

- Programs [0, up) take a (pair, column block) of the gate-up rows, SiLU(gate) * up fused, store
  it, and count themselves on the pair's ticket (release).
- Programs [up, up + down) take a (pair, hidden block) of the down projection once the pair's
  ticket counts all its gate-up blocks (a relaxed spin, then one acquire), the routing weight in
  the epilogue.
  The pair's last down program to finish sets both its tickets back to zero, so the next
  CUDA-graph replay finds them there.

The spin cannot wait forever because a GPU starts a grid's programs in the order of their index
(CUB's decoupled look-back scan relies on the same): every gate-up program has started, and
will finish, before a down program waits. Triton's interpreter runs programs one at a time in
that order. Both halves run `int4_gemv.gemv_outputs`, the two-launch path's code, so the outputs
are equal bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from replica.kernels.int4_dequantize import Int4Weight
from replica.kernels.int4_gemv import GemvTile, gemv_outputs
from replica.kernels.moe_route import Routing

MAX_PAIRS = 1024  # pairs a launch: the tickets buffer holds two counters a pair


@triton.jit
def _pairs_kernel(
    x_ptr, up_qweight_ptr, up_scales_ptr, up_zeros_ptr, down_qweight_ptr, down_scales_ptr,
    down_zeros_ptr, experts_ptr, route_ptr, act_ptr, out_ptr, tickets_ptr, pairs, hidden, inter,
    stride_x,
    TOP_K: tl.constexpr, UP_GROUP: tl.constexpr, UP_N: tl.constexpr, UP_GROUPS: tl.constexpr,
    UP_PREFETCH: tl.constexpr, DOWN_GROUP: tl.constexpr, DOWN_N: tl.constexpr,
    DOWN_GROUPS: tl.constexpr, DOWN_PREFETCH: tl.constexpr,
):  # fmt: skip
    program = tl.program_id(0)
    up_blocks = tl.cdiv(inter, UP_N)
    down_blocks = tl.cdiv(hidden, DOWN_N)
    up_programs = up_blocks * pairs
    if program < up_programs:
        pair, cols, out, expert = _pair_block(experts_ptr, program, up_blocks, UP_N)
        gemv_outputs(
            x_ptr, up_qweight_ptr, up_scales_ptr, up_zeros_ptr, route_ptr, act_ptr,
            expert * 2 * inter + cols, cols, out, out < pairs, 0, pairs, inter, hidden, stride_x,
            0, hidden // UP_GROUP, TOP_K, UP_GROUP, 1, UP_N, UP_GROUPS, 1, True, False,
            UP_PREFETCH,
        )  # fmt: skip
        tl.debug_barrier()  # every thread's part stored before the ticket says so
        tl.atomic_add(tickets_ptr + pair, 1, sem="release")
    else:
        pair, cols, out, expert = _pair_block(
            experts_ptr, program - up_programs, down_blocks, DOWN_N
        )
        while tl.atomic_add(tickets_ptr + pair, 0, sem="relaxed") < up_blocks:
            pass
        tl.atomic_add(tickets_ptr + pair, 0, sem="acquire")  # the gate-up's stores seen from here
        gemv_outputs(
            act_ptr, down_qweight_ptr, down_scales_ptr, down_zeros_ptr, route_ptr, out_ptr,
            expert * hidden + cols, cols, out, out < pairs, 0, pairs, hidden, inter, inter, 0,
            inter // DOWN_GROUP, 1, DOWN_GROUP, 1, DOWN_N, DOWN_GROUPS, 1, False, True,
            DOWN_PREFETCH,
        )  # fmt: skip
        tl.debug_barrier()
        if tl.atomic_add(tickets_ptr + pairs + pair, 1, sem="acq_rel") == down_blocks - 1:
            tl.atomic_xchg(tickets_ptr + pair, 0)
            tl.atomic_xchg(tickets_ptr + pairs + pair, 0)


@triton.jit
def _pair_block(experts_ptr, index, blocks, BLOCK_N: tl.constexpr):
    """Block `index` of a half's (pair, column block) grid: the pair, its columns, its output
    row [1] and its expert."""
    pair = index // blocks
    cols = (index % blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    out = pair.to(tl.int64) + tl.arange(0, 1)
    return pair, cols, out, tl.load(experts_ptr + pair).to(tl.int64)


def pair_tickets(device: torch.device) -> Tensor:
    """A layer's tickets for `experts_pairs_one_launch`: zeros, and zero again after each call."""
    return torch.zeros(2 * MAX_PAIRS, dtype=torch.int32, device=device)


def experts_pairs_one_launch(
    x: Tensor,
    gate_up: Int4Weight,
    down: Int4Weight,
    routing: Routing,
    tiles: tuple[GemvTile, GemvTile],
    tickets: Tensor,
) -> Tensor:
    """[T * top_k, hidden]: `experts_gemv`'s per-pair result, (up, down) `tiles` (one token
    each, the same warps), in one launch; `tickets` from `pair_tickets`."""
    up_tile, down_tile = tiles
    pairs = routing.experts.numel()
    if pairs > MAX_PAIRS:
        raise ValueError(f"{pairs} pairs: one launch takes at most {MAX_PAIRS}")
    if up_tile.features % 2 or down_tile.features % 4 or up_tile.warps != down_tile.warps:
        raise ValueError(f"{tiles}: gate-up rows in pairs, down rows in fours, one warp count")
    hidden, inter = down.shape[1:]
    x = x.contiguous()
    act = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(pairs, hidden, dtype=x.dtype, device=x.device)
    programs = pairs * (
        triton.cdiv(inter, up_tile.features) + triton.cdiv(hidden, down_tile.features)
    )
    _pairs_kernel[(programs,)](
        x, gate_up.qweight, gate_up.scales, gate_up.zeros, down.qweight, down.scales, down.zeros,
        routing.experts, routing.weights, act, out, tickets, pairs, hidden, inter, x.stride(0),
        TOP_K=routing.top_k, UP_GROUP=gate_up.group_size, UP_N=up_tile.features,
        UP_GROUPS=up_tile.groups, UP_PREFETCH=up_tile.prefetch, DOWN_GROUP=down.group_size,
        DOWN_N=down_tile.features, DOWN_GROUPS=down_tile.groups,
        DOWN_PREFETCH=down_tile.prefetch, num_warps=up_tile.warps, num_stages=up_tile.stages,
    )  # fmt: skip
    return out
