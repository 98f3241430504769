"""The feed-forward half of a layer's weights: a dense SwiGLU MLP, or Qwen3-MoE's sparse mixture
of experts.

The ops of replica.ops.feed_forward run them: what the next residual add takes, [T, hidden], or
for the fused MoE kernels [T * top_k, hidden] (each token's weighted expert outputs, summed by
the add + RMSNorm). The plain PyTorch expert loop here is the CPU path and the test oracle: it
follows transformers' `Qwen3MoeSparseMoeBlock` operation for operation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from replica.ops.packed import PackedInt4, linear, stored


@dataclass
class DenseMLP:
    gate_up: Tensor | PackedInt4  # [2 * intermediate, hidden]
    down: Tensor | PackedInt4  # [hidden, intermediate]

    def tensors(self) -> list[Tensor]:
        return stored(self.gate_up) + stored(self.down)

    def active_params(self) -> int:
        return self.gate_up.numel() + self.down.numel()


@dataclass
class SparseMoE:
    """Router and experts of one layer. Experts are stacked so one kernel reaches them all."""

    router: Tensor  # [experts, hidden]; its logits are computed in fp32 (`route`)
    gate_up: Tensor | PackedInt4  # [experts, 2 * moe_intermediate, hidden]: gate, then up rows
    down: Tensor | PackedInt4  # [experts, hidden, moe_intermediate]
    top_k: int
    norm_topk_prob: bool

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    def tensors(self) -> list[Tensor]:
        return [self.router, *stored(self.gate_up), *stored(self.down)]

    def active_params(self) -> int:
        """Weights one token multiplies: the router and `top_k` experts."""
        per_expert = (self.gate_up.numel() + self.down.numel()) // self.num_experts
        return self.router.numel() + self.top_k * per_expert


def route(x: Tensor, moe: SparseMoE) -> tuple[Tensor, Tensor]:
    """(weights [T, k] in x's dtype, expert ids [T, k]): the router's logits in fp32 (routing
    makes discrete choices: keep them exact), softmax, top-k, renormalised when the config says
    so. On fp32 weights (the CPU) this is transformers' arithmetic."""
    logits = F.linear(x.float(), moe.router.float())
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, moe.top_k, dim=-1)
    if moe.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(x.dtype), ids


def moe_reference(x: Tensor, moe: SparseMoE) -> Tensor:
    """[T, hidden]: each expert's tokens through its SwiGLU, weighted, added up in expert order."""
    weights, ids = route(x, moe)
    out = torch.zeros_like(x)
    for expert in ids.unique().tolist():
        token, choice = torch.where(ids == expert)
        gate, up = linear(x[token], moe.gate_up[expert]).chunk(2, dim=-1)
        y = linear(F.silu(gate) * up, moe.down[expert]) * weights[token, choice, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out
