"""Attention backends behind one interface (replica.backends chooses among them).

Every backend takes queries after RoPE and a KV cache that already holds this step's keys and
values. Prefill attends within each prompt of a packed batch (no padding tokens, so the
projections around attention do no wasted work); decode attends over each row's slot up to its
live length.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
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
    tokens: int

    @classmethod
    def from_lengths(cls, lengths: list[int], device: torch.device) -> PackedRows:
        host = torch.tensor(lengths, dtype=torch.int32)
        starts = F.pad(host.cumsum(0, dtype=torch.int32), (1, 0))
        return cls(host.to(device), starts.to(device), max(lengths), sum(lengths))

    @cached_property
    def padded_index(self) -> Tensor:
        """[T] int64: token t's place in the flattened [B * max_len] layout. Only the padding
        backends need it, so varlen kernels never pay for it."""
        lengths = self.lengths.long()
        rows = torch.arange(lengths.shape[0], device=lengths.device)
        row_offset = rows * self.max_len - self.cu_seqlens[:-1].long()
        within = torch.arange(self.tokens, device=lengths.device)
        return torch.repeat_interleave(row_offset, lengths, output_size=self.tokens) + within

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


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True
