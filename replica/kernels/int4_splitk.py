"""The split-K w4a16 tile on CUDA, for the middle batches (about 8 to 64 tokens): tokens [M, K]
times a packed 4-bit weight [N, K] (groups of 128 or more) with matrix units.

- Tokens on the MMA's N side ("swap A/B"): a program computes out.T [BLOCK_N, BLOCK_M] =
  w [BLOCK_N, W] @ x.T, so a few tokens pad only to 16 while the weight fills the MMA's M side,
  and the dequantized weight goes into the dot in the layout it was loaded in (no transpose).
- Weights read a group's W = group / 8 words a feature at once: in our layout those are
  contiguous (64 bytes for groups of 128), so each thread loads 16 bytes at a time; no reorder
  at load is needed.
- Nibbles to floats without a shift-and-convert chain: (word >> 4p) & 0x000F000F | 0x43004300
  is two bf16 values 128 + q (nibbles p and p + 4), each an fp32 by one shift or mask. One fma
  (128 + q) s - (128 + z) s is (q - z) s exactly in fp32 for 16-bit scales (the oracle's
  weight, rounded once). Nibble p of a group's word w is its column pW + w, so nibbles p and
  p + 4 are two slabs of W contiguous columns: a dot of K = W each.
- K split so that the grid holds at least two programs per multiprocessor (a 4B projection
  has 20 to 80 feature blocks); the split of a tile that finishes last adds the fp32 partial
  sums in a fixed order (deterministic) and writes the output: no kernels after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from replica.kernels.elementwise import rounded_silu_mul
from replica.kernels.int4_dequantize import Int4Weight
from replica.kernels.int4_ptx import packed_math, ptx_slabs
from replica.kernels.launch import multiprocessors

MIN_GROUP = 128  # W = 16 words: the smallest K of a bf16 dot


@dataclass(frozen=True)
class SplitKTile:
    tokens: int  # BLOCK_M, 16 or more (the MMA's N side)
    features: int  # BLOCK_N
    warps: int
    stages: int
    waves: int = 2  # programs a multiprocessor the split aims for (0: K never split)
    ptx: bool = False  # nibbles to weights in packed 16-bit PTX (replica.kernels.int4_ptx)
    two_groups: bool = False  # span_dots' TWO: two groups a loop step (where K has an even count)
    tokens_on_m: bool = False  # group_dots' ON_M: tokens on the MMA's M side, one dot a group


@triton.jit
def bf16_pair(words, p: tl.constexpr):
    """Nibbles p and p + 4 of each word as two bf16 values 128 + q in its halves (q in the
    mantissa): (word >> 4p) & 0x000F000F | 0x43004300."""
    return ((words >> (4 * p)) & 0x000F000F) | 0x43004300


@triton.jit
def nibble_pair(words, p: tl.constexpr):
    """Nibbles p and p + 4 of each word as fp32 128 + q: each half of bf16_pair a float by a
    shift or a mask."""
    pair = bf16_pair(words, p)
    return (pair << 16).to(tl.float32, bitcast=True), (pair & -65536).to(tl.float32, bitcast=True)


@triton.jit
def group_scales(scales_ptr, zeros_ptr, features, feature_live, g, depth, GROUP: tl.constexpr):
    """Group g's scales and zero points (fp32) of rows `features`, as [BLOCK_N, 1] columns."""
    group = features * (depth // GROUP) + g
    scale = tl.load(scales_ptr + group, mask=feature_live, other=0.0)[:, None]
    zero = tl.load(zeros_ptr + group, mask=feature_live, other=0.0).to(tl.float32)[:, None]
    return scale, zero


@triton.jit
def span_dots(
    acc, x_ptr, stride_x, tokens, token_live, qweight_ptr, scales_ptr, zeros_ptr, features,
    feature_live, g_lo, g_hi, depth, GROUP: tl.constexpr, PTX: tl.constexpr, TWO: tl.constexpr,
    ON_M: tl.constexpr,
):  # fmt: skip
    """acc plus groups g_lo..g_hi-1's products (group_dots; ON_M as there). Triton pipelines
    the words and x through shared memory but not the 2-byte scales and zeros (cp.async moves 4
    bytes or more), so each group's weights wait for their loads. TWO: two groups a step, both groups' scales and zeros
    loaded at its start, one wait for the two (g_hi - g_lo even; the same sums in the same
    order, twice the shared memory). Carrying them a step ahead in registers instead makes
    Triton round-trip every weight through shared memory (their layouts differ)."""
    for g in range(g_lo, g_hi, 1 + TWO):
        scale, zero = group_scales(scales_ptr, zeros_ptr, features, feature_live, g, depth, GROUP)
        if TWO:
            next_scale, next_zero = group_scales(
                scales_ptr, zeros_ptr, features, feature_live, g + 1, depth, GROUP
            )
        acc = group_dots(
            acc, x_ptr, stride_x, tokens, token_live, qweight_ptr, features, feature_live,
            scale, zero, g, depth, GROUP, PTX, ON_M,
        )  # fmt: skip
        if TWO:
            acc = group_dots(
                acc, x_ptr, stride_x, tokens, token_live, qweight_ptr, features, feature_live,
                next_scale, next_zero, g + 1, depth, GROUP, PTX, ON_M,
            )  # fmt: skip
    return acc


@triton.jit
def group_dots(
    acc, x_ptr, stride_x, tokens, token_live, qweight_ptr, features, feature_live, scale, zero,
    g, depth, GROUP: tl.constexpr, PTX: tl.constexpr, ON_M: tl.constexpr,
):  # fmt: skip
    """acc plus group g's product, with the group's `scale` and `zero` (group_scales); PTX: the
    weights made by int4_ptx.ptx_slabs.

    acc [BLOCK_N, BLOCK_M] plus out.T, tokens on the MMA's N side: 8 slabs of W columns, one
    dot each, the weights in registers. Triton waits for each such dot before the next.

    ON_M: acc [BLOCK_M, BLOCK_N] plus out, tokens on the M side: the 8 slabs concatenated into
    one [BLOCK_N, GROUP] operand and x read in their column order, one dot of K = GROUP. Triton
    stores the weights to shared memory for it and chains its k-steps without waits between."""
    words_per_group: tl.constexpr = GROUP // 8
    word = tl.arange(0, words_per_group)
    # K is whole groups of 16 or more words: rows start 64-byte aligned, 16-byte loads
    row_words = tl.multiple_of(depth // 8, words_per_group)
    words = tl.load(
        qweight_ptr + features[:, None] * row_words + g * words_per_group + word[None, :],
        mask=feature_live[:, None],
        other=0,
    )
    if ON_M:
        acc += _whole_group_dot(
            words, scale, zero, x_ptr, stride_x, tokens, token_live, g, GROUP, PTX
        )
    else:
        acc = _slab_dots(
            acc, words, scale, zero, x_ptr, stride_x, tokens, token_live, g, GROUP, PTX
        )
    return acc


@triton.jit
def _slab_dots(
    acc, words, scale, zero, x_ptr, stride_x, tokens, token_live, g, GROUP: tl.constexpr,
    PTX: tl.constexpr,
):  # fmt: skip
    """acc [BLOCK_N, BLOCK_M] plus the group's out.T, a dot a slab."""
    words_per_group: tl.constexpr = GROUP // 8
    word = tl.arange(0, words_per_group)
    dtype = x_ptr.dtype.element_ty
    x_group = x_ptr + tokens[None, :] * stride_x + g * GROUP + word[:, None]  # [W, BLOCK_M]
    if PTX:
        slabs = ptx_slabs(words, scale, zero, dtype)
    for p in tl.static_range(4):
        if PTX:
            low, high = slabs[2 * p], slabs[2 * p + 1]
        else:
            low, high = _slab_weights(words, scale, zero, p, dtype)
        x_low = tl.load(x_group + p * words_per_group, mask=token_live[None, :], other=0.0)
        x_high = tl.load(x_group + (p + 4) * words_per_group, mask=token_live[None, :], other=0.0)
        acc += tl.dot(low, x_low)
        acc += tl.dot(high, x_high)
    return acc


@triton.jit
def _whole_group_dot(
    words, scale, zero, x_ptr, stride_x, tokens, token_live, g, GROUP: tl.constexpr,
    PTX: tl.constexpr,
):  # fmt: skip
    """x [BLOCK_M, GROUP] @ the group's weights [BLOCK_N, GROUP].T in one dot. The slabs come
    in nibble order 0, 4, 1, 5, 2, 6, 3, 7 (slab i holds nibble i // 2 + 4 (i % 2), its column
    j the group's column nibble * W + j), concatenated in that order, so column c of the
    operand is slab c // W's column c % W: x is read at those columns, 32 contiguous bytes a
    slab."""
    words_per_group: tl.constexpr = GROUP // 8
    dtype = x_ptr.dtype.element_ty
    if PTX:
        s = ptx_slabs(words, scale, zero, dtype)
    else:
        s0, s1 = _slab_weights(words, scale, zero, 0, dtype)
        s2, s3 = _slab_weights(words, scale, zero, 1, dtype)
        s4, s5 = _slab_weights(words, scale, zero, 2, dtype)
        s6, s7 = _slab_weights(words, scale, zero, 3, dtype)
        s = (s0, s1, s2, s3, s4, s5, s6, s7)
    low = _concat(_concat(s[0], s[1]), _concat(s[2], s[3]))
    weights = _concat(low, _concat(_concat(s[4], s[5]), _concat(s[6], s[7])))
    c = tl.arange(0, GROUP)
    slab = c // words_per_group
    columns = (slab // 2 + 4 * (slab % 2)) * words_per_group + c % words_per_group
    x = tl.load(
        x_ptr + tokens[:, None] * stride_x + g * GROUP + columns[None, :],
        mask=token_live[:, None],
        other=0.0,
    )
    return tl.dot(x, tl.trans(weights))


@triton.jit
def _concat(a, b):
    """[N, 2K]: a's columns, then b's ([N, K] each)."""
    pair = tl.permute(tl.join(a, b), (0, 2, 1))  # [N, 2, K]
    return tl.reshape(pair, [a.shape[0], 2 * a.shape[1]])


@triton.jit
def _slab_weights(words, scale, zero, p: tl.constexpr, dtype: tl.constexpr):
    """Slabs p and p + 4 of a group as `dtype` weights [N, W]: (128 + q) s - (128 + z) s in
    fp32, exactly (q - z) s for 16-bit scales, rounded once."""
    scale = scale.to(tl.float32)
    offset = scale * (zero + 128.0)
    low, high = nibble_pair(words, p)  # 128 + nibble p, 128 + nibble p + 4
    return (low * scale - offset).to(dtype), (high * scale - offset).to(dtype)


@triton.jit
def _splitk_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    out_ptr,  # [M, N] in x's dtype
    partial_ptr,  # SPLIT_K > 1: [SPLIT_K, M, N] fp32
    counts_ptr,  # SPLIT_K > 1: [tiles] int32 zeros, splits of each tile done
    m,
    n,
    depth,
    stride_x,
    span,  # groups a split
    GROUP: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PTX: tl.constexpr,
    GATED: tl.constexpr,  # rows [gate; up], n the gate's: SiLU(gate) * up (K whole)
    TWO_GROUPS: tl.constexpr,  # span_dots' TWO (not with GATED); span and K's groups even
    TOKENS_ON_M: tl.constexpr,  # group_dots' ON_M (not with GATED)
):
    features = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    tokens = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    token_live, feature_live = tokens < m, features < n
    g_lo = split * span
    g_hi = tl.minimum(g_lo + span, depth // GROUP)
    if TOKENS_ON_M:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # out
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # out.T
    if GATED:  # gate and up rows in one loop: each group's x loaded once for both
        up = acc
        for g in range(g_lo, g_hi):
            scale, zero = group_scales(
                scales_ptr, zeros_ptr, features, feature_live, g, depth, GROUP
            )
            acc = group_dots(
                acc, x_ptr, stride_x, tokens, token_live, qweight_ptr, features, feature_live,
                scale, zero, g, depth, GROUP, PTX, False,
            )  # fmt: skip
            scale, zero = group_scales(
                scales_ptr, zeros_ptr, features + n, feature_live, g, depth, GROUP
            )
            up = group_dots(
                up, x_ptr, stride_x, tokens, token_live, qweight_ptr, features + n,
                feature_live, scale, zero, g, depth, GROUP, PTX, False,
            )  # fmt: skip
        acc = rounded_silu_mul(acc, up, x_ptr.dtype.element_ty)
    else:
        acc = span_dots(
            acc, x_ptr, stride_x, tokens, token_live, qweight_ptr, scales_ptr, zeros_ptr,
            features, feature_live, g_lo, g_hi, depth, GROUP, PTX, TWO_GROUPS, TOKENS_ON_M,
        )  # fmt: skip
    at = tokens[None, :] * n + features[:, None]
    live = feature_live[:, None] & token_live[None, :]
    if TOKENS_ON_M:
        at = tokens[:, None] * n + features[None, :]
        live = token_live[:, None] & feature_live[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + at, acc.to(x_ptr.dtype.element_ty), mask=live)
    else:
        tl.store(partial_ptr + split * m * n + at, acc, mask=live)
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        sum_if_last(partial_ptr, out_ptr, counts_ptr, tile, m * n, at, live, SPLIT_K)


@triton.jit
def sum_if_last(partial_ptr, out_ptr, counts_ptr, tile, size, at, live, SPLIT_K: tl.constexpr):
    """CUTLASS's serial split-K, once every split of `tile` stored its fp32 partial at
    partial_ptr + split * size + at: the split that finishes last adds them all in order
    (deterministic) and writes the output, instead of two more kernels."""
    tl.debug_barrier()  # every thread's partial stored before the count says so
    if tl.atomic_add(counts_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
        total = tl.zeros(at.shape, tl.float32)
        for s in tl.static_range(SPLIT_K):  # past L1: other multiprocessors wrote them
            total += tl.load(
                partial_ptr + s * size + at, mask=live, other=0.0, cache_modifier=".cg"
            )
        tl.store(out_ptr + at, total.to(out_ptr.dtype.element_ty), mask=live)


def splits(programs: int, groups: int, waves: int, device: torch.device) -> int:
    """Slices of K (any count, the last may be shorter) so that programs * splits reaches
    `waves` programs a multiprocessor, no slice empty."""
    wanted = triton.cdiv(waves * multiprocessors(device), programs)
    split = max(1, min(wanted, groups))
    return triton.cdiv(groups, triton.cdiv(groups, split))  # every slice non-empty


def w4a16_splitk(x: Tensor, weight: Int4Weight, tile: SplitKTile, gated: bool = False) -> Tensor:
    """x [M, K] @ dequantize(weight).T -> [M, N] in x's dtype (groups of MIN_GROUP or more);
    `gated`: the weight is [gate; up] and the output SiLU(gate) * up, N half its rows (K then
    never split: the epilogue needs the whole sums)."""
    m, depth = x.shape
    n, group = weight.shape[-2] // (2 if gated else 1), weight.group_size
    if group < MIN_GROUP:
        raise ValueError(f"group {group}: the split-K tile needs groups of {MIN_GROUP} or more")
    if x.stride(-1) != 1:
        x = x.contiguous()
    groups = depth // group
    grid_n, grid_m = triton.cdiv(n, tile.features), triton.cdiv(m, tile.tokens)
    split = 1 if gated else splits(grid_n * grid_m, groups, tile.waves, x.device)
    two = tile.two_groups and not gated and groups % 2 == 0
    span = triton.cdiv(groups, split)
    if two:  # every slice an even count of groups
        span += span % 2
        split = triton.cdiv(groups, span)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    partials, counts = out, out  # unused unless K is split
    if split > 1:
        partials = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        counts = torch.zeros(grid_n * grid_m, dtype=torch.int32, device=x.device)
    _splitk_kernel[(grid_n, grid_m, split)](
        x, weight.qweight, weight.scales, weight.zeros, out, partials, counts, m, n, depth,
        x.stride(0), span, GROUP=group, SPLIT_K=split, BLOCK_M=tile.tokens,
        BLOCK_N=tile.features, PTX=tile.ptx and packed_math(x, weight), GATED=gated,
        TWO_GROUPS=two, TOKENS_ON_M=tile.tokens_on_m and not gated,
        num_warps=tile.warps, num_stages=tile.stages,
    )  # fmt: skip
    return out
