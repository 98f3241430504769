"""Engines the 4-bit benchmark (benchmarks.bench_int4_v2) measures beside the served tables:
each variant is a context inside which an engine is built another way."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import replace
from unittest import mock

from replica.ops import tables
from replica.ops.tables import FusedExperts, SplitK, Table


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


def _one_dot(table: Table) -> Table:
    """The table with each split-K and fused-experts tile taking one dot a group."""

    def tile_of(choice: object) -> object:
        if isinstance(choice, SplitK | FusedExperts):
            return type(choice)(replace(choice.tile, one_dot=True))
        return choice

    entries = tuple(replace(entry, choice=tile_of(entry.choice)) for entry in table.entries)
    return replace(table, entries=entries)


@contextmanager
def one_dot_tiles():
    """Engines built inside serve the split-K and fused-experts entries with ONE_DOT
    (replica.kernels.int4_splitk.group_dots): the same tables, one dot a group."""
    names = ("INT4_LINEAR_WIDE", "MOE_PACKED_DECODE", "MOE_PACKED_PREFILL")
    with ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(tables, name, _one_dot(getattr(tables, name))))
        yield


VARIANTS = {"tinygemm": tinygemm_layouts, "one_dot": one_dot_tiles}
