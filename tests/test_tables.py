"""Every kernel table entry cites where it was measured: a docs/PERF.md section that exists and
JSON under docs/perf/ that exists (a citation that outlives its numbers would send a reader to
nothing)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from replica.kernels.int4_splitk import SplitKTile
from replica.ops import tables

ROOT = Path(__file__).resolve().parent.parent
HEADINGS = [
    line for line in (ROOT / "docs" / "PERF.md").read_text().splitlines() if line[:1] == "#"
]
TABLES = [value for value in vars(tables).values() if isinstance(value, tables.Table)]


def citations() -> list[tuple[str, str]]:
    return sorted({(table.name, entry.measured) for table in TABLES for entry in table.entries})


def test_the_tables_are_found():
    names = {table.name for table in TABLES}
    assert len(TABLES) >= 8 and "q/k norms + RoPE + KV write" in names


@pytest.mark.parametrize(("table", "measured"), citations())
def test_each_entry_cites_a_perf_section_and_its_json(table, measured):
    sections = re.findall(r"'([^']+)'", measured)
    assert sections, f"{table}: {measured!r} names no PERF.md section"
    for section in sections:
        assert any(section in heading for heading in HEADINGS), f"{table}: no section {section!r}"
    paths = re.findall(r"docs/perf/\S+?\.json", measured)
    assert paths, f"{table}: {measured!r} names no JSON"
    for path in paths:
        assert (ROOT / path).exists(), f"{table}: {path} does not exist"


def test_groups_of_128_take_the_second_design_and_smaller_groups_the_first():
    """The split-K tile and the fused 4-bit MoE serve groups of 128 or more (their kernels need
    a group of 16 words); smaller groups keep the GEMV, the tile kernel and the bucketed experts."""
    assert isinstance(tables.int4_linear_table(128).choose(8), tables.SplitK)
    assert isinstance(tables.int4_linear_table(64).choose(8), tables.Tiled)
    assert isinstance(tables.moe_table(128, decode=True).choose(4.0), tables.FusedExperts)
    assert isinstance(tables.moe_table(128, decode=False).choose(64.0), tables.FusedExperts)
    assert tables.moe_table(128, decode=False).choose(1024.0).dequantized
    assert tables.moe_table(32, decode=True).choose(4.0).bucketed
    assert tables.moe_table(None, decode=True) is tables.MOE_16BIT


def test_packed_experts_are_looked_up_by_their_smaller_group():
    from replica.ops.feed_forward import packed_group
    from replica.ops.mlp import SparseMoE
    from replica.ops.packed import quantize

    def layer(up_group: int | None, down_group: int | None) -> SparseMoE:
        def stacked(group: int | None, *shape: int):
            weights = torch.randn(*shape)
            return weights if group is None else quantize(weights, group_size=group)

        gate_up, down = stacked(up_group, 4, 256, 256), stacked(down_group, 4, 256, 128)
        return SparseMoE(torch.randn(4, 256), gate_up, down, 2, True)

    assert packed_group(layer(None, None)) is None
    assert packed_group(layer(128, 128)) == 128
    assert packed_group(layer(128, 32)) == 32  # the narrower one decides: the fused kernel


def test_one_token_takes_the_shallow_tile_where_k_holds_few_groups(monkeypatch):
    """The 4B's qkv (K of 20 groups) and its o (32): the tile the GEMV is launched with."""
    from replica.ops import linear
    from replica.ops.packed import quantize

    launched = []
    monkeypatch.setattr(linear, "w4a16_gemv", lambda x, w, tile: launched.append(tile))
    choice = tables.INT4_LINEAR_WIDE.choose(1)
    for groups in (tables.SHALLOW_GROUPS, tables.SHALLOW_GROUPS + 12):
        weight = quantize(torch.randn(8, 128 * groups), group_size=128)
        linear.run_int4(torch.randn(1, 128 * groups), weight, choice)
    assert launched == [choice.shallow, choice.tile] and choice.shallow != choice.tile


def test_64_tokens_take_wider_split_k_blocks_for_wide_weights(monkeypatch):
    """The 4B's gate_up (19,456 rows) against its o (2,560): the tile the split-K kernel gets;
    fewer tokens keep one tile for every width."""
    from replica.ops import linear
    from replica.ops.packed import quantize

    launched = []
    monkeypatch.setattr(linear, "w4a16_splitk", lambda x, w, tile: launched.append(tile))
    choice = tables.INT4_LINEAR_WIDE.choose(64)
    for rows in (tables.WIDE_ROWS, tables.WIDE_ROWS - 64):
        linear.run_int4(torch.randn(64, 128), quantize(torch.randn(rows, 128)), choice)
    assert launched == [choice.wide, choice.tile] and choice.wide.features > choice.tile.features
    assert tables.INT4_LINEAR_WIDE.choose(32).for_rows(tables.WIDE_ROWS).features == 128
    assert tables.INT4_LINEAR_WIDE.choose(32).wide is None


