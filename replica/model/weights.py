"""The model's tensors as the forward reads them: QKV and gate/up already fused.

replica.loading.weights fills them (from a checkpoint, random numbers, or names only).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import Tensor

from replica.model.mlp import DenseMLP, SparseMoE


@dataclass
class LayerWeights:
    input_norm: Tensor
    qkv: Tensor  # [(q_heads + 2 * kv_heads) * head_dim, hidden]
    q_norm: Tensor
    k_norm: Tensor
    o_proj: Tensor
    post_norm: Tensor
    mlp: DenseMLP | SparseMoE

    def attention_tensors(self) -> list[Tensor]:
        """Everything but the MLP: norms, projections, q/k norms."""
        return [getattr(self, f.name) for f in fields(self) if f.name != "mlp"]

    def tensors(self) -> list[Tensor]:
        return self.attention_tensors() + self.mlp.tensors()

    def active_params(self) -> int:
        """Weights one token multiplies (an MoE layer: its router and top-k experts)."""
        return sum(t.numel() for t in self.attention_tensors()) + self.mlp.active_params()


@dataclass
class ModelWeights:
    embed: Tensor
    layers: list[LayerWeights]
    final_norm: Tensor
    lm_head: Tensor
