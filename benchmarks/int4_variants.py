"""Engines the 4-bit benchmark (benchmarks.bench_int4_v2) measures beside the served tables:
each variant is a context inside which an engine is built another way."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import replace
from functools import partial
from unittest import mock

from replica.ops import tables
from replica.ops.tables import FusedExperts, Gemv, SplitK, Table


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


def with_flags(table: Table, one_dot: bool, serial: bool) -> Table:
    """The table with its split-K tiles taking `one_dot` and `serial`, its GEMV tiles `serial`,
    its fused-experts tiles `one_dot`."""

    def tile_of(choice: object) -> object:
        if isinstance(choice, SplitK):
            return SplitK(replace(choice.tile, one_dot=one_dot, serial=serial))
        if isinstance(choice, Gemv):
            return Gemv(replace(choice.tile, serial=serial), replace(choice.gated, serial=serial))
        if isinstance(choice, FusedExperts):
            return FusedExperts(replace(choice.tile, one_dot=one_dot))
        return choice

    entries = tuple(replace(entry, choice=tile_of(entry.choice)) for entry in table.entries)
    return replace(table, entries=entries)


@contextmanager
def flagged_tiles(one_dot: bool = False, serial: bool = False):
    """Engines built inside serve the same tables with ONE_DOT (one dot a group:
    replica.kernels.int4_splitk.group_dots) and/or the serial split-K sum (sum_if_last)."""
    names = ("INT4_LINEAR_WIDE", "MOE_PACKED_DECODE", "MOE_PACKED_PREFILL")
    with ExitStack() as stack:
        for name in names:
            table = with_flags(getattr(tables, name), one_dot, serial)
            stack.enter_context(mock.patch.object(tables, name, table))
        yield


VARIANTS = {
    "tinygemm": tinygemm_layouts,
    "one_dot": partial(flagged_tiles, one_dot=True),
    "serial": partial(flagged_tiles, serial=True),
    "one_dot_serial": partial(flagged_tiles, one_dot=True, serial=True),
}
