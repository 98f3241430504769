"""w4a16 matrix multiply on CUDA: bf16 activations times packed 4-bit weights
(replica.model.quantized's layout), dequantized in registers, accumulated in fp32.

`int4_tile` dequantizes one [BLOCK_N, BLOCK_K] tile of weights exactly as the PyTorch oracle
does ((q - zero) * scale in fp32, rounded once), so the weights a dot product sees are the
oracle's bit for bit; the fused-expert kernels (replica.kernels.moe) read their packed experts
through it too. A tile never straddles a quantization group, so it needs one scale and one zero
per output row.

`w4a16_linear` picks a kernel by the token count:
- one token (a batch-1 decode step): `_w4a16_gemv_kernel`, no matrix units. Each program
  reads a block of weight rows one group at a time and takes the group's dot products on the
  4-bit values themselves, q . x, scaling once per group: sum((q - z) s x) = s (q . x - z sum(x)).
  So a weight costs a shift, a mask, a float trick and one fma, nothing else: the step is bound
  by the 4-bit bytes, not by dequantizing or by the layout shuffles a matrix-unit tile needs;
- up to 64 rows: the tile kernel with thin column blocks (16 rows of the matrix unit's tile); both decode kernels split K when the
  output has too few blocks to keep every SM reading (each program reduces a slice of K, and the
  fp32 partial sums are added in a fixed order: deterministic);
- prefill: wide 128 x 128 tiles, compute-bound like a 16-bit GEMM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from replica.model.quantized import PackedInt4


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
    """Weights [BLOCK_N, BLOCK_K] (output row, input column) in `dtype`, read row-major so that
    neighbouring threads read neighbouring words.

    Arithmetic per weight, cheap on purpose (a decode step must dequantize as fast as it reads):
    the nibble or'ed into the mantissa of 2^23 is 2^23 + q as a float (no int-to-float
    conversion), minus 2^23 is q exactly, and one fma q * scale - zero * scale gives (q - zero) *
    scale exactly in fp32 (every product has at most 15 significant bits), rounded once."""
    words = tl.load(
        qweight_ptr + rows[:, None] * (depth // 8) + (k // 8 + tl.arange(0, BLOCK_K // 8))[None, :],
        mask=row_live[:, None],
        other=0,
    )
    shifts = tl.arange(0, 8) * 4
    nibbles = ((words[:, :, None] >> shifts[None, None, :]) & 0xF) | 0x4B000000
    q = tl.reshape(nibbles.to(tl.float32, bitcast=True), (BLOCK_N, BLOCK_K)) - 8388608.0
    group = rows * (depth // GROUP) + k // GROUP
    scale = tl.load(scales_ptr + group, mask=row_live, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + group, mask=row_live, other=0.0).to(tl.float32)
    return (q * scale[:, None] - (zero * scale)[:, None]).to(dtype)


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
):
    tokens = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    token_live, row_live = tokens < m, rows < n
    dtype = x_ptr.dtype.element_ty
    span = depth // SPLIT_K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(split * span, (split + 1) * span, BLOCK_K):
        x = tl.load(
            x_ptr + tokens[:, None] * stride_x + k + tl.arange(0, BLOCK_K)[None, :],
            mask=token_live[:, None],
            other=0.0,
        )
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
def _w4a16_gemv_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    out_ptr,  # [SPLIT_K, 1, N] fp32 partial sums, or [1, N] in x's dtype when SPLIT_K is 1
    n,
    depth,
    GROUP: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One token: out[r] = sum over words w of s[r, g] * (q[r, w] . x[w] - z[r, g] * sum(x[w]))
    where word w holds columns 8 w .. 8 w + 7 (nibble j is column 8 w + j), all in group g."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    row_live = rows < n
    words_per_step: tl.constexpr = BLOCK_K // 8
    word = tl.arange(0, words_per_step)
    span = depth // SPLIT_K
    acc = tl.zeros([BLOCK_N, words_per_step], dtype=tl.float32)
    for k in range(split * span, (split + 1) * span, BLOCK_K):
        words = tl.load(
            qweight_ptr + rows[:, None] * (depth // 8) + (k // 8 + word)[None, :],
            mask=row_live[:, None],
            other=0,
        )
        dots = tl.zeros([BLOCK_N, words_per_step], dtype=tl.float32)
        x_sum = tl.zeros([words_per_step], dtype=tl.float32)
        for j in tl.static_range(8):
            nibble = ((words >> (4 * j)) & 0xF) | 0x4B000000  # 2^23 + q as a float's bits
            q = nibble.to(tl.float32, bitcast=True) - 8388608.0
            x = tl.load(x_ptr + k + j + 8 * word).to(tl.float32)
            dots += q * x[None, :]
            x_sum += x
        group = rows[:, None] * (depth // GROUP) + ((k + 8 * word) // GROUP)[None, :]
        scale = tl.load(scales_ptr + group, mask=row_live[:, None], other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + group, mask=row_live[:, None], other=0.0).to(tl.float32)
        acc += scale * (dots - zero * x_sum[None, :])
    total = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        tl.store(out_ptr + rows, total.to(x_ptr.dtype.element_ty), mask=row_live)
    else:
        tl.store(out_ptr + split * n + rows, total, mask=row_live)


@dataclass(frozen=True)
class Int4Tile:
    rows: int  # tokens
    cols: int  # output features
    depth: int  # input columns per step
    warps: int
    stages: int


DECODE_ROWS = 64  # up to here a step is bound by the weight bytes
# One token: 8 weight rows a program, K in blocks of up to 1,024 (spanning groups), 2 warps. The
# fastest of 18 tiles over the 4B's four projections in CUDA graphs on an H200: 60.7 us for the
# four against bf16's 61.4 (docs/perf/int4-h200/gemv-tiles-in-graph.json).
GEMV_TILE = Int4Tile(1, 8, 1024, 2, 3)
DECODE_TILE = Int4Tile(16, 32, 128, 4, 4)
MIDDLE_TILE = Int4Tile(64, 64, 128, 4, 4)
PREFILL_TILE = Int4Tile(128, 128, 64, 8, 3)
MAX_SPLIT_K = 16


@cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter's runs: small shapes, still exercising split-K
    return torch.cuda.get_device_properties(device).multi_processor_count


def tile_for(tokens: int) -> Int4Tile:
    if tokens == 1:
        return GEMV_TILE
    if tokens <= 16:
        return DECODE_TILE
    return MIDDLE_TILE if tokens <= DECODE_ROWS else PREFILL_TILE


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


def w4a16_linear(x: Tensor, weight: PackedInt4, tile: Int4Tile | None = None) -> Tensor:
    """x [M, K] @ dequantize(weight).T -> [M, N] in x's dtype. `tile` overrides `tile_for`
    (a tile of one row runs the GEMV kernel)."""
    m, depth = x.shape
    n = weight.shape[-2]
    tile = tile or tile_for(m)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if tile.rows == 1 and m == 1:
        return _gemv(x, weight, tile)
    block_k = block_depth(tile.depth, depth, weight.group_size)
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
        GROUP=weight.group_size,
        SPLIT_K=split,
        BLOCK_M=tile.rows,
        BLOCK_N=tile.cols,
        BLOCK_K=block_k,
        num_warps=tile.warps,
        num_stages=tile.stages,
    )
    return out[0] if split == 1 else out.sum(0).to(x.dtype)


def _gemv(x: Tensor, weight: PackedInt4, tile: Int4Tile) -> Tensor:
    depth, n = x.shape[1], weight.shape[-2]
    block_k = math.gcd(tile.depth, depth)  # may span groups: each word lies in one
    grid_n = triton.cdiv(n, tile.cols)
    split = split_k(grid_n, depth // block_k, x.device)
    out = torch.empty(split, 1, n, dtype=x.dtype if split == 1 else torch.float32, device=x.device)
    _w4a16_gemv_kernel[(grid_n, split)](
        x,
        weight.qweight,
        weight.scales,
        weight.zeros,
        out,
        n,
        depth,
        GROUP=weight.group_size,
        SPLIT_K=split,
        BLOCK_N=tile.cols,
        BLOCK_K=block_k,
        num_warps=tile.warps,
        num_stages=tile.stages,
    )
    return out[0] if split == 1 else out.sum(0).to(x.dtype)
