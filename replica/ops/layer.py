"""The elementwise ops of a Qwen3 layer: add + RMSNorm, and q/k norms + RoPE + the KV write; and
a decode step's attention from the projection (`attend_decode`: those, then the backend's decode,
or a backend that does both in one launch).

`TorchLayerOps` is plain PyTorch in transformers' exact order of operations (fp32 tokens match it
bit for bit on CPU). On CUDA `TritonLayerOps` does the same work in the fused kernels of
replica.kernels.elementwise (in a decode step the unfused version's many small launches per layer
cost more than reading the weights). The model builds one per model (`Ops.layer`): they hold the
attention shape, eps and RoPE's inverse frequencies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from replica.kernels import elementwise
from replica.kernels.decode_attention import Rope
from replica.ops.attention import AttentionBackend, DecodeStep, LayerCache
from replica.ops.tables import ROPE_STORE, RopeBlock, Table

Norms = tuple[Tensor, Tensor]  # a layer's q and k RMSNorm weights


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Normalise in fp32, cast back, then scale: transformers' order, bit for bit."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TorchLayerOps:
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

    def attend_decode(
        self,
        attention: AttentionBackend,
        qkv: Tensor,
        norms: Norms,
        kv: LayerCache,
        step: DecodeStep,
    ) -> Tensor:
        """A decode step's attention from the projection qkv [B, ...]: rope_store (q/k norms
        `norms`, RoPE, the K/V write), then the backend's decode: [B, Hq, D]; or the backend's
        decode doing both, where it takes the projection (our Triton kernel: a launch less a
        layer)."""
        if attention.takes_projection(len(qkv)):
            rope = Rope(self.num_heads, *norms, self.inv_freq, step.positions, step.slots, self.eps)
            return attention.decode(qkv, kv, step.paged, rope)
        q, _, _ = self.rope_store(qkv, *norms, step.positions, step.slots, *kv)
        return attention.decode(q, kv, step.paged)


class TritonLayerOps(TorchLayerOps):
    rope_table: Table[RopeBlock] = ROPE_STORE

    def add_rms_norm(
        self, h: Tensor, delta: Tensor | None, weight: Tensor
    ) -> tuple[Tensor, Tensor]:
        return elementwise.add_rms_norm(h, delta, weight, self.eps)

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
        block = self.rope_table.choose(qkv.shape[0])
        shape = (self.num_heads, self.num_kv_heads, self.head_dim)
        q, k = elementwise.rope_store(
            qkv, q_norm, k_norm, self.inv_freq, positions, slots, (k_cache, v_cache), shape,
            self.eps, block.tokens, block.warps,
        )  # fmt: skip
        kv = self.num_kv_heads * self.head_dim
        v = qkv[:, self.num_heads * self.head_dim + kv :].unflatten(
            -1, (self.num_kv_heads, self.head_dim)
        )
        return q, k, v
