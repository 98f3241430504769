"""Engines the 4-bit benchmark (benchmarks.bench_int4_v2) measures beside the served tables:
each variant is a context inside which an engine is built another way."""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from functools import partial
from unittest import mock

from replica.kernels.int4_gemv import GemvTile
from replica.kernels.moe_route import FUSED_MAX_TOKENS
from replica.ops import tables
from replica.ops.tables import Table


@contextmanager
def tinygemm_layouts():
    """Engines built inside serve every 2-D packed projection (attention, dense MLP) through
    torch's int4 matmul, converted once at load, before the CUDA graphs are captured."""
    from replica import startup
    from replica.ops.linear import serving_layout
    from replica.ops.mlp import DenseMLP
    from replica.ops.packed import PackedInt4

    load = startup.load_stages

    def convert(owner: object, names: tuple[str, ...]) -> None:
        for name in names:
            weight = getattr(owner, name)
            if isinstance(weight, PackedInt4):
                setattr(owner, name, serving_layout(weight, to_tinygemm=True))

    def load_converted(*args, **kwargs):
        stages = load(*args, **kwargs)
        for layer in (layer for model in stages for layer in model.layers):
            convert(layer, ("qkv", "o_proj"))
            if isinstance(layer.mlp, DenseMLP):
                convert(layer.mlp, ("gate_up", "down"))
        return stages

    with mock.patch.object(startup, "load_stages", load_converted):
        yield


def first_served_by(table: Table, choice: object) -> Table:
    """`table` with its first entry's choice replaced."""
    return replace(table, entries=(replace(table.entries[0], choice=choice), *table.entries[1:]))


@contextmanager
def serving(**replaced: Table):
    """Engines built inside read these tables (replica.ops.tables' names) instead."""
    with ExitStack() as stack:
        for name, table in replaced.items():
            stack.enter_context(mock.patch.object(tables, name, table))
        yield


def deep_only():
    """Engines built inside serve one token with the deep-K tile everywhere: the shallow-K tile
    (tables.SHALLOW_GROUPS: the 4B's and the 30B's qkv) measured against it."""
    table = tables.INT4_LINEAR_WIDE
    return serving(
        INT4_LINEAR_WIDE=first_served_by(table, replace(table.entries[0].choice, shallow=None))
    )


def retiled(choice: object, **fields: bool) -> object:
    """A table's split-K or fused choice with these fields of its tiles replaced (`ptx`:
    weights made in packed 16-bit PTX, replica.kernels.int4_ptx; `two_groups`: two groups a
    loop step); any other choice as it is."""
    if isinstance(choice, tables.SplitK):
        wide = choice.wide and replace(choice.wide, **fields)
        return replace(choice, tile=replace(choice.tile, **fields), wide=wide)
    if isinstance(choice, tables.FusedExperts):
        return tables.FusedExperts(replace(choice.tile, **fields))
    return choice


def each_entry(table: Table, change) -> Table:
    """`table` with every entry's choice passed through `change`."""
    return replace(table, entries=tuple(replace(e, choice=change(e.choice)) for e in table.entries))


TILED_TABLES = ("INT4_LINEAR_WIDE", "MOE_PACKED_DECODE", "MOE_PACKED_PREFILL")


def made_weights(ptx: bool, one_token: bool = False):
    """Engines built inside make every split-K and fused tile's weights in packed 16-bit PTX
    (`ptx`) or without it. `one_token`: the smallest sizes too, through the tiles that serve the
    next ones (a token through the 16-token split-K tile, the 30B's first experts through the
    16-row fused tile) instead of the GEMV, and the MLP's SiLU * up fused into the split-K tile
    as the GEMV fuses it."""

    def choice(chosen: object) -> object:
        chosen = retiled(chosen, ptx=ptx)
        fused = one_token and isinstance(chosen, tables.SplitK)
        return replace(chosen, gated=True) if fused else chosen

    def patched(table: Table) -> Table:
        table = each_entry(table, choice)
        return first_served_by(table, table.entries[1].choice) if one_token else table

    return serving(**{name: patched(getattr(tables, name)) for name in TILED_TABLES})


def two_groups():
    """Engines built inside run every split-K and fused tile two groups a loop step
    (replica.kernels.int4_splitk.span_dots: one wait for two groups' scales)."""
    change = partial(retiled, two_groups=True)
    return serving(**{name: each_entry(getattr(tables, name), change) for name in TILED_TABLES})


