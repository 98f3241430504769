"""The w4a16 GEMV on CUDA: a few tokens (decode steps, the MoE's expert pairs) through a packed
4-bit weight without matrix units.

Each program reads a block of output features, several groups per loop step (bytes in flight
hide the memory latency), takes the words two nibbles at a time as bf16 128 + q, and multiplies
them into every token it holds, so a weight is read and dequantized once for all of them. One
token (`int4_gemv_rows`): the block's rows in four sets that share x's loads, conversions and sums.
It fuses SiLU(gate) * up and the MoE routing weight when asked, and takes an expert's bucketed
pairs together. Which tile serves which token count is replica.ops.tables' to say.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from replica.kernels.elementwise import rounded_silu_mul
from replica.kernels.int4_dequantize import Int4Weight
from replica.kernels.int4_gemv_rows import group_words, one_token
from replica.kernels.int4_splitk import nibble_pair, sum_if_last
from replica.kernels.launch import split_k

MAX_GRID_Z = 65535  # CUDA's limit on a grid's third axis: the GEMV's programs (pairs, experts)


@dataclass(frozen=True)
class GemvTile:
    features: int  # output features a program
    groups: int  # quantization groups a loop step
    warps: int
    tokens: int = 1  # tokens of x a program (a power of two)
    stages: int = 3
    prefetch: bool = False  # one token: each step's weights loaded during the step before


@triton.jit
def _gemv_dots(
    qweight_ptr, scales_ptr, zeros_ptr, features, feature_live, x_tokens, x_live, depth, g_lo,
    g_hi, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, TOKENS: tl.constexpr,
):  # fmt: skip
    """[TOKENS, BLOCK_N] fp32: TOKENS (2 or more) activations (pointers `x_tokens`) times weight
    rows `features` over groups g_lo..g_hi - 1, GROUPS groups a step ([features, groups, words]
    loaded at once: the bytes in flight hide the memory's latency). Each weight is dequantized
    once for all tokens, by one fma (128 + q) s - (128 + z) s, exactly (q - z) s in fp32 for
    16-bit scales, then takes an fma a token; x is loaded once for all features."""
    words_per_group: tl.constexpr = GROUP // 8
    group = tl.arange(0, GROUPS)[None, None, :, None]
    word = tl.arange(0, words_per_group)[None, None, None, :]
    features4 = features[None, :, None, None]
    features_live = feature_live[None, :, None, None]
    columns = x_tokens[:, None, None, None] + word
    tokens_live = x_live[:, None, None, None]
    acc = tl.zeros([TOKENS, BLOCK_N, GROUPS, words_per_group], dtype=tl.float32)
    for g0 in range(g_lo, g_hi, GROUPS):
        g = g0 + group
        groups_live = g < g_hi
        words, scale, offset = group_words(
            qweight_ptr, scales_ptr, zeros_ptr, features4, groups_live & features_live, g, depth,
            GROUP, 128.0,
        )  # fmt: skip
        x_group = columns + g * GROUP
        x_mask = groups_live & tokens_live
        for p in tl.static_range(4):
            low, high = nibble_pair(words, p)
            x_low = tl.load(x_group + p * words_per_group, mask=x_mask, other=0.0)
            x_high = tl.load(x_group + (p + 4) * words_per_group, mask=x_mask, other=0.0)
            x_low, x_high = x_low.to(tl.float32), x_high.to(tl.float32)
            acc += (low * scale - offset) * x_low + (high * scale - offset) * x_high
    return tl.sum(tl.sum(acc, axis=3), axis=2)


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    experts_ptr,  # [outputs] int32: each output's expert (PER_OUTPUT_EXPERT); else unused
    counts_ptr,  # [experts] int32 pairs an expert (BUCKETED); else unused
    bucket_ptr,  # [experts, bucket_stride] int32: each expert's pairs (BUCKETED); else unused
    route_ptr,  # [outputs] fp32 routing weights (ROUTED); else unused
    out_ptr,  # [SPLIT_K, outputs, N] fp32 partial sums, or [outputs, N] in x's dtype
    final_ptr,  # SPLIT_K > 1: [outputs, N] in x's dtype, out_ptr's sum
    done_ptr,  # SPLIT_K > 1: [tiles] int32 zeros, splits of each tile done
    outputs,
    n,  # output width (GATED: the gate's, half the weight's rows)
    depth,
    stride_x,
    bucket_stride,
    OUTPUTS_PER_TOKEN: tl.constexpr,  # output o reads x token o // OUTPUTS_PER_TOKEN
    GROUP: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUPS: tl.constexpr,
    TOKENS: tl.constexpr,
    PER_OUTPUT_EXPERT: tl.constexpr,
    BUCKETED: tl.constexpr,
    GATED: tl.constexpr,
    ROUTED: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """out[o, c] = x[o // OUTPUTS_PER_TOKEN] . w[c] without matrix units (`_gemv_dots`), a
    program per feature block and TOKENS outputs: consecutive outputs through one matrix;
    PER_OUTPUT_EXPERT (TOKENS 1): each output through its own expert's matrix; BUCKETED: a
    program per expert, its bucketed pairs TOKENS at a time (K never split). A split K: the
    tile's last split adds the partials (int4_splitk.sum_if_last)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    block = tl.program_id(2)
    width = 2 * n if GATED else n  # rows of one matrix
    span = tl.cdiv(depth // GROUP, SPLIT_K)
    g_lo = split * span
    g_hi = tl.minimum(g_lo + span, depth // GROUP)
    lanes = tl.arange(0, TOKENS)
    if BUCKETED:
        count = tl.load(counts_ptr + block)
        for start in range(0, count, TOKENS):
            live = start + lanes < count
            out = tl.load(bucket_ptr + block * bucket_stride + start + lanes, live, other=0)
            gemv_outputs(
                x_ptr, qweight_ptr, scales_ptr, zeros_ptr, route_ptr, out_ptr,
                block.to(tl.int64) * width + cols, cols, out.to(tl.int64), live, split,
                outputs, n, depth, stride_x, g_lo, g_hi,
                OUTPUTS_PER_TOKEN, GROUP, SPLIT_K, BLOCK_N, GROUPS, TOKENS, GATED, ROUTED, PREFETCH,
            )  # fmt: skip
    else:
        expert = tl.load(experts_ptr + block).to(tl.int64) if PER_OUTPUT_EXPERT else 0
        out = block.to(tl.int64) * TOKENS + lanes
        gemv_outputs(
            x_ptr, qweight_ptr, scales_ptr, zeros_ptr, route_ptr, out_ptr,
            expert * width + cols, cols, out, out < outputs, split,
            outputs, n, depth, stride_x, g_lo, g_hi,
            OUTPUTS_PER_TOKEN, GROUP, SPLIT_K, BLOCK_N, GROUPS, TOKENS, GATED, ROUTED, PREFETCH,
        )  # fmt: skip
        if SPLIT_K > 1:
            tile = tl.program_id(0) * tl.num_programs(2) + block
            live = (out < outputs)[:, None] & (cols < n)[None, :]
            at = out[:, None] * n + cols[None, :]
            sum_if_last(out_ptr, final_ptr, done_ptr, tile, outputs * n, at, live, SPLIT_K)


@triton.jit
def gemv_outputs(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, route_ptr, out_ptr,
    features, cols, out, live, split, outputs, n, depth, stride_x, g_lo, g_hi,
    OUTPUTS_PER_TOKEN: tl.constexpr, GROUP: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, TOKENS: tl.constexpr, GATED: tl.constexpr,
    ROUTED: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    """Outputs `out` (those `live`), columns `cols` of weight rows `features`. GATED: the
    weight is [gate; up] and the output SiLU(gate) * up, rounded where transformers' linear
    rounds. ROUTED: each output scaled by its routing weight."""
    col_live = cols < n
    dtype = x_ptr.dtype.element_ty
    x_tokens = x_ptr + (out // OUTPUTS_PER_TOKEN) * stride_x
    if TOKENS == 1:
        total, up = one_token(
            qweight_ptr, scales_ptr, zeros_ptr, features, cols, n, x_tokens, live, depth, g_lo,
            g_hi, GROUP, BLOCK_N, GROUPS, GATED, PREFETCH,
        )  # fmt: skip
    else:
        total = _gemv_dots(
            qweight_ptr, scales_ptr, zeros_ptr, features, col_live, x_tokens, live, depth, g_lo,
            g_hi, GROUP, BLOCK_N, GROUPS, TOKENS,
        )  # fmt: skip
        if GATED:
            up = _gemv_dots(
                qweight_ptr, scales_ptr, zeros_ptr, features + n, col_live, x_tokens, live, depth,
                g_lo, g_hi, GROUP, BLOCK_N, GROUPS, TOKENS,
            )  # fmt: skip
    if GATED:
        total = rounded_silu_mul(total, up, dtype)
    if ROUTED:
        route = tl.load(route_ptr + out, mask=live, other=0.0)
        total = total.to(dtype).to(tl.float32) * route[:, None]
    dst = out_ptr + (split * outputs + out[:, None]) * n + cols[None, :]
    mask = live[:, None] & col_live[None, :]
    if SPLIT_K == 1:
        tl.store(dst, total.to(dtype), mask=mask)
    else:
        tl.store(dst, total, mask=mask)


def w4a16_gemv(
    x: Tensor,
    weight: Int4Weight,
    tile: GemvTile,
    *,
    experts: Tensor | None = None,
    buckets: tuple[Tensor, Tensor] | None = None,
    outputs_per_token: int = 1,
    gated: bool = False,
    route: Tensor | None = None,
) -> Tensor:
    """A few tokens through a packed weight, [tokens * outputs_per_token, N] in x's dtype:
    output o is x token o // `outputs_per_token` through

    - one matrix, `tile.tokens` outputs a program;
    - `experts` [pairs] int32: stacked experts, expert experts[o] (the MoE's pairs, a program
      each);
    - `buckets` (counts [experts], bucket [experts, stride]) int32: the expert whose bucket
      holds o (several pairs an expert, a program an expert reads its matrix once for them,
      `tile.tokens` at a time);

    `gated`: the weight is [gate; up] and the output SiLU(gate) * up, N half its rows; `route`
    [outputs] fp32: each output scaled by it (the MoE's down projection)."""
    depth = x.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    outputs = x.shape[0] * outputs_per_token
    n = weight.shape[-2] // (2 if gated else 1)
    if experts is not None:  # a program an output
        tile = replace(tile, tokens=1)
        programs = outputs
    elif buckets is not None:  # a program an expert
        programs = buckets[0].numel()
    else:
        programs = triton.cdiv(outputs, tile.tokens)
    if programs > MAX_GRID_Z:
        raise ValueError(f"{programs} programs: the GEMV's grid holds at most {MAX_GRID_Z}")
    if tile.tokens == 1 and tile.features % (2 if gated else 4):
        raise ValueError(f"{tile}: one token splits a block's rows in four sets (gated: two)")
    blocks = triton.cdiv(n, tile.features)
    # K whole: the epilogues need the whole sum, and a bucket's loop would count its tile twice
    whole = gated or route is not None or buckets is not None
    groups = depth // weight.group_size
    split = 1 if whole else split_k(blocks * programs, groups // tile.groups, x.device)
    out = torch.empty(
        split, outputs, n, dtype=x.dtype if split == 1 else torch.float32, device=x.device
    )
    final, done = out, out  # unused unless K is split
    if split > 1:
        final = torch.empty(outputs, n, dtype=x.dtype, device=x.device)
        done = torch.zeros(blocks * programs, dtype=torch.int32, device=x.device)
    counts, bucket = buckets if buckets is not None else (x, x)
    _w4a16_gemv_kernel[(blocks, split, programs)](
        x,
        weight.qweight,
        weight.scales,
        weight.zeros,
        x if experts is None else experts,
        counts,
        bucket,
        x if route is None else route,
        out,
        final,
        done,
        outputs,
        n,
        depth,
        x.stride(0),
        bucket.stride(0),
        OUTPUTS_PER_TOKEN=outputs_per_token,
        GROUP=weight.group_size,
        SPLIT_K=split,
        BLOCK_N=tile.features,
        GROUPS=tile.groups,
        TOKENS=tile.tokens,
        PER_OUTPUT_EXPERT=experts is not None,
        BUCKETED=buckets is not None,
        GATED=gated,
        ROUTED=route is not None,
        PREFETCH=tile.prefetch,
        num_warps=tile.warps,
        num_stages=tile.stages,
    )
    return out[0] if split == 1 else final
