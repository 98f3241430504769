"""The peers benchmarks.bench_int4_v2 measures our 4-bit paths against (issue 36): GemLite's
layer where its wheel is installed, and the ratio of our summed projections to the faster peer's."""

from __future__ import annotations

from collections.abc import Callable

import torch

from replica.kernels.elementwise import silu_mul
from replica.ops import tinygemm

RATIO_TOKENS = ("1", "8", "64")


def gemlite_peer(packed, dtype: torch.dtype) -> tuple[Callable | None, str]:
    """GemLite's 4-bit layer for this weight, or None and why (it is optional)."""
    try:
        import gemlite

        layer_class = getattr(gemlite, "GemLiteLinearTriton", None) or gemlite.GemLiteLinear
        n, k = packed.shape
        layer = layer_class(
            4, group_size=packed.group_size, in_features=k, out_features=n,
            input_dtype=gemlite.DType.BF16, output_dtype=gemlite.DType.BF16,
        )  # fmt: skip
        values = tinygemm.values(packed).to(torch.uint8)
        layer.pack(values, packed.scales.to(dtype), packed.zeros.to(dtype), bias=None)
        layer(torch.zeros(1, k, dtype=dtype, device=packed.device))  # fails here, not in a graph
        return layer, f"gemlite {getattr(gemlite, '__version__', '?')}"
    except Exception as error:  # any failure: the peer is optional
        return None, f"not available: {type(error).__name__}: {error}"[:200]


def guarded(time_us: Callable, fallback: Callable, fn: Callable) -> float | str:
    """A peer's time; eager where its CUDA graph fails (noted), or why neither ran."""
    try:
        return time_us(fn)
    except Exception as error:  # any failure: the peer is optional
        torch.cuda.synchronize()
        try:
            return fallback(fn)
        except Exception:  # still the peer's failure: recorded, not fatal
            return f"failed: {type(error).__name__}: {error}"[:200]


def silu_after(gate_up: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A peer's gate-up, then SiLU(gate) * up by our kernel: what its MLP would run."""
    return silu_mul(gate_up())


def peer_ratio(dense_rows: list) -> dict:
    """Our served paths' summed time of the four projections over the faster peer's; gate_up
    with SiLU(gate) * up on both sides (`*_mlp`: the GEMV fuses it, a peer runs our kernel
    after it)."""
    ratios = {}
    for tokens in RATIO_TOKENS:
        rows = [r for r in dense_rows if r["tokens"] == int(tokens)]
        if not rows:  # a smoke run's sizes
            continue

        def summed(path: str, rows: list = rows) -> float | None:
            times = [r.get(f"{path}_mlp", r.get(path)) for r in rows]
            return sum(times) if all(isinstance(t, float) for t in times) else None

        ours = summed("served")
        peers = [t for t in (summed("tinygemm"), summed("gemlite")) if t is not None]
        ratios[tokens] = round(ours / min(peers), 3)
    return ratios
