"""Which implementation runs each op on this device, chosen once when the engine is built: on
CUDA our Triton kernels (and flash-attn's attention when it imports), on the CPU the plain
PyTorch paths, which are also the oracles every GPU implementation is tested against. Within an
op, which kernel serves which size is replica.ops.tables' to say."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from replica.kernels.sampling import sample_triton
from replica.ops.attention import AttentionBackend, flash_attn_available
from replica.ops.attention.reference import ReferenceAttention
from replica.ops.attention.triton_backend import TritonAttention
from replica.ops.feed_forward import TorchMLP, TorchMoE, TritonMLP, TritonMoE
from replica.ops.layer import TorchLayerOps, TritonLayerOps
from replica.ops.linear import TorchLinear, TritonLinear
from replica.ops.mlp import DenseMLP
from replica.ops.packed import PackedInt4
from replica.ops.sampler import CANDIDATES, Sampler, sample

ATTENTION_BACKENDS = ("reference", "triton", "flash")


@dataclass(frozen=True)
class Ops:
    """Every op a forward and a decode step run, for one device.

    - `attention`: `.prefill(q, k, v, kv, rows)`, `.decode(q, kv, paged)`, `.name`, `.block_size`;
    - `sampler(logits, temperature, top_k, top_p, seeds, positions) -> tokens`;
    - `linear(x, weight) -> x @ weight.T`, 16-bit or packed;
    - `mlp(x, DenseMLP) -> [T, hidden]`;
    - `moe(x, SparseMoE, decode) -> [T, hidden]` (CPU) or [T * top_k, hidden] (the fused
      experts' pairs, summed by the next add + RMSNorm); `decode`: a decode step; and, where
      `.takes_residual(h, decode)`, `.from_residual((h, delta, weight, eps), moe, decode)`:
      the add + RMSNorm before it in the routing's launch;
    - `layer(num_heads, num_kv_heads, head_dim, eps, inv_freq)`: the layer's elementwise ops,
      `.add_rms_norm(h, delta, weight)` and `.rope_store(qkv, q_norm, k_norm, positions, slots,
      k_cache, v_cache)`, and `.attend_decode(attention, qkv, norms, kv, step)`: rope_store
      then the backend's decode, or our decode kernel doing both.
    """

    attention: AttentionBackend
    sampler: Sampler
    linear: Callable[[Tensor, Tensor | PackedInt4], Tensor]
    mlp: Callable[[Tensor, DenseMLP], Tensor]
    moe: TorchMoE
    layer: type[TorchLayerOps]


def select_ops(device: torch.device, attention: str | None = None) -> Ops:
    """The ops for `device`; `attention` names a backend (None: the best that runs here)."""
    backend = select_attention(device, attention)
    if device.type != "cuda":
        linear = TorchLinear()
        return Ops(backend, sample, linear, TorchMLP(linear), TorchMoE(), TorchLayerOps)
    sampler = partial(sample_triton, candidates=CANDIDATES)
    triton_linear = TritonLinear()
    mlp = TritonMLP(triton_linear)
    return Ops(backend, sampler, triton_linear, mlp, TritonMoE(), TritonLayerOps)


def select_attention(device: torch.device, name: str | None = None) -> AttentionBackend:
    """`name` if given; else flash-attn when it imports, then Triton on CUDA; CPU: reference."""
    if name is None:
        if device.type != "cuda":
            name = "reference"
        else:
            name = "flash" if flash_attn_available() else "triton"
    if name == "reference":
        return ReferenceAttention()
    if name == "triton":
        return TritonAttention()
    if name == "flash":
        from replica.ops.attention.flash import FlashAttention  # flash-attn is optional

        return FlashAttention()
    raise ValueError(f"unknown attention backend {name!r}; choose from {ATTENTION_BACKENDS}")
