"""The model's tensors as the forward reads them: QKV and gate/up already fused.

replica.loading.weights fills them (from a checkpoint, random numbers, or names only).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import Tensor

from replica.ops.mlp import DenseMLP, SparseMoE
from replica.ops.packed import PackedInt4, stored


@dataclass
class LayerWeights:
    input_norm: Tensor
    qkv: Tensor | PackedInt4  # [(q_heads + 2 * kv_heads) * head_dim, hidden]
    q_norm: Tensor
    k_norm: Tensor
    o_proj: Tensor | PackedInt4
    post_norm: Tensor
    mlp: DenseMLP | SparseMoE

    def attention_weights(self) -> list[Tensor | PackedInt4]:
        """Everything but the MLP: norms, projections, q/k norms."""
        return [getattr(self, f.name) for f in fields(self) if f.name != "mlp"]

    def tensors(self) -> list[Tensor]:
        """The tensors holding the layer's bytes (a packed weight's words, scales and zeros)."""
        return [t for w in self.attention_weights() for t in stored(w)] + self.mlp.tensors()

    def active_params(self) -> int:
        """Weights one token multiplies (an MoE layer: its router and top-k experts)."""
        return sum(w.numel() for w in self.attention_weights()) + self.mlp.active_params()


@dataclass
class ModelWeights:
    """The whole model's tensors, or one pipeline stage's: a contiguous range of its layers, the
    embedding only on the first stage and the LM head only on the last. `final_norm` is the norm
    after the stage's last layer: the model's final norm on the last stage, else the next
    stage's first input norm (so a stage hands on the same residual and normed pair the whole
    model holds at that point, and two stages compute exactly what one does)."""

    embed: Tensor | None
    layers: list[LayerWeights]
    final_norm: Tensor
    lm_head: Tensor | None
    first_layer: int = 0  # the model's index of layers[0]
