"""Engines the 4-bit benchmark (benchmarks.bench_int4_v2) measures beside the served tables:
each variant is a context inside which an engine is built another way."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from functools import partial
from unittest import mock


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


@contextmanager
def deep_only():
    """Engines built inside serve one token with the deep-K tile everywhere: the shallow-K tile
    (tables.SHALLOW_GROUPS: the 4B's and the 30B's qkv) measured against it."""
    from dataclasses import replace

    from replica.ops import tables

    table = tables.INT4_LINEAR_WIDE
    one_token = replace(table.entries[0], choice=replace(table.entries[0].choice, shallow=None))
    deep = replace(table, entries=(one_token, *table.entries[1:]))
    with mock.patch.object(tables, "INT4_LINEAR_WIDE", deep):
        yield


def with_ptx(choice: object) -> object:
    """A table's split-K or fused choice with its weights made in packed 16-bit PTX
    (replica.kernels.int4_ptx); any other choice as it is."""
    from dataclasses import replace

    from replica.ops import tables

    if isinstance(choice, tables.SplitK):
        wide = choice.wide and replace(choice.wide, ptx=True)
        return tables.SplitK(replace(choice.tile, ptx=True), wide=wide)
    if isinstance(choice, tables.FusedExperts):
        return tables.FusedExperts(replace(choice.tile, ptx=True))
    return choice


@contextmanager
def ptx_weights(one_token: bool = False):
    """Engines built inside make every split-K and fused tile's weights in packed 16-bit PTX.
    `one_token`: the smallest sizes too, through the tiles that serve the next ones (a token
    through the 16-token split-K tile, the 30B's first experts through the 16-row fused tile)
    instead of the GEMV."""
    from dataclasses import replace

    from replica.ops import tables

    def patched(table: tables.Table, first: int) -> tables.Table:
        entries = [replace(e, choice=with_ptx(e.choice)) for e in table.entries]
        if one_token:  # the first entry served by the second's choice
            entries[0] = replace(entries[0], choice=entries[first].choice)
        return replace(table, entries=tuple(entries))

    names = ("INT4_LINEAR_WIDE", "MOE_PACKED_DECODE", "MOE_PACKED_PREFILL")
    with ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(tables, name, patched(getattr(tables, name), 1)))
        yield


VARIANTS = {
    "tinygemm": tinygemm_layouts,
    "deep_only": deep_only,
    "ptx": ptx_weights,
    "ptx_one_token": partial(ptx_weights, one_token=True),
}
