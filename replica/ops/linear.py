"""The linear op: x @ weight.T for every projection of a layer, 16-bit or packed 4-bit.

`TorchLinear` is the CPU path and the oracle (a packed weight dequantized, then the matmul).
`TritonLinear` runs a packed weight through the kernel its table names for the token count
(replica.ops.tables), a weight in torch's int4 layout through torch's int4 matmul at every count
(it owns that weight's layout: `serving_layout`; only the benchmark's tinygemm variant converts
weights, the loader does not: PERF.md, issue 36), a 16-bit weight through cuBLAS.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from replica.kernels.int4_dequantize import dequantized
from replica.kernels.int4_gemv import w4a16_gemv
from replica.kernels.int4_matmul import w4a16_tiled
from replica.kernels.int4_splitk import w4a16_splitk
from replica.kernels.launch import arch
from replica.ops import tinygemm
from replica.ops.packed import PackedInt4, linear
from replica.ops.tables import Gemv, Int4Linear, SplitK, Table, Tiled, int4_linear_table
from replica.ops.tinygemm import TinyGemmInt4

Weight = Tensor | PackedInt4 | TinyGemmInt4


class TorchLinear:
    def __call__(self, x: Tensor, weight: Tensor | PackedInt4) -> Tensor:
        return linear(x, weight)


class TritonLinear:
    """`tables`: the 4-bit table for a group size (a benchmark passes its own)."""

    def __init__(self, tables: Callable[[int], Table[Int4Linear]] = int4_linear_table) -> None:
        self.tables = tables

    def __call__(self, x: Tensor, weight: Weight) -> Tensor:
        if isinstance(weight, TinyGemmInt4):
            return tinygemm.matmul(x, weight)
        if not isinstance(weight, PackedInt4):
            return F.linear(x, weight)
        return run_int4(x, weight, self.choose(x.shape[0], weight))

    def choose(self, tokens: int, weight: PackedInt4) -> Int4Linear:
        return self.tables(weight.group_size).choose(tokens)


def serving_layout(weight: PackedInt4, to_tinygemm: bool) -> PackedInt4 | TinyGemmInt4:
    """A packed projection as it is stored to be served: converted for torch's int4 matmul
    (which then owns it: no copy in our layout stays) when `to_tinygemm` and it can take it,
    else as is. benchmarks.bench_int4_v2 calls it once after load for its tinygemm variant; the
    server does not (tinygemm's prefill measured 17x the dequantized copy's: PERF.md, issue 36)."""
    return tinygemm.convert(weight) if to_tinygemm and tinygemm.servable(weight) else weight


def run_int4(x: Tensor, weight: PackedInt4, choice: Int4Linear) -> Tensor:
    """x [M, K] @ dequantize(weight).T -> [M, N] in x's dtype, through the kernel `choice`."""
    if isinstance(choice, Gemv):
        return w4a16_gemv(x, weight, choice.plain(x.shape[1] // weight.group_size))
    if isinstance(choice, Tiled):
        return w4a16_tiled(x, weight, choice.tile)
    if isinstance(choice, SplitK):
        return w4a16_splitk(x, weight, choice.for_rows(weight.shape[-2], arch(x.device)))
    return F.linear(x, dequantized(weight, x.dtype))
