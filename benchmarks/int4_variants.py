"""Engines the 4-bit benchmark (benchmarks.bench_int4_v2) measures beside the served tables:
each variant is a context inside which an engine is built another way."""

from __future__ import annotations

from contextlib import contextmanager
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


VARIANTS = {"tinygemm": tinygemm_layouts, "deep_only": deep_only}
