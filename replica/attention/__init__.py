"""Attention backends behind one interface, and the choice among them.

Every backend takes queries after RoPE and a KV cache that already holds this step's keys and
values. Prefill attends within each prompt of a packed batch (no padding tokens, so the
projections around attention do no wasted work); decode attends over each row's slot up to its
live length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PackedRows:
    """Where each prompt lies in a packed [T, ...] tensor: row b is tokens
    cu_seqlens[b] .. cu_seqlens[b + 1]. `pad`/`unpad` convert to and from the right-padded
    [B, max_len, ...] layout that backends without a varlen kernel need."""

    lengths: Tensor  # [B] int32
    cu_seqlens: Tensor  # [B + 1] int32
    max_len: int
    padded_index: Tensor  # [T] int64: token t's place in the flattened [B * max_len] layout

    @classmethod
    def from_lengths(cls, lengths: list[int], device: torch.device) -> PackedRows:
        host = torch.tensor(lengths, dtype=torch.int64)
        starts = F.pad(host.cumsum(0), (1, 0))
        max_len = max(lengths)
        row_offset = torch.arange(len(lengths)) * max_len - starts[:-1]
        padded_index = torch.repeat_interleave(row_offset, host) + torch.arange(int(starts[-1]))
        return cls(
            lengths=host.to(device=device, dtype=torch.int32),
            cu_seqlens=starts.to(device=device, dtype=torch.int32),
            max_len=max_len,
            padded_index=padded_index.to(device),
        )

    @property
    def last_token(self) -> Tensor:
        """[B] index of each row's last token in the packed layout."""
        return self.cu_seqlens[1:].long() - 1

    def pad(self, x: Tensor) -> Tensor:
        """[T, ...] -> [B, max_len, ...], zeros after each row's length."""
        rows = self.lengths.shape[0]
        padded = x.new_zeros(rows * self.max_len, *x.shape[1:])
        padded.index_copy_(0, self.padded_index, x)
        return padded.unflatten(0, (rows, self.max_len))

    def unpad(self, x: Tensor) -> Tensor:
        """[B, max_len, ...] -> [T, ...]."""
        return x.flatten(0, 1).index_select(0, self.padded_index)


class AttentionBackend(Protocol):
    name: str

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, rows: PackedRows) -> Tensor:
        """Causal attention within each row: q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""

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
        from replica.attention.triton_backend import TritonAttention

        return TritonAttention()
    if name == "flash":
        from replica.attention.flash import FlashAttention

        return FlashAttention()
    raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
