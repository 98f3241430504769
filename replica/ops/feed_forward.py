"""The feed-forward ops: a dense SwiGLU MLP and the sparse MoE (their weights: replica.ops.mlp).

`TorchMLP` / `TorchMoE` are the CPU path and the oracles. On CUDA `TritonMLP` fuses SiLU * up
into the gate-up GEMV where the linear's table picks the GEMV, and `TritonMoE` routes and runs
the fused experts by the kernel its table names for the mean pairs an expert and the phase
(replica.ops.tables): it returns [T * top_k, hidden] (each token's weighted expert outputs, which
the next add + RMSNorm sums).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from replica.kernels.elementwise import silu_mul as silu_mul_triton
from replica.kernels.int4_gemv import w4a16_gemv
from replica.kernels.int4_splitk import w4a16_splitk
from replica.kernels.launch import arch
from replica.kernels.moe import experts_dequantized, experts_gemv, experts_tiled
from replica.kernels.moe_fused import experts_fused
from replica.kernels.moe_pairs import pair_tickets
from replica.kernels.moe_route import (
    ResidualNorm,
    Routing,
    one_launch_fits,
    route_normed,
    route_pairs,
)
from replica.ops.layer import rms_norm
from replica.ops.linear import TritonLinear
from replica.ops.mlp import DenseMLP, SparseMoE, moe_reference
from replica.ops.packed import PackedInt4
from replica.ops.tables import (
    DEQUANTIZED_BYTES,
    ExpertGemv,
    FusedExperts,
    Gemv,
    MoeChoice,
    Route,
    SplitK,
    Table,
    moe_table,
    route_table,
)


def silu_mul(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class TorchMLP:
    def __init__(self, linear: Callable[[Tensor, Tensor | PackedInt4], Tensor]) -> None:
        self.linear = linear

    def __call__(self, x: Tensor, mlp: DenseMLP) -> Tensor:
        return self.linear(self.gated(x, mlp.gate_up), mlp.down)

    def gated(self, x: Tensor, gate_up: Tensor | PackedInt4) -> Tensor:
        """SiLU(gate) * up, [T, inter]."""
        return self.silu_mul(self.linear(x, gate_up))

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        return silu_mul(gate_up)


class TritonMLP(TorchMLP):
    linear: TritonLinear

    def gated(self, x: Tensor, gate_up: Tensor | PackedInt4) -> Tensor:
        """A packed gate-up at a few tokens: SiLU(gate) * up fused into its GEMV, or into the
        split-K tile where the table says so."""
        if isinstance(gate_up, PackedInt4):
            choice = self.linear.choose(x.shape[0], gate_up)
            if isinstance(choice, Gemv):
                return w4a16_gemv(x, gate_up, choice.gated, gated=True)
            if isinstance(choice, SplitK) and choice.gated:
                tile = choice.for_rows(gate_up.shape[-2], arch(x.device))
                return w4a16_splitk(x, gate_up, tile, gated=True)
        return super().gated(x, gate_up)

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        return silu_mul_triton(gate_up)


class TorchMoE:
    def __call__(self, x: Tensor, moe: SparseMoE, decode: bool) -> Tensor:
        """[T, hidden]: the expert loop (`decode` changes nothing here)."""
        return moe_reference(x, moe)

    def takes_residual(self, h: Tensor, decode: bool) -> bool:
        """Whether `from_residual` does the layer's add + RMSNorm before the MoE (else the
        layer ops' add_rms_norm does, and the MoE takes its output)."""
        return False

    def from_residual(
        self, norm: tuple[Tensor, Tensor, Tensor, float], moe: SparseMoE, decode: bool
    ) -> tuple[Tensor, Tensor]:
        """`norm` (h, delta, the RMSNorm's weight, eps): (h + delta, the layer's output of its
        RMSNorm, as `__call__` returns it); here as TorchLayerOps' add_rms_norm then the MoE."""
        h, delta, weight, eps = norm
        h = h + delta
        return h, self(rms_norm(h, weight, eps), moe, decode)


