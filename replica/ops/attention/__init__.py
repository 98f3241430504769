"""Attention backends behind one interface (replica.ops.select chooses among them).

Every backend takes queries after RoPE and a KV cache that already holds this step's keys and
values. Prefill attends within each prompt of a packed batch (no padding tokens, so the
projections around attention do no wasted work), over what each row already holds in the cache;
decode attends over each row's blocks up to its live length.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class LayerCache(NamedTuple):
    """One layer's K and V blocks, [blocks, block_size, Hkv, D] each."""

    k: Tensor
    v: Tensor


@dataclass(frozen=True)
class BlockTables:
    """Where each decode row reads: row b attends over the first seq_lens[b] tokens of the
    blocks tables[row_ids[b]]."""

    tables: Tensor  # [table rows, blocks per sequence] int32
    row_ids: Tensor  # [B] int64
    seq_lens: Tensor  # [B] int32


class DecodeStep(NamedTuple):
    """A decode step's new tokens: their positions (RoPE), the flat KV slots they write, and the
    blocks each row reads."""

    positions: Tensor  # [B] int64
    slots: Tensor  # [B] int64
    paged: BlockTables


@dataclass(frozen=True)
class CachedContext:
    """What each prefill row already holds in the cache before this chunk: row b's first
    `lengths[b]` tokens, in blocks `tables[b]` (a cached prefix, or its earlier chunks)."""

    tables: Tensor  # [B, blocks] int32 (zero past a row's own blocks)
    lengths: Tensor  # [B] int32
    max_len: int

    @classmethod
    def from_blocks(
        cls, blocks: list[list[int]], lengths: list[int], device: torch.device
    ) -> CachedContext:
        width = max(len(b) for b in blocks)
        tables = torch.tensor([b + [0] * (width - len(b)) for b in blocks], dtype=torch.int32)
        host = torch.tensor(lengths, dtype=torch.int32)
        return cls(tables.to(device), host.to(device), max(lengths))


@dataclass(frozen=True)
class PackedRows:
    """Where each prompt's new tokens lie in a packed [T, ...] tensor: row b is tokens
    cu_seqlens[b] .. cu_seqlens[b + 1], after what `context` says it already holds in the
    cache (None: nothing). `pad`/`unpad` convert to and from the right-padded [B, max_len, ...]
    layout that backends without a varlen kernel need."""

    lengths: Tensor  # [B] int32
    cu_seqlens: Tensor  # [B + 1] int32
    max_len: int
    tokens: int
    context: CachedContext | None = None

    @classmethod
    def from_lengths(
        cls, lengths: list[int], device: torch.device, context: CachedContext | None = None
    ) -> PackedRows:
        host = torch.tensor(lengths, dtype=torch.int32)
        starts = F.pad(host.cumsum(0, dtype=torch.int32), (1, 0))
        return cls(host.to(device), starts.to(device), max(lengths), sum(lengths), context)

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
    """Caches are [blocks, block_size, Hkv, D]: token t of a sequence is at offset
    t % block_size of its block t // block_size."""

    name: str
    block_size: int | None  # the block size its kernels need (None: any)

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, kv: LayerCache, rows: PackedRows) -> Tensor:
        """Causal attention of each row's new tokens over its context and themselves:
        q [T, Hq, D], k/v [T, Hkv, D] (also already in `kv`) -> [T, Hq, D]."""

    def decode(self, q: Tensor, kv: LayerCache, paged: BlockTables) -> Tensor:
        """One query per row: q [B, Hq, D] -> [B, Hq, D]. A backend that `takes_projection`
        also takes a `rope` (replica.kernels.decode_attention.Rope), q then the projection."""

    def takes_projection(self, rows: int) -> bool:
        """Whether its decode of `rows` rows takes the projection qkv and does the q/k norms,
        RoPE and the K/V write itself (else the layer's rope_store does them first)."""


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True