def prefetch():
    """Engines built inside run one token's GEMV tiles (projections, gate-up, the experts'
    pairs) with each step's weights loaded during the step before."""

    def ahead(tile: GemvTile | None) -> GemvTile | None:
        return tile and replace(tile, prefetch=True)

    gemv = tables.INT4_LINEAR_WIDE.entries[0].choice
    gemv = replace(
        gemv, tile=ahead(gemv.tile), gated=ahead(gemv.gated), shallow=ahead(gemv.shallow)
    )
    pairs = tables.MOE_PACKED_DECODE.entries[0].choice
    pairs = replace(pairs, up=ahead(pairs.up), down=ahead(pairs.down))
    return serving(
        INT4_LINEAR_WIDE=first_served_by(tables.INT4_LINEAR_WIDE, gemv),
        MOE_PACKED_DECODE=first_served_by(tables.MOE_PACKED_DECODE, pairs),
    )


def tokens_on_m():
    """Engines built inside serve the 33-to-64-token split-K entry on a Hopper (`SplitK.sm90`)
    with tokens on the MMA's M side, one dot a group (replica.kernels.int4_splitk.group_dots'
    ON_M): wgmma then waits once a group, not once a slab. An A100 keeps its tiles (there
    it costs instructions and saves no wait)."""

    def on_m(choice: object) -> object:
        return replace(choice, sm90=retiled(choice, tokens_on_m=True))

    table = tables.INT4_LINEAR_WIDE
    entries = tuple(
        replace(e, choice=on_m(e.choice)) if e.up_to == 64 else e for e in table.entries
    )
    return serving(INT4_LINEAR_WIDE=replace(table, entries=entries))


def pairs_in_one_launch():
    """Engines built inside run the experts' pairs (a program a pair) with gate-up and down in
    one launch (replica.kernels.moe_pairs)."""
    table = tables.MOE_PACKED_DECODE
    pairs = replace(table.entries[0].choice, one_launch=True)
    return serving(MOE_PACKED_DECODE=first_served_by(table, pairs))


def fused_routes() -> Table:
    """The routing table with a decode step's tokens, all it can take, routed in one launch
    (replica.kernels.moe_route)."""
    entry = tables.Entry(FUSED_MAX_TOKENS, tables.Route(fused=True), "measured here")
    return replace(tables.MOE_ROUTE, entries=(entry, *tables.MOE_ROUTE.entries))


def normed_routes() -> Table:
    """The routing table with a decode step of up to 8 tokens routed in one launch with the
    layer's add + RMSNorm before the MoE in it."""
    entry = tables.Entry(8, tables.Route(fused=True, normed=True), "measured here")
    return replace(tables.MOE_ROUTE, entries=(entry, tables.MOE_ROUTE.entries[-1]))


def launches(merged: bool, roped: bool) -> Table:
    """Decode attention's table with every step's launch as `tables.DecodeLaunch(merged,
    roped)` says."""
    entry = tables.Entry(math.inf, tables.DecodeLaunch(merged, roped), "measured here")
    return replace(tables.ATTENTION_DECODE, entries=(entry,))


def routes_in(fused: bool):
    """Engines built inside route every step in one launch where the kernel can (`fused`), or
    in three: bf16's and int4's alike, so the benchmark builds both inside."""
    unfused = tables.MOE_ROUTE.entries[-1]
    return serving(
        MOE_ROUTE=fused_routes() if fused else replace(tables.MOE_ROUTE, entries=(unfused,))
    )


def decode_launch(merged: bool, roped: bool):
    """Engines built inside run decode attention's launch as `launches` says: bf16's and int4's
    alike, so the benchmark builds both inside."""
    return serving(ATTENTION_DECODE=launches(merged, roped))


def fewer_launches():
    """Engines built inside cut all three launches a decode layer can lose: attention's merge
    and its rope_store (one launch), and the MoE's add + RMSNorm (in its routing)."""
    return serving(ATTENTION_DECODE=launches(True, True), MOE_ROUTE=normed_routes())


VARIANTS = {
    "prefetch": prefetch,
    "tinygemm": tinygemm_layouts,
    "deep_only": deep_only,
    "ptx": partial(made_weights, True),
    "plain": partial(made_weights, False),
    "ptx_one_token": partial(made_weights, True, one_token=True),
    "two_groups": two_groups,
    "one_launch_pairs": pairs_in_one_launch,
    "tokens_on_m": tokens_on_m,
    "fused_route": partial(routes_in, True),
    "three_launch_route": partial(routes_in, False),
    "normed_route": lambda: serving(MOE_ROUTE=normed_routes()),
    "fewer_launches": fewer_launches,
    "merged_attention": partial(decode_launch, True, False),
    "roped_attention": partial(decode_launch, False, True),
    "one_launch_attention": partial(decode_launch, True, True),
    "two_launch_attention": partial(decode_launch, False, False),
}
# variants of kernels bf16 runs too: its engine rebuilt inside
BOTH_DTYPES = {"fused_route", "three_launch_route", "normed_route", "fewer_launches"} | {
    k for k in VARIANTS if "attention" in k
}
