"""The tiles benchmarks.bench_int4_v2's sweeps time beside the served tables (replica.ops.tables),
and the calls that run them: what a table entry could become, each measured before it is
served."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch

from benchmarks.int4_names import gemv_name, tile_name
from replica.kernels.int4_gemv import GemvTile, w4a16_gemv
from replica.kernels.int4_splitk import SplitKTile, w4a16_splitk
from replica.kernels.launch import arch
from replica.kernels.moe_fused import FusedTile
from replica.ops import tables
from replica.ops.packed import PackedInt4


def splitk_tiles(tokens: int) -> list[SplitKTile]:
    """The split-K tiles worth timing at this many tokens: BLOCK_M the tokens rounded up; 4 warps
    aiming at 2 programs a multiprocessor, and 2 warps. On a Hopper 4 warps make a warp group:
    Triton then issues wgmma, and waits for each of a group's eight dots before the next (SASS:
    WARPGROUP.DEPBAR.LE gsb0, 0x0), where 2 warps issue the A100's mma.sync without waits; the
    H100 still ran 2 warps slower nearly everywhere (PERF.md, issue 36's seventh session), and
    they stay in the sweep for the A100. 8 warps and a K split aiming at 4 programs a
    multiprocessor measured slower at every size in the fifth. Each also with its weights made
    in packed 16-bit PTX (replica.kernels.int4_ptx); and the PTX tiles of 64 and 128 features
    two groups a loop step (int4_splitk.span_dots), with 3 stages and with 2 (two groups a step
    take twice the shared memory: 114 KB a 64 x 64 program at 3 stages on sm_90, so one
    program a multiprocessor where 57 KB let three). At 64 tokens, the 4-warp PTX tiles also
    with tokens on the M side (one dot a group: a wgmma's M is 64), at 3 stages and 2."""
    block_m = max(16, 1 << (tokens - 1).bit_length())
    plain = [SplitKTile(block_m, f, 4, 3) for f in (32, 64, 128)]
    plain += [SplitKTile(block_m, f, 2, 3) for f in (64, 128)]
    ptx = [replace(t, ptx=True) for t in plain]  # weights in packed 16-bit PTX
    two = [replace(t, two_groups=True) for t in ptx if t.features >= 64]
    two += [replace(t, stages=2) for t in two if t.warps == 4]
    on_m = [replace(t, tokens_on_m=True) for t in ptx + two if t.warps == 4 and block_m >= 64]
    on_m += [replace(t, stages=2) for t in on_m]
    return list(dict.fromkeys(plain + ptx + two + on_m))  # each tile once


def one_token_gemvs(x: torch.Tensor, packed: PackedInt4, gated: bool) -> dict:
    """The served one-token tile of this weight (`gated`: SiLU(gate) * up fused) as it is and
    with each step's weights loaded during the step before (`prefetch`)."""
    choice = tables.INT4_LINEAR_WIDE.choose(1)
    tile = choice.gated if gated else choice.plain(packed.shape[-1] // packed.group_size)
    return {
        f"gemv{'_mlp' * gated}_{gemv_name(t)}": partial(w4a16_gemv, x, packed, t, gated=gated)
        for t in (tile, replace(tile, prefetch=True))
    }


def gated_splitk(x: torch.Tensor, packed: PackedInt4, tokens: int) -> dict:
    """The served split-K tile for this gate-up with SiLU(gate) * up fused (K whole), plain and
    with PTX weights: against `served_mlp` (the tile, then the SiLU * up kernel; one token: the
    fused GEMV, against the 2-token tile)."""
    choice = tables.INT4_LINEAR_WIDE.choose(max(tokens, 2))
    if not isinstance(choice, tables.SplitK):
        return {}
    tile = choice.for_rows(packed.shape[-2], arch(x.device))
    return {
        f"splitk_mlp_{tile_name(t)}": partial(w4a16_splitk, x, packed, t, gated=True)
        for t in (tile, replace(tile, ptx=True))
    }


FUSED_TILES = [
    FusedTile(m, up, down, 4, 3) for m in (16, 32) for up, down in ((64, 64), (64, 128))
] + [FusedTile(m, 64, 128, 2, 3) for m in (16, 32)]  # 2 warps: mma.sync (splitk_tiles says why)
# The served tiles with their weights made in packed 16-bit PTX (replica.kernels.int4_ptx)
FUSED_TILES += [replace(t, ptx=True) for t in (tables.FUSED_16, tables.FUSED_16_W2)]
FUSED_TILES += [replace(tables.FUSED_32_W2, ptx=True)]
# Those two groups a loop step (replica.kernels.int4_splitk.span_dots)
FUSED_TILES += [replace(t, two_groups=True) for t in FUSED_TILES if t.ptx]
# Where an expert has a pair or less: narrower PTX tiles, more programs (1 warp: one mma.sync wide)
FUSED_NARROW_TILES = [FusedTile(16, 32, 64, 2, 3, ptx=True), FusedTile(16, 16, 32, 1, 3, ptx=True)]
# Prefill: an expert's weights are read once a segment block, so larger blocks read them less
FUSED_PREFILL_TILES = [FusedTile(m, 64, 128, 8, 3) for m in (64, 128)]


# A program a pair (1 and 2 tokens of the 30B): its gate-up (gated) and down tiles, one varied
EXPERT_GEMV_TILES = [(GemvTile(f, g, 4), GemvTile(8, 8, 4)) for f, g in ((16, 4), (8, 4), (32, 4))]
EXPERT_GEMV_TILES += [
    (GemvTile(16, 4, 4), GemvTile(f, g, 4)) for f, g in ((16, 8), (32, 8), (8, 16))
]
# The served pair with each step's weights loaded during the step before; and so, a down of K
# = 6 groups (the 30B's) in steps that divide it less wastefully than one step of 8
_AHEAD_UP = replace(tables.EXPERT_PAIRS.up, prefetch=True)
EXPERT_GEMV_TILES += [
    (_AHEAD_UP, replace(tables.EXPERT_PAIRS.down, prefetch=True)),
    (_AHEAD_UP, GemvTile(16, 2, 4, prefetch=True)),
    (_AHEAD_UP, GemvTile(16, 4, 4, prefetch=True)),
]