class TritonMoE(TorchMoE):
    """`tables`: the table for (packed experts, decode step); a benchmark passes its own, or
    runs one kernel through `run`."""

    def __init__(
        self,
        tables: Callable[[int | None, bool], Table[MoeChoice]] = moe_table,
        dequantized_bytes: int = DEQUANTIZED_BYTES,
        routes: Callable[[], Table[Route]] = route_table,
    ) -> None:
        self.tables = tables
        self.dequantized_bytes = dequantized_bytes
        self.routes = routes
        self._buffers: dict[int, LayerBuffers] = {}

    def __call__(self, x: Tensor, moe: SparseMoE, decode: bool) -> Tensor:
        """[T * top_k, hidden]: row t * top_k + j is token t's j-th expert output, weighted.
        `decode`: a decode step (in a CUDA graph: no dequantized copy)."""
        return self.run(x, moe, self.choose(x, moe, decode))

    def takes_residual(self, h: Tensor, decode: bool) -> bool:
        """Where the routing table routes with the add + RMSNorm in its one launch."""
        return decode and self.routes().choose(h.shape[0]).normed and one_launch_fits(h)

    def from_residual(
        self, norm: tuple[Tensor, Tensor, Tensor, float], moe: SparseMoE, decode: bool
    ) -> tuple[Tensor, Tensor]:
        """The add + RMSNorm in the routing's launch (replica.kernels.moe_route.route_normed):
        a launch less a layer."""
        held = self._layer_buffers(moe)
        h, x, routing = route_normed(
            ResidualNorm(*norm), moe.router, moe.top_k, moe.norm_topk_prob, held.counts, held.ticket
        )
        return h, self.run(x, moe, self.choose(x, moe, decode), routing)

    def choose(self, x: Tensor, moe: SparseMoE, decode: bool) -> MoeChoice:
        return self.tables(packed_group(moe), decode).choose(
            x.shape[0] * moe.top_k / moe.num_experts
        )

    def run(
        self, x: Tensor, moe: SparseMoE, choice: MoeChoice, routing: Routing | None = None
    ) -> Tensor:
        """The layer through the kernels `choice` names (`routing`: x's, already routed)."""
        if routing is None:
            routing = self.route(x, moe)
        if isinstance(choice, FusedExperts):
            assert isinstance(moe.gate_up, PackedInt4) and isinstance(moe.down, PackedInt4)
            return experts_fused(x, moe.gate_up, moe.down, routing, choice.tile)
        if isinstance(choice, ExpertGemv):
            assert isinstance(moe.gate_up, PackedInt4) and isinstance(moe.down, PackedInt4)
            tiles = (choice.up, choice.down)
            tickets = self._layer_buffers(moe).pair_tickets if choice.one_launch else None
            return experts_gemv(
                x, moe.gate_up, moe.down, routing, tiles, choice.bucketed, tickets=tickets
            )
        if choice.dequantized:
            assert isinstance(moe.gate_up, PackedInt4) and isinstance(moe.down, PackedInt4)
            tiles = (choice.up, choice.down)
            return experts_dequantized(
                x, moe.gate_up, moe.down, routing, tiles, self.dequantized_bytes
            )
        return experts_tiled(x, moe.gate_up, moe.down, routing, (choice.up, choice.down))

    def route(self, x: Tensor, moe: SparseMoE) -> Routing:
        """x's pairs, in one launch where the routing table says so and the kernel can."""
        held = self._layer_buffers(moe)
        fused = self.routes().choose(x.shape[0]).fused and one_launch_fits(x)
        ticket = held.ticket if fused else None
        return route_pairs(x, moe.router, moe.top_k, moe.norm_topk_prob, held.counts, ticket)

    def expert_counts(self, moe: SparseMoE) -> Tensor:
        """[experts] int32: the pairs each expert of this layer took in its last call (the
        benchmark counts the experts a step touched)."""
        return self._layer_buffers(moe).counts

    def _layer_buffers(self, moe: SparseMoE) -> LayerBuffers:
        """Made on the layer's first call, before any capture, so every CUDA graph writes these
        buffers."""
        held = self._buffers.get(id(moe))
        if held is None:
            device = moe.router.device
            held = self._buffers[id(moe)] = LayerBuffers(
                moe,  # the layer held: its id stays
                torch.zeros(moe.num_experts, dtype=torch.int32, device=device),
                torch.zeros(1, dtype=torch.int32, device=device),
                pair_tickets(device),
            )
        return held


class LayerBuffers(NamedTuple):
    """What a MoE layer's decode kernels keep between calls, zero where they say."""

    moe: SparseMoE
    counts: Tensor  # [experts] int32: pairs each expert took
    ticket: Tensor  # [1] int32: the one-launch routing's
    pair_tickets: Tensor  # replica.kernels.moe_pairs.pair_tickets


def packed_group(moe: SparseMoE) -> int | None:
    """The packed experts' smaller group size (None: 16-bit experts)."""
    if isinstance(moe.gate_up, PackedInt4) and isinstance(moe.down, PackedInt4):
        return min(moe.gate_up.group_size, moe.down.group_size)
    return None
