"""Attention backends behind one interface, and the choice among them.

Every backend takes queries after RoPE and a KV cache that already holds this step's keys and
values. Prefill attends within each (right-padded) prompt; decode attends over each row's slot
up to its live length.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class AttentionBackend(Protocol):
    name: str

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, lengths: Tensor) -> Tensor:
        """Causal attention within each row: q [B, L, Hq, D], k/v [B, L, Hkv, D] -> [B, L, Hq, D].

        Rows are right-padded to L; outputs at positions >= lengths[b] are unspecified.
        """

    def decode(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, slot_ids: Tensor, seq_lens: Tensor
    ) -> Tensor:
        """One query per row over its slot: q [B, Hq, D], caches [slots, T, Hkv, D] -> [B, Hq, D].

        Row b reads k_cache[slot_ids[b], :seq_lens[b]].
        """


BACKENDS = ("reference", "triton", "flash")


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(device: torch.device, name: str | None = None) -> AttentionBackend:
    """`name` if given; else flash-attn when it imports, then Triton on CUDA; CPU: reference."""
    if name is None:
        if device.type != "cuda":
            name = "reference"
        else:
            name = "flash" if flash_attn_available() else "triton"
    if name == "reference":
        from replica.attention.reference import ReferenceAttention

        return ReferenceAttention()
    if name == "triton":
        from replica.attention.triton_decode import TritonAttention

        return TritonAttention()
    if name == "flash":
        from replica.attention.flash import FlashAttention

        return FlashAttention()
    raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
