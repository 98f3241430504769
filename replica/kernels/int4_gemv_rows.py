"""The one-token w4a16 GEMV's sums (replica.kernels.int4_gemv runs them): a GEMV is bound by its
instructions (PERF.md, issue 36), so a program's rows form four sets that share every load,
conversion and sum of x, and each word's high nibbles are read from the bf16 pair whole.
"""

from __future__ import annotations

import triton
import triton.language as tl

from replica.kernels.int4_splitk import bf16_pair

# _one_token_nibbles' C + q: the bf16 pair's 128 + q, and 0x4300 / 2^16 in the bits below it
ONE_TOKEN_C: tl.constexpr = tl.constexpr(128.0 + 0x4300 / 65536)


@triton.jit
def group_loads(
    qweight_ptr, scales_ptr, zeros_ptr, rows, live, g, depth, GROUP: tl.constexpr
):  # fmt: skip
    """Rows `rows` [1, N, 1, 1] of groups g [1, 1, G, 1], masked by `live`: their words
    [1, N, G, W], scales and zeros [1, N, G, 1] as stored."""
    words_per_group: tl.constexpr = GROUP // 8
    word = tl.arange(0, words_per_group)[None, None, None, :]
    groups = depth // GROUP
    row_words = tl.multiple_of(depth // 8, words_per_group)  # K is whole groups: 16-byte loads
    words = tl.load(qweight_ptr + rows * row_words + g * words_per_group + word, live, other=0)
    scale = tl.load(scales_ptr + rows * groups + g, mask=live, other=0.0)
    zero = tl.load(zeros_ptr + rows * groups + g, mask=live, other=0.0)
    return words, scale, zero


@triton.jit
def scaled(loaded, C: tl.constexpr):
    """group_loads' (words, scale, zero) as words, scale and (C + zero) * scale in fp32 (exact
    for 16-bit scales: C + zero has at most 16 significant bits)."""
    words, scale, zero = loaded
    scale = scale.to(tl.float32)
    return words, scale, scale * (zero.to(tl.float32) + C)


@triton.jit
def group_words(
    qweight_ptr, scales_ptr, zeros_ptr, rows, live, g, depth, GROUP: tl.constexpr,
    C: tl.constexpr,
):  # fmt: skip
    """group_loads, scaled."""
    return scaled(group_loads(qweight_ptr, scales_ptr, zeros_ptr, rows, live, g, depth, GROUP), C)


@triton.jit
def _one_token_nibbles(words, p: tl.constexpr):
    """Nibbles p and p + 4 of each word as fp32 C + q (C = 128 + 0x4300 / 2^16), the second up to
    q_p / 2^16 over: the bf16 pair (int4_splitk.bf16_pair) read whole as an fp32 is
    C + q_{p+4} with q_p in its lowest mantissa bits, and the pair times 2^16 plus 0x4300 (one
    integer multiply-add) is C + q_p: one instruction a pair instead of a shift and a mask."""
    pair = bf16_pair(words, p)
    return (pair * 65536 + 0x4300).to(tl.float32, bitcast=True), pair.to(tl.float32, bitcast=True)


@triton.jit
def _codes(codes, words, p: tl.constexpr, x_low, x_high):
    low, high = _one_token_nibbles(words, p)
    codes += low * x_low
    codes += high * x_high
    return codes


@triton.jit
def _set_loads(
    qweight_ptr, scales_ptr, zeros_ptr, rows, live, groups_live, g, depth, GROUP: tl.constexpr
):  # fmt: skip
    """group_loads of one set of rows [BLOCK] (live [BLOCK])."""
    return group_loads(
        qweight_ptr, scales_ptr, zeros_ptr, rows[None, :, None, None],
        live[None, :, None, None] & groups_live, g, depth, GROUP,
    )  # fmt: skip


@triton.jit
def _step_loads(
    qweight_ptr, scales_ptr, zeros_ptr, rows_a, rows_b, rows_c, rows_d, live_a, live_b, live_c,
    live_d, g0, g_hi, depth, GROUP: tl.constexpr, GROUPS: tl.constexpr,
):  # fmt: skip
    """The four sets' group_loads for the loop step at group g0 (groups from g_hi on masked
    off: no memory read)."""
    g = g0 + tl.arange(0, GROUPS)[None, None, :, None]
    groups_live = g < g_hi
    return (
        _set_loads(qweight_ptr, scales_ptr, zeros_ptr, rows_a, live_a, groups_live, g, depth, GROUP),
        _set_loads(qweight_ptr, scales_ptr, zeros_ptr, rows_b, live_b, groups_live, g, depth, GROUP),
        _set_loads(qweight_ptr, scales_ptr, zeros_ptr, rows_c, live_c, groups_live, g, depth, GROUP),
        _set_loads(qweight_ptr, scales_ptr, zeros_ptr, rows_d, live_d, groups_live, g, depth, GROUP),
    )  # fmt: skip


@triton.jit
def _step_sums(accs, loads, x_at, x_mask, GROUP: tl.constexpr):
    """The four sets' accumulators plus one loop step's sums, `loads` the step's _step_loads,
    `x_at` x's pointers for its groups: s sum((C + q) x) - (C + z) s sum(x) each."""
    words_per_group: tl.constexpr = GROUP // 8
    words_a, scale_a, offset_a = scaled(loads[0], ONE_TOKEN_C)
    words_b, scale_b, offset_b = scaled(loads[1], ONE_TOKEN_C)
    words_c, scale_c, offset_c = scaled(loads[2], ONE_TOKEN_C)
    words_d, scale_d, offset_d = scaled(loads[3], ONE_TOKEN_C)
    codes_a, codes_b = tl.zeros_like(accs[0]), tl.zeros_like(accs[0])
    codes_c, codes_d = tl.zeros_like(accs[0]), tl.zeros_like(accs[0])
    x_sum = tl.zeros_like(accs[0])
    for p in tl.static_range(4):
        x_low = tl.load(x_at + p * words_per_group, mask=x_mask, other=0.0).to(tl.float32)
        x_high = tl.load(x_at + (p + 4) * words_per_group, mask=x_mask, other=0.0)
        x_high = x_high.to(tl.float32)
        x_sum += x_low
        x_sum += x_high
        codes_a = _codes(codes_a, words_a, p, x_low, x_high)
        codes_b = _codes(codes_b, words_b, p, x_low, x_high)
        codes_c = _codes(codes_c, words_c, p, x_low, x_high)
        codes_d = _codes(codes_d, words_d, p, x_low, x_high)
    return (
        accs[0] + (scale_a * codes_a - offset_a * x_sum),
        accs[1] + (scale_b * codes_b - offset_b * x_sum),
        accs[2] + (scale_c * codes_c - offset_c * x_sum),
        accs[3] + (scale_d * codes_d - offset_d * x_sum),
    )


@triton.jit
def _gemv_rows4(
    qweight_ptr, scales_ptr, zeros_ptr, rows_a, rows_b, rows_c, rows_d, live_a, live_b, live_c,
    live_d, x_token, x_live, depth, g_lo, g_hi, GROUP: tl.constexpr, BLOCK: tl.constexpr,
    GROUPS: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    """One token through four sets of BLOCK weight rows (int64, experts' offsets included),
    groups g_lo..g_hi - 1: four [1, BLOCK] fp32. The sets share every load, conversion and sum
    of x, the work a weight does not own (a GEMV is bound by its instructions, PERF.md).
    PREFETCH: each step's weights are loaded during the step before (a short loop otherwise
    waits out the memory's latency at every step).

    Each sums (C + q) x and scales once a word: s sum((C + q) x) - (C + z) s sum(x) is
    sum((q - z) s x), an fma a weight (_one_token_nibbles: within q_p s / 2^16 a weight, where
    a bf16 weight rounds by up to 2^-9 of itself). Nibble j of a group's word w is column jW + w (our
    layout), so x is read as 8 slabs [groups, words], in the words' own layout (x's pointers
    broadcast over the rows: no layout conversion)."""
    words_per_group: tl.constexpr = GROUP // 8
    group = tl.arange(0, GROUPS)[None, None, :, None]
    word = tl.arange(0, words_per_group)[None, None, None, :]
    x_cols = x_token[:, None, None, None] + word + rows_a[None, :, None, None] * 0
    zero = tl.zeros([1, BLOCK, GROUPS, words_per_group], dtype=tl.float32)
    accs = (zero, zero, zero, zero)
    if PREFETCH:
        ahead = _step_loads(
            qweight_ptr, scales_ptr, zeros_ptr, rows_a, rows_b, rows_c, rows_d, live_a, live_b,
            live_c, live_d, g_lo, g_hi, depth, GROUP, GROUPS,
        )  # fmt: skip
    for g0 in range(g_lo, g_hi, GROUPS):
        if PREFETCH:
            loads = ahead
            ahead = _step_loads(
                qweight_ptr, scales_ptr, zeros_ptr, rows_a, rows_b, rows_c, rows_d, live_a,
                live_b, live_c, live_d, g0 + GROUPS, g_hi, depth, GROUP, GROUPS,
            )  # fmt: skip
        else:
            loads = _step_loads(
                qweight_ptr, scales_ptr, zeros_ptr, rows_a, rows_b, rows_c, rows_d, live_a,
                live_b, live_c, live_d, g0, g_hi, depth, GROUP, GROUPS,
            )  # fmt: skip
        g = g0 + group
        x_mask = (g < g_hi) & x_live[:, None, None, None]
        accs = _step_sums(accs, loads, x_cols + g * GROUP, x_mask, GROUP)
    return (
        tl.sum(tl.sum(accs[0], axis=3), axis=2), tl.sum(tl.sum(accs[1], axis=3), axis=2),
        tl.sum(tl.sum(accs[2], axis=3), axis=2), tl.sum(tl.sum(accs[3], axis=3), axis=2),
    )  # fmt: skip


@triton.jit
def _halves(v):
    """v[0::2], v[1::2] of a [BLOCK] vector."""
    return tl.split(tl.reshape(v, [v.shape[0] // 2, 2]))


@triton.jit
def _interleaved(even, odd):
    """[1, 2 BLOCK] of two [1, BLOCK]: _halves undone."""
    return tl.reshape(tl.join(even, odd), [1, 2 * even.shape[1]])


@triton.jit
def one_token(
    qweight_ptr, scales_ptr, zeros_ptr, features, cols, n, x_token, live, depth, g_lo, g_hi,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, GATED: tl.constexpr,
    PREFETCH: tl.constexpr,
):  # fmt: skip
    """One token through weight rows `features` (columns `cols`, those under n live): [1, BLOCK_N]
    fp32, and GATED the up rows' too (features + n); else the first again. The rows form four
    sets that share x (_gemv_rows4): gate and up each even and odd, or rows 4i + 0..3."""
    even, odd = _halves(features)
    even_cols, odd_cols = _halves(cols)
    if GATED:
        a, b, c, d = even, odd, even + n, odd + n
        cols_a, cols_b, cols_c, cols_d = even_cols, odd_cols, even_cols, odd_cols
    else:
        a, c = _halves(even)
        b, d = _halves(odd)
        cols_a, cols_c = _halves(even_cols)
        cols_b, cols_d = _halves(odd_cols)
    block: tl.constexpr = BLOCK_N // (2 if GATED else 4)
    out_a, out_b, out_c, out_d = _gemv_rows4(
        qweight_ptr, scales_ptr, zeros_ptr, a, b, c, d, cols_a < n, cols_b < n, cols_c < n,
        cols_d < n, x_token, live, depth, g_lo, g_hi, GROUP, block, GROUPS, PREFETCH,
    )  # fmt: skip
    if GATED:
        total, up = _interleaved(out_a, out_b), _interleaved(out_c, out_d)
    else:
        total = _interleaved(_interleaved(out_a, out_c), _interleaved(out_b, out_d))
        up = total
    return total, up
