"""Which implementation runs each part of a step on this device, chosen once when the engine is
built: on CUDA our Triton kernels (and flash-attn's attention when it imports), on the CPU the
plain PyTorch paths of replica.model and replica.ops.attention.reference, which are also the oracles
every GPU implementation is tested against."""

from __future__ import annotations

import torch

from replica.kernels.elementwise import TritonOps
from replica.kernels.sampling import sample_triton
from replica.ops.attention import AttentionBackend, flash_attn_available
from replica.ops.attention.reference import ReferenceAttention
from replica.ops.attention.triton_backend import TritonAttention
from replica.ops.layer import TorchOps
from replica.ops.sampler import Sampler, sample

ATTENTION_BACKENDS = ("reference", "triton", "flash")


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


def select_ops(device: torch.device) -> type[TorchOps]:
    """The layers' elementwise work and MoE: three fused Triton kernels on CUDA."""
    return TritonOps if device.type == "cuda" else TorchOps


def select_sampler(device: torch.device) -> Sampler:
    """Per-row sampling: one Triton launch per step on CUDA."""
    return sample_triton if device.type == "cuda" else sample