def test_the_deep_only_variant_serves_the_deep_tile_inside_and_restores_it():
    from benchmarks.int4_variants import VARIANTS

    with VARIANTS["deep_only"]():
        assert tables.INT4_LINEAR_WIDE.choose(1).plain(tables.SHALLOW_GROUPS).groups == 16
    assert tables.INT4_LINEAR_WIDE.choose(1).plain(tables.SHALLOW_GROUPS).groups == 4


def tile_flags(table: tables.Table, field: str) -> list[bool]:
    """`field` of each split-K and fused tile `table` serves."""
    found = []
    for choice in (entry.choice for entry in table.entries):
        if isinstance(choice, tables.SplitK):
            found += [getattr(t, field) for t in (choice.tile, choice.wide) if t]
        elif isinstance(choice, tables.FusedExperts):
            found.append(getattr(choice.tile, field))
    return found


def tiled_tables() -> tuple[tables.Table, ...]:
    return (tables.INT4_LINEAR_WIDE, tables.MOE_PACKED_DECODE, tables.MOE_PACKED_PREFILL)


def test_the_ptx_variants_serve_ptx_tiles_inside_and_restore_them():
    from benchmarks.int4_variants import VARIANTS

    def ptx_tiles(table: tables.Table) -> list[bool]:
        return tile_flags(table, "ptx")

    inside = tiled_tables
    served = inside()
    served_ptx = [ptx_tiles(t) for t in served]
    with VARIANTS["ptx"]():
        assert all(all(ptx_tiles(t)) and ptx_tiles(t) for t in inside())
        assert isinstance(tables.INT4_LINEAR_WIDE.choose(1), tables.Gemv)
        assert isinstance(tables.moe_table(128, True).choose(1 / 16), tables.ExpertGemv)
    with VARIANTS["plain"]():
        assert not any(any(ptx_tiles(t)) for t in inside())
    with VARIANTS["ptx_one_token"]():
        assert tables.INT4_LINEAR_WIDE.choose(1) == tables.INT4_LINEAR_WIDE.choose(16)
        assert tables.INT4_LINEAR_WIDE.choose(1).tile.ptx
        assert tables.moe_table(128, True).choose(1 / 16).tile.ptx
    assert inside() == served and [ptx_tiles(t) for t in served] == served_ptx


def test_the_two_groups_variant_takes_every_tile_two_groups_a_step_inside_only():
    from benchmarks.int4_variants import VARIANTS

    served = tiled_tables()
    assert not any(any(tile_flags(t, "two_groups")) for t in served)
    with VARIANTS["two_groups"]():
        inside = tiled_tables()
        assert all(all(tile_flags(t, "two_groups")) and tile_flags(t, "two_groups") for t in inside)
        assert [tile_flags(t, "ptx") for t in inside] == [tile_flags(t, "ptx") for t in served]
    assert tiled_tables() == served


def test_the_one_launch_pairs_variant_serves_the_pairs_in_one_launch_inside_only():
    from benchmarks.int4_variants import VARIANTS

    served = tables.moe_table(128, True).choose(1 / 16)
    fused = tables.moe_table(128, True).choose(1.0)
    assert isinstance(served, tables.ExpertGemv) and not served.one_launch
    with VARIANTS["one_launch_pairs"]():
        assert tables.moe_table(128, True).choose(1 / 16) == replace(served, one_launch=True)
        assert tables.moe_table(128, True).choose(1.0) == fused
    assert tables.moe_table(128, True).choose(1 / 16) == served


def test_the_tokens_on_m_variant_takes_the_64_token_tiles_on_sm90_only_inside():
    from benchmarks.int4_variants import VARIANTS

    served = tables.INT4_LINEAR_WIDE
    assert not any(tile_flags(served, "tokens_on_m"))
    with VARIANTS["tokens_on_m"]():
        inside = tables.INT4_LINEAR_WIDE.choose(64)
        for rows in (2560, tables.WIDE_ROWS):
            assert inside.for_rows(rows, 90) == replace(
                served.choose(64).for_rows(rows), tokens_on_m=True
            )
            assert inside.for_rows(rows, 80) == served.choose(64).for_rows(rows)
        assert tables.INT4_LINEAR_WIDE.choose(16) == served.choose(16)
    assert tables.INT4_LINEAR_WIDE is served


