"""w4a16 matrix multiply on CUDA: bf16 activations times packed 4-bit weights
(replica.ops.packed's layout), dequantized in registers, accumulated in fp32.

`int4_tile` dequantizes one [BLOCK_N, BLOCK_K] tile of weights exactly as the PyTorch oracle
does ((q - zero) * scale in fp32, rounded once), so the weights a dot product sees are the
oracle's bit for bit; the fused-expert kernels (replica.kernels.moe) read their packed experts
through it too. A tile never straddles a quantization group, so it needs one scale and one zero
per output row.

`w4a16_linear` picks a kernel by the token count:
- up to `GEMV_TOKENS` (decode steps, MoE expert pairs; with groups of 128 or more only up to
  2 tokens): `_w4a16_gemv_kernel`, no matrix units. Each program reads a block of weight rows,
  several groups per loop step (bytes in flight hide the memory latency), takes the words two
  nibbles at a time as bf16 128 + q, and multiplies them into every token it holds. It fuses
  SiLU(gate) * up and the MoE routing weight when asked, and takes an expert's bucketed pairs
  together;
- groups of 128 or more, SLAB_TOKENS to DECODE_ROWS tokens: the tile kernel a group at a time
  in nibble slabs (`_slab_dots`: nibble j of a group's words is W contiguous columns, so each is
  a [rows, W] weight tile for a K = W dot, with no reshape);
- other groups, up to `DEQUANTIZE_FROM` tokens: the tile kernel through `int4_tile`;
- both kernels split over K when the output has too few blocks to keep every SM reading (fp32
  partial sums added in a fixed order: deterministic);
- beyond: dequantize the weight to 16 bits once and run the 16-bit GEMM, which is compute-bound
  and faster at these sizes than any tile of ours measured (PERF.md, issue 24's third pass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from replica.ops.packed import PackedInt4, servable_group


@triton.jit
def int4_tile(
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    rows,  # [BLOCK_N] int64: the weight rows (output features) of the tile
    row_live,
    k,  # first input column; k and k + BLOCK_K - 1 lie in one group
    depth,  # K, the weight's input width
    GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    dtype: tl.constexpr,
):
    """Weights [BLOCK_N, BLOCK_K] (output row, input column) in `dtype`. The tile's columns are
    nibbles first..first + BLOCK_K / W - 1 of its group's W words (our interleaved layout: nibble
    j of word w is the group's column jW + w), so every row reads the group's W words, and the
    nibbles [rows, j, w] are already the tile's columns in order.

    Arithmetic per weight, cheap on purpose (a decode step must dequantize as fast as it reads):
    the nibble or'ed into the mantissa of 2^23 is 2^23 + q as a float (no int-to-float
    conversion), minus 2^23 is q exactly, and one fma q * scale - zero * scale gives (q - zero) *
    scale exactly in fp32 (every product has at most 15 significant bits), rounded once."""
    words_per_group: tl.constexpr = GROUP // 8
    nibbles_taken: tl.constexpr = BLOCK_K // words_per_group
    words = tl.load(
        qweight_ptr
        + rows[:, None] * (depth // 8)
        + (k // GROUP * words_per_group + tl.arange(0, words_per_group))[None, :],
        mask=row_live[:, None],
        other=0,
    )
    shifts = (k % GROUP // words_per_group + tl.arange(0, nibbles_taken)) * 4
    nibbles = ((words[:, None, :] >> shifts[None, :, None]) & 0xF) | 0x4B000000
    q = tl.reshape(nibbles.to(tl.float32, bitcast=True), (BLOCK_N, BLOCK_K)) - 8388608.0
    group = rows * (depth // GROUP) + k // GROUP
    scale = tl.load(scales_ptr + group, mask=row_live, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + group, mask=row_live, other=0.0).to(tl.float32)
    return (q * scale[:, None] - (zero * scale)[:, None]).to(dtype)


@triton.jit
def _slab_dots(
    acc, x_rows, token_live, qweight_ptr, scales_ptr, zeros_ptr, rows, row_live, g, depth,
    GROUP: tl.constexpr, dtype: tl.constexpr,
):  # fmt: skip
    """acc plus group g's product. Nibble j of the group's W words is its columns jW..jW+W-1
    (our layout), contiguous: each nibble is a [rows, W] weight slab dequantized in the layout it
    was loaded in (as the oracle: (q - zero) * scale in fp32, rounded once) and one dot with
    K = W, no reshape: 1.9-3.2x faster than `int4_tile`'s tiles at 4-64 tokens (PERF.md)."""
    words_per_group: tl.constexpr = GROUP // 8
    word = tl.arange(0, words_per_group)
    words = tl.load(
        qweight_ptr + rows[:, None] * (depth // 8) + g * words_per_group + word[None, :],
        mask=row_live[:, None],
        other=0,
    )
    group = rows * (depth // GROUP) + g
    scale = tl.load(scales_ptr + group, mask=row_live, other=0.0).to(tl.float32)[:, None]
    zero = tl.load(zeros_ptr + group, mask=row_live, other=0.0).to(tl.float32)[:, None]
    for j in tl.static_range(8):
        q = (((words >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        w = (q * scale - zero * scale).to(dtype)
        columns = g * GROUP + j * words_per_group + word[None, :]
        x = tl.load(x_rows + columns, mask=token_live[:, None], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    return acc


@triton.jit
def _w4a16_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    out_ptr,  # [SPLIT_K, M, N] fp32 partial sums, or [M, N] in x's dtype when SPLIT_K is 1
    m,
    n,
    depth,
    stride_x,
    GROUP: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SLABS: tl.constexpr,  # a group at a time in nibble slabs (`_slab_dots`); else int4_tile
):
    tokens = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    token_live, row_live = tokens < m, rows < n
    dtype = x_ptr.dtype.element_ty
    span = depth // SPLIT_K
    x_rows = x_ptr + tokens[:, None] * stride_x
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if SLABS:  # a group a step, a dot of K = GROUP / 8 a nibble
        for g in range(split * span // GROUP, (split + 1) * span // GROUP):
            acc = _slab_dots(
                acc, x_rows, token_live, qweight_ptr, scales_ptr, zeros_ptr, rows, row_live, g,
                depth, GROUP, dtype,
            )  # fmt: skip
    else:
        for k in range(split * span, (split + 1) * span, BLOCK_K):
            x = tl.load(x_rows + k + tl.arange(0, BLOCK_K)[None, :], token_live[:, None], other=0.0)
            w = int4_tile(
                qweight_ptr, scales_ptr, zeros_ptr, rows, row_live, k, depth,
                GROUP, BLOCK_K, BLOCK_N, dtype,
            )  # fmt: skip
            acc += tl.dot(x, tl.trans(w))
    dst = out_ptr + (split * m + tokens[:, None]) * n + rows[None, :]
    live = token_live[:, None] & row_live[None, :]
    if SPLIT_K == 1:
        tl.store(dst, acc.to(dtype), mask=live)
    else:
        tl.store(dst, acc, mask=live)


@triton.jit
def _gemv_rows(
    qweight_ptr, scales_ptr, zeros_ptr, rows, row_live, x_rows, x_live, depth, g_lo, g_hi,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, TOKENS: tl.constexpr,
):  # fmt: skip
    """[TOKENS, BLOCK_N] fp32: TOKENS activation rows (pointers `x_rows`) times weight rows
    `rows` (int64, experts' offsets included) over groups g_lo..g_hi - 1, GROUPS groups a step
    ([rows, groups, words] loaded at once: the bytes in flight hide the memory's latency).

    (word >> 4p) & 0x000F000F | 0x43004300 is two bf16 values 128 + q (nibbles p and p + 4, q
    in the mantissa), each half a float by a shift or a mask. One token sums (128 + q) x and
    scales once a word (the 128s folded into the zero: an fma a weight, the third pass's
    kernel); several dequantize each weight once, by one fma
    (128 + q) s - (128 + z) s, exactly (q - z) s in fp32 for 16-bit scales, then take an fma a
    token. Nibble j of a group's word w is column jW + w (our layout), so the 8 activations a
    word needs are 8 loads of [tokens, groups, words], shared by every row a thread holds."""
    words_per_group: tl.constexpr = GROUP // 8
    groups = depth // GROUP
    group = tl.arange(0, GROUPS)[None, None, :, None]
    word = tl.arange(0, words_per_group)[None, None, None, :]
    rows4 = rows[None, :, None, None]
    rows_live = row_live[None, :, None, None]
    columns = x_rows[:, None, None, None] + word
    tokens_live = x_live[:, None, None, None]
    acc = tl.zeros([TOKENS, BLOCK_N, GROUPS, words_per_group], dtype=tl.float32)
    for g0 in range(g_lo, g_hi, GROUPS):
        g = g0 + group
        groups_live = g < g_hi
        live = groups_live & rows_live
        words = tl.load(
            qweight_ptr + rows4 * (depth // 8) + g * words_per_group + word, mask=live, other=0
        )
        scale = tl.load(scales_ptr + rows4 * groups + g, mask=live, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + rows4 * groups + g, mask=live, other=0.0).to(tl.float32)
        offset = scale * (zero + 128.0)
        x_group = columns + g * GROUP
        # One token: x loaded in the words' shape (one load a row, from L1) multiplies without
        # a layout conversion, 47.9 against 59.1 us for the 4B's four projections; several:
        # loaded once for all rows, 70.7 against 107.3 at 2 tokens (PERF.md, fourth pass)
        x_mask = (live if TOKENS == 1 else groups_live) & tokens_live
        codes = tl.zeros([TOKENS, BLOCK_N, GROUPS, words_per_group], dtype=tl.float32)
        x_sum = tl.zeros([TOKENS, 1, GROUPS, words_per_group], dtype=tl.float32)
        for p in tl.static_range(4):
            pair = ((words >> (4 * p)) & 0x000F000F) | 0x43004300
            low = (pair << 16).to(tl.float32, bitcast=True)
            high = (pair & -65536).to(tl.float32, bitcast=True)
            x_low = tl.load(x_group + p * words_per_group, mask=x_mask, other=0.0)
            x_high = tl.load(x_group + (p + 4) * words_per_group, mask=x_mask, other=0.0)
            x_low, x_high = x_low.to(tl.float32), x_high.to(tl.float32)
            if TOKENS == 1:  # sum (128 + q) x, scaled below: one fma a weight
                codes += low * x_low + high * x_high
                x_sum += x_low + x_high
            else:  # each weight dequantized once for all tokens, then one fma a token
                acc += (low * scale - offset) * x_low + (high * scale - offset) * x_high
        if TOKENS == 1:  # sum (q - z) s x = s sum((128 + q) x) - (128 + z) s sum(x)
            acc += scale * codes - offset * x_sum
    return tl.sum(tl.sum(acc, axis=3), axis=2)


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    experts_ptr,  # [out rows] int32: each output row's expert (PER_ROW_EXPERT); else unused
    counts_ptr,  # [experts] int32 pairs an expert (BUCKETED); else unused
    bucket_ptr,  # [experts, bucket_stride] int32: each expert's pairs (BUCKETED); else unused
    route_ptr,  # [out rows] fp32 routing weights (ROUTED); else unused
    out_ptr,  # [SPLIT_K, out rows, N] fp32 partial sums, or [out rows, N] in x's dtype
    out_rows,
    n,  # output width (GATED: the gate's, half the weight's rows)
    depth,
    stride_x,
    bucket_stride,
    X_ROW_OF: tl.constexpr,  # output row r reads x row r // X_ROW_OF (an expert pair's token)
    GROUP: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUPS: tl.constexpr,
    TOKENS: tl.constexpr,
    PER_ROW_EXPERT: tl.constexpr,
    BUCKETED: tl.constexpr,
    GATED: tl.constexpr,
    ROUTED: tl.constexpr,
):
    """out[r, c] = x[r // X_ROW_OF] . w[c] without matrix units (`_gemv_rows`), a program per
    column block and TOKENS output rows: consecutive rows through one matrix; PER_ROW_EXPERT
    (TOKENS 1): each row through its own expert's matrix; BUCKETED: a program per expert, its
    bucketed pairs TOKENS at a time."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    block = tl.program_id(2)
    width = 2 * n if GATED else n  # rows of one matrix
    span = tl.cdiv(depth // GROUP, SPLIT_K)
    g_lo = split * span
    g_hi = tl.minimum(g_lo + span, depth // GROUP)
    slots = tl.arange(0, TOKENS)
    if BUCKETED:
        count = tl.load(counts_ptr + block)
        for start in range(0, count, TOKENS):
            live = start + slots < count
            out_row = tl.load(bucket_ptr + block * bucket_stride + start + slots, live, other=0)
            _gemv_out_rows(
                x_ptr, qweight_ptr, scales_ptr, zeros_ptr, route_ptr, out_ptr,
                block.to(tl.int64) * width + cols, cols, out_row.to(tl.int64), live, split,
                out_rows, n, depth, stride_x, g_lo, g_hi,
                X_ROW_OF, GROUP, SPLIT_K, BLOCK_N, GROUPS, TOKENS, GATED, ROUTED,
            )  # fmt: skip
    else:
        expert = tl.load(experts_ptr + block).to(tl.int64) if PER_ROW_EXPERT else 0
        out_row = block.to(tl.int64) * TOKENS + slots
        _gemv_out_rows(
            x_ptr, qweight_ptr, scales_ptr, zeros_ptr, route_ptr, out_ptr,
            expert * width + cols, cols, out_row, out_row < out_rows, split,
            out_rows, n, depth, stride_x, g_lo, g_hi,
            X_ROW_OF, GROUP, SPLIT_K, BLOCK_N, GROUPS, TOKENS, GATED, ROUTED,
        )  # fmt: skip


@triton.jit
def _gemv_out_rows(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, route_ptr, out_ptr,
    rows, cols, out_row, live, split, out_rows, n, depth, stride_x, g_lo, g_hi,
    X_ROW_OF: tl.constexpr, GROUP: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUPS: tl.constexpr, TOKENS: tl.constexpr, GATED: tl.constexpr, ROUTED: tl.constexpr,
):  # fmt: skip
    """Output rows `out_row` (those `live`), columns `cols` of weight rows `rows`. GATED: the
    weight is [gate; up] and the output SiLU(gate) * up, rounded where transformers' linear
    rounds. ROUTED: each output row scaled by its routing weight."""
    col_live = cols < n
    dtype = x_ptr.dtype.element_ty
    x_rows = x_ptr + (out_row // X_ROW_OF) * stride_x
    total = _gemv_rows(
        qweight_ptr, scales_ptr, zeros_ptr, rows, col_live, x_rows, live, depth, g_lo, g_hi,
        GROUP, BLOCK_N, GROUPS, TOKENS,
    )  # fmt: skip
    if GATED:
        up = _gemv_rows(
            qweight_ptr, scales_ptr, zeros_ptr, rows + n, col_live, x_rows, live, depth,
            g_lo, g_hi, GROUP, BLOCK_N, GROUPS, TOKENS,
        )  # fmt: skip
        gate = total.to(dtype).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        total = silu * up.to(dtype).to(tl.float32)
    if ROUTED:
        route = tl.load(route_ptr + out_row, mask=live, other=0.0)
        total = total.to(dtype).to(tl.float32) * route[:, None]
    dst = out_ptr + (split * out_rows + out_row[:, None]) * n + cols[None, :]
    mask = live[:, None] & col_live[None, :]
    if SPLIT_K == 1:
        tl.store(dst, total.to(dtype), mask=mask)
    else:
        tl.store(dst, total, mask=mask)


@triton.jit
def _dequantize_kernel(
    qweight_ptr, scales_ptr, zeros_ptr, out_ptr, n, depth,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K
    live = rows < n
    w = int4_tile(
        qweight_ptr, scales_ptr, zeros_ptr, rows, live, k, depth,
        GROUP, BLOCK_K, BLOCK_N, out_ptr.dtype.element_ty,
    )  # fmt: skip
    tl.store(out_ptr + rows[:, None] * depth + k + tl.arange(0, BLOCK_K)[None, :], w, live[:, None])


@dataclass(frozen=True)
class Int4Tile:
    rows: int  # tokens
    cols: int  # output features
    depth: int  # input columns per step
    warps: int
    stages: int


@dataclass(frozen=True)
class GemvTile:
    cols: int  # output features a program
    groups: int  # quantization groups a loop step
    warps: int
    tokens: int = 1  # rows of x a program (a power of two)
    stages: int = 3


GEMV_TOKENS = 4  # up to here the GEMV (from SLAB_TOKENS the slabs where they serve)
GEMV_TILES = {  # by tokens (the next power of two): the best for the 4B's qkv + o + down, and
    # for its gated gate_up, in the sweeps of PERF.md's third (1 token) and fourth passes
    1: (GemvTile(8, 8, 4), GemvTile(16, 4, 4)),
    2: (GemvTile(32, 1, 4, 2), GemvTile(32, 2, 4, 2)),
    4: (GemvTile(32, 1, 4, 4), GemvTile(32, 1, 4, 4)),
}
DECODE_ROWS = 64  # up to here a step is bound by the weight bytes
DECODE_TILE = Int4Tile(16, 32, 128, 4, 4)
MIDDLE_TILE = Int4Tile(64, 64, 128, 4, 4)
PREFILL_TILE = Int4Tile(128, 128, 64, 8, 3)
SLAB_TILES = {  # by tokens: the best over the 4B's four projections (PERF.md, fourth pass)
    16: Int4Tile(16, 32, 128, 4, 4),
    32: Int4Tile(32, 128, 128, 4, 2),
    64: Int4Tile(64, 128, 128, 4, 2),
}
SLAB_TOKENS = 3  # from here to DECODE_ROWS the slabs (4 tokens: 77 us, the GEMV's 101; PERF.md)
SLAB_GROUP = 128  # groups this large or larger go through the tile kernel in slabs
DEQUANTIZE_FROM = 16  # from here: dequantize to 16 bits, then the 16-bit GEMM (PERF.md: faster)
MAX_SPLIT_K = 16


@cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter's runs: small shapes, still exercising split-K
    return torch.cuda.get_device_properties(device).multi_processor_count


def tile_for(tokens: int, group: int) -> Int4Tile:
    if slabs_serve(tokens, group):
        return SLAB_TILES[max(16, triton.next_power_of_2(tokens))]
    if tokens <= 16:
        return DECODE_TILE
    return MIDDLE_TILE if tokens <= DECODE_ROWS else PREFILL_TILE


def slabs_serve(tokens: int, group: int) -> bool:
    """Whether the tile kernel takes `tokens` of this group a nibble slab at a time (a dot's K
    is the group's words, at least 16)."""
    return SLAB_TOKENS <= tokens <= DECODE_ROWS and group >= SLAB_GROUP


def gemv_tile(tokens: int, gated: bool) -> GemvTile:
    """The GEMV's tile for this many tokens (`GEMV_TILES`)."""
    return GEMV_TILES[triton.next_power_of_2(tokens)][gated]


def gemv_serves(tokens: int, weight: Tensor | PackedInt4) -> bool:
    """Whether `w4a16_gemv` takes this many tokens of this weight: packed, in groups it serves."""
    return (
        isinstance(weight, PackedInt4)
        and tokens <= GEMV_TOKENS
        and servable_group(weight.group_size)
        and not slabs_serve(tokens, weight.group_size)
    )


def block_depth(preferred: int, depth: int, group: int) -> int:
    """The widest reduction step (at most `preferred`) inside one group that divides K."""
    block = math.gcd(preferred, group, depth)
    if block < 16:
        raise ValueError(f"4-bit width {depth}, group {group}: no reduction block of 16 or more")
    return block


def split_k(programs: int, steps: int, device: torch.device) -> int:
    """Slices of K so that about two programs per SM read weights (a decode step's output
    alone may have only a few dozen column blocks); a power of two dividing the K steps."""
    split = 1
    target = 2 * _multiprocessors(device)
    while programs * split < target and steps % (2 * split) == 0 and split < MAX_SPLIT_K:
        split *= 2
    return split


def w4a16_linear(x: Tensor, weight: PackedInt4, tile: Int4Tile | GemvTile | None = None) -> Tensor:
    """x [M, K] @ dequantize(weight).T -> [M, N] in x's dtype: the GEMV for a few tokens, the
    tile kernel (in slabs up to DECODE_ROWS where they serve, else up to DEQUANTIZE_FROM), then
    a dequantized copy and the 16-bit GEMM. `tile` forces a kernel (the benchmark's sweeps)."""
    m, group = x.shape[0], weight.group_size
    if isinstance(tile, GemvTile) or (tile is None and gemv_serves(m, weight)):
        return w4a16_gemv(x, weight, tile=tile)
    dequantize = m >= DEQUANTIZE_FROM and x.is_cuda and not slabs_serve(m, group)
    if tile is None and dequantize:
        return torch.nn.functional.linear(x, dequantized(weight, x.dtype))
    return _tiled(x, weight, tile or tile_for(m, group))


def dequantized(weight: PackedInt4, dtype: torch.dtype) -> Tensor:
    """[..., N, K] in `dtype`, bit for bit `replica.ops.packed.dequantize`, in one kernel:
    a prefill's 16-bit copy of a weight (reading 0.5 bytes and writing 2 a weight costs a few
    percent of a GEMM of a few thousand tokens)."""
    depth = weight.shape[-1]
    rows = weight.qweight.numel() // (depth // 8)
    out = torch.empty(*weight.shape, dtype=dtype, device=weight.device)
    block_k = block_depth(128, depth, weight.group_size)
    _dequantize_kernel[(triton.cdiv(rows, 32), depth // block_k)](
        *weight.tensors(), out, rows, depth,
        GROUP=weight.group_size, BLOCK_N=32, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return out


def _tiled(x: Tensor, weight: PackedInt4, tile: Int4Tile) -> Tensor:
    m, depth = x.shape
    n = weight.shape[-2]
    if x.stride(-1) != 1:
        x = x.contiguous()
    group = weight.group_size
    slabs = group >= SLAB_GROUP  # the kernel's loop then steps a group at a time
    block_k = group if slabs else block_depth(tile.depth, depth, group)
    grid_n, grid_m = triton.cdiv(n, tile.cols), triton.cdiv(m, tile.rows)
    split = 1 if m > DECODE_ROWS else split_k(grid_n * grid_m, depth // block_k, x.device)
    dtype = x.dtype if split == 1 else torch.float32
    out = torch.empty(split, m, n, dtype=dtype, device=x.device)
    _w4a16_kernel[(grid_n, grid_m, split)](
        x,
        weight.qweight,
        weight.scales,
        weight.zeros,
        out,
        m,
        n,
        depth,
        x.stride(0),
        GROUP=group,
        SPLIT_K=split,
        BLOCK_M=tile.rows,
        BLOCK_N=tile.cols,
        BLOCK_K=block_k,
        SLABS=slabs,
        num_warps=tile.warps,
        num_stages=tile.stages,
    )
    return out[0] if split == 1 else out.sum(0).to(x.dtype)


def w4a16_gemv(
    x: Tensor,
    weight: PackedInt4,
    *,
    experts: Tensor | None = None,
    buckets: tuple[Tensor, Tensor] | None = None,
    x_row_of: int = 1,
    gated: bool = False,
    route: Tensor | None = None,
    tile: GemvTile | None = None,
) -> Tensor:
    """A few tokens through a packed weight (`gemv_serves`), [rows * x_row_of, N] in x's dtype:
    output row r is x row r // `x_row_of` through

    - one matrix, TOKENS rows a program (`gemv_tile`);
    - `experts` [pairs] int32: stacked experts, expert experts[r] (the MoE's pairs, a program
      each);
    - `buckets` (counts [experts], bucket [experts, stride]) int32: the expert whose bucket
      holds r (several pairs an expert, a program an expert reads its matrix once for them);

    `gated`: the weight is [gate; up] and the output SiLU(gate) * up, N half its rows; `route`
    [rows] fp32: each output row scaled by it (the MoE's down projection)."""
    depth = x.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = x.shape[0] * x_row_of
    n = weight.shape[-2] // (2 if gated else 1)
    if experts is not None:  # a program a row
        tile = replace(tile or gemv_tile(1, gated), tokens=1)
        programs = rows
    elif buckets is not None:  # a program an expert, its mean pairs at a time
        programs = buckets[0].numel()
        tile = tile or gemv_tile(min(triton.cdiv(rows, programs), GEMV_TOKENS), gated)
    else:
        tile = tile or gemv_tile(rows, gated)
        programs = triton.cdiv(rows, tile.tokens)
    blocks = triton.cdiv(n, tile.cols)
    fused = gated or route is not None  # their epilogue needs the whole sum
    groups = depth // weight.group_size
    split = 1 if fused else split_k(blocks * programs, groups // tile.groups, x.device)
    out = torch.empty(
        split, rows, n, dtype=x.dtype if split == 1 else torch.float32, device=x.device
    )
    counts, bucket = buckets if buckets is not None else (x, x)
    _w4a16_gemv_kernel[(blocks, split, programs)](
        x,
        *weight.tensors(),
        x if experts is None else experts,
        counts,
        bucket,
        x if route is None else route,
        out,
        rows,
        n,
        depth,
        x.stride(0),
        bucket.stride(0),
        X_ROW_OF=x_row_of,
        GROUP=weight.group_size,
        SPLIT_K=split,
        BLOCK_N=tile.cols,
        GROUPS=tile.groups,
        TOKENS=tile.tokens,
        PER_ROW_EXPERT=experts is not None,
        BUCKETED=buckets is not None,
        GATED=gated,
        ROUTED=route is not None,
        num_warps=tile.warps,
        num_stages=tile.stages,
    )
    return out[0] if split == 1 else out.sum(0).to(x.dtype)
