"""The 4-bit benchmarks' names for kernel tiles: the sweeps' columns, the checks' rows and the
SASS counts' lines name a tile the same way."""

from __future__ import annotations

from replica.kernels.int4_gemv import GemvTile
from replica.kernels.int4_splitk import SplitKTile
from replica.kernels.moe_fused import FusedTile


def tile_name(t: SplitKTile) -> str:
    """splitk_m<tokens>n<features>, then w<warps>, v<waves> and s<stages> where not 4, 2 and 3,
    then _ptx, _two for two groups a loop step and _onm for tokens on the MMA's M side."""
    warps, waves = f"w{t.warps}" * (t.warps != 4), f"v{t.waves}" * (t.waves != 2)
    stages = f"s{t.stages}" * (t.stages != 3)
    return f"splitk_m{t.tokens}n{t.features}{warps}{waves}{stages}{_suffix(t)}"


def _suffix(t: SplitKTile | FusedTile) -> str:
    on_m = isinstance(t, SplitKTile) and t.tokens_on_m
    return f"{'_ptx' * t.ptx}{'_two' * t.two_groups}{'_onm' * on_m}"


def gemv_name(t: GemvTile) -> str:
    """f<features>g<groups>w<warps>, then p where it prefetches."""
    return f"f{t.features}g{t.groups}w{t.warps}{'p' * t.prefetch}"


def expert_gemv_name(up: GemvTile, down: GemvTile) -> str:
    """A program a pair: its gated gate-up tile and its down tile."""
    return f"gemv_u{gemv_name(up)}d{gemv_name(down)}"


def fused_name(t: FusedTile) -> str:
    """fused_m<tokens>u<gate-up features>d<down features>w<warps>, then s<stages> where not 3,
    _ptx and _two as tile_name's."""
    stages = f"s{t.stages}" * (t.stages != 3)
    return f"fused_m{t.tokens}u{t.up_features}d{t.down_features}w{t.warps}{stages}{_suffix(t)}"