def test_a_split_k_entry_serves_its_sm90_tiles_on_a_hopper_only():
    a100 = tables.SplitK(SplitKTile(64, 64, 4, 3), wide=SplitKTile(64, 128, 4, 3))
    hopper = tables.SplitK(SplitKTile(64, 64, 4, 2), wide=SplitKTile(64, 128, 4, 2))
    both = replace(a100, sm90=hopper)
    for rows in (2560, tables.WIDE_ROWS):
        assert both.for_rows(rows, 90) == hopper.for_rows(rows)
        assert both.for_rows(rows, 80) == both.for_rows(rows, 0) == a100.for_rows(rows)
        assert a100.for_rows(rows, 90) == a100.for_rows(rows)  # no sm_90 tiles: the same


def test_ptx_weights_serve_where_measured_faster():
    """2 to 64 tokens (split-K) and a quarter to 4 pairs an expert (the 16-row fused tile): the
    sizes the PTX sweep timed; the experts beyond keep plain weights (not timed with PTX)."""
    for tokens in (2, 16, 32, 64):
        choice = tables.INT4_LINEAR_WIDE.choose(tokens)
        assert choice.tile.ptx and (choice.wide is None or choice.wide.ptx), tokens
    for pairs in (0.25, 1.0, 4.0):
        assert tables.moe_table(128, decode=True).choose(pairs).tile == tables.FUSED_16_PTX
    assert not tables.moe_table(128, decode=True).choose(8.0).tile.ptx
    assert not tables.moe_table(128, decode=False).choose(64.0).tile.ptx


def test_a_decode_step_of_8_tokens_or_fewer_routes_in_one_launch():
    from benchmarks.int4_variants import VARIANTS

    assert [tables.MOE_ROUTE.choose(t).fused for t in (1, 8, 9, 64)] == [True, True, False, False]
    with VARIANTS["fused_route"]():
        assert tables.route_table().choose(64).fused
    with VARIANTS["three_launch_route"]():
        assert not tables.route_table().choose(1).fused
    for variant in ("normed_route", "fewer_launches"):
        with VARIANTS[variant]():
            assert tables.route_table().choose(8) == tables.Route(fused=True, normed=True)
            assert tables.route_table().choose(9) == tables.Route(fused=False)
    with VARIANTS["fewer_launches"]():
        assert tables.decode_table().choose(64) == tables.DecodeLaunch(merged=True, roped=True)
    assert tables.route_table().choose(1) == tables.Route(fused=True)


def test_the_attention_variants_serve_their_decode_launch_inside_and_restore_it():
    from benchmarks.int4_variants import VARIANTS

    served = tables.decode_table().choose(1)
    launches = {"merged_attention": (True, False), "roped_attention": (False, True)}
    launches |= {"one_launch_attention": (True, True), "two_launch_attention": (False, False)}
    for variant, (merged, roped) in launches.items():
        with VARIANTS[variant]():
            assert tables.decode_table().choose(64) == tables.DecodeLaunch(merged, roped)
    assert tables.decode_table().choose(1) == served


def test_the_prefetch_variant_serves_prefetching_gemv_tiles_inside_and_restores_them():
    from benchmarks.int4_variants import VARIANTS

    def prefetching() -> list[bool]:
        gemv = tables.INT4_LINEAR_WIDE.choose(1)
        pairs = tables.moe_table(128, True).choose(1 / 16)
        tiles = (gemv.tile, gemv.gated, gemv.shallow, pairs.up, pairs.down)
        return [tile.prefetch for tile in tiles]

    with VARIANTS["prefetch"]():
        assert all(prefetching())
        assert tables.INT4_LINEAR_WIDE.choose(16) == tables.INT4_LINEAR_WIDE.entries[1].choice
    assert not any(prefetching())


def test_the_one_token_ptx_variant_fuses_the_mlp_into_the_split_k_tile():
    from benchmarks.int4_variants import VARIANTS

    with VARIANTS["ptx_one_token"]():
        assert all(tables.INT4_LINEAR_WIDE.choose(t).gated for t in (1, 16, 64))
    with VARIANTS["ptx"]():
        assert not tables.INT4_LINEAR_WIDE.choose(16).gated
    assert not tables.INT4_LINEAR_WIDE.choose(16).gated
