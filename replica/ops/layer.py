"""The elementwise parts of a Qwen3 layer, behind one interface with two implementations.

`TorchOps` is plain PyTorch in transformers' exact order of operations (fp32 tokens match it bit
for bit on CPU). On CUDA, `replica.kernels.elementwise.TritonOps` does the same work in fused
kernels (replica.ops.select chooses); in a decode step the unfused version's ~50 small launches per
layer cost more than reading the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from replica.ops.mlp import DenseMLP, SparseMoE, moe_reference
from replica.ops.packed import PackedInt4, linear


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Normalise in fp32, cast back, then scale: transformers' order, bit for bit."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TorchOps:
    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, eps: float, inv_freq: Tensor
    ) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.eps = eps
        self.inv_freq = inv_freq

    def add_rms_norm(
        self, h: Tensor, delta: Tensor | None, weight: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(h + delta, rms_norm(h + delta)): the residual stream and the next block's input.

        `delta` may carry several rows per token (the fused MoE's expert outputs): they are
        summed in fp32, in order, then rounded once."""
        if delta is not None:
            if delta.shape[0] != h.shape[0]:
                delta = delta.unflatten(0, (h.shape[0], -1)).float().sum(1).to(h.dtype)
            h = h + delta
        return h, rms_norm(h, weight, self.eps)

    def linear(self, x: Tensor, weight: Tensor | PackedInt4) -> Tensor:
        """x @ weight.T: every projection of a layer goes through here, 16-bit or 4-bit."""
        return linear(x, weight)

    def mlp(self, x: Tensor, mlp: DenseMLP | SparseMoE) -> Tensor:
        """The layer's feed-forward half (see replica.ops.mlp for what it returns)."""
        if isinstance(mlp, SparseMoE):
            return self.moe(x, mlp)
        return self.linear(self.silu_mul(self.linear(x, mlp.gate_up)), mlp.down)

    def moe(self, x: Tensor, moe: SparseMoE) -> Tensor:
        return moe_reference(x, moe)

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope_store(
        self,
        qkv: Tensor,
        q_norm: Tensor,
        k_norm: Tensor,
        positions: Tensor,
        slots: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q/k norms and RoPE on the fused projection [T, ...] of the tokens at `positions`
        [T]; K and V go into the paged caches [blocks, block_size, ...] at flat slot slots[t]
        (block * block_size + offset). Returns q, k, v as [T, heads, head_dim]."""
        d = self.head_dim
        q, k, v = qkv.split((self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d), -1)
        q = rms_norm(q.unflatten(-1, (self.num_heads, d)), q_norm, self.eps)
        k = rms_norm(k.unflatten(-1, (self.num_kv_heads, d)), k_norm, self.eps)
        v = v.unflatten(-1, (self.num_kv_heads, d))
        freqs = positions[:, None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos().to(q.dtype)[:, None]
        sin = angles.sin().to(q.dtype)[:, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k_cache.flatten(0, 1)[slots] = k
        v_cache.flatten(0, 1)[slots] = v
        return q, k, v
