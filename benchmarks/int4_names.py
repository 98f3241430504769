"""The 4-bit benchmarks' names for kernel tiles: the sweeps' columns, the checks' rows and the
SASS counts' lines name a tile the same way."""

from __future__ import annotations

from replica.kernels.int4_gemv import GemvTile
from replica.kernels.int4_splitk import SplitKTile
from replica.kernels.moe_fused import FusedTile


def tile_name(t: SplitKTile) -> str:
    """splitk_m<tokens>n<features>, then w<warps> and v<waves> where not 4 and 2, and _ptx."""
    warps, waves = f"w{t.warps}" * (t.warps != 4), f"v{t.waves}" * (t.waves != 2)
    return f"splitk_m{t.tokens}n{t.features}{warps}{waves}{'_ptx' * t.ptx}"


def gemv_name(t: GemvTile) -> str:
    """f<features>g<groups>w<warps>, then p where it prefetches."""
    return f"f{t.features}g{t.groups}w{t.warps}{'p' * t.prefetch}"


def expert_gemv_name(up: GemvTile, down: GemvTile) -> str:
    """A program a pair: its gated gate-up tile and its down tile."""
    return f"gemv_u{gemv_name(up)}d{gemv_name(down)}"


def fused_name(t: FusedTile) -> str:
    return f"fused_m{t.tokens}u{t.up_features}d{t.down_features}w{t.warps}{'_ptx' * t.ptx}"
