"""The attention backend for CUDA machines without flash-attn: both kernels are our Triton."""

from __future__ import annotations

import torch
from torch import Tensor

from replica.kernels.decode_attention import Rope, decode_attention
from replica.kernels.prefill_attention import prefill_attention
from replica.ops.attention import BlockTables, LayerCache, PackedRows
from replica.ops.tables import decode_table

TICKETS = 1 << 16  # rows x KV heads the splits can merge in their launch (256 KiB a device)


class TritonAttention:
    """Varlen causal prefill over the packed chunks (through the block tables where a row has
    context); split-K decode over each row's live length, through its block table, merging its
    splits and taking the projection itself (`takes_projection`) where
    `tables.ATTENTION_DECODE` says."""

    name = "triton"
    block_size = None  # any

    def __init__(self) -> None:
        self._tickets: dict[torch.device, Tensor] = {}

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, kv: LayerCache, rows: PackedRows) -> Tensor:
        context = rows.context
        cached = None if context is None else (kv.k, kv.v, context.tables, context.lengths)
        return prefill_attention(q, k, v, rows.cu_seqlens, rows.lengths, rows.max_len, cached)

    def decode(
        self, q: Tensor, kv: LayerCache, paged: BlockTables, rope: Rope | None = None
    ) -> Tensor:
        """`rope`: q is the projection qkv, normed and rotated in the launch, which writes the
        new K/V (where `takes_projection`)."""
        rows, kv_heads = q.shape[0], kv.k.shape[2]
        merged = decode_table().choose(rows).merged and rows * kv_heads <= TICKETS
        tickets = self._device_tickets(q.device) if merged else None
        return decode_attention(
            q, kv, paged.tables, paged.row_ids, paged.seq_lens, tickets=tickets, rope=rope
        )

    def takes_projection(self, rows: int) -> bool:
        """Whether a decode step of `rows` rows gives `decode` the projection and a `rope`."""
        return decode_table().choose(rows).roped

    def _device_tickets(self, device: torch.device) -> Tensor:
        """The merging splits' tickets, zero between launches: one buffer a device (its layers'
        launches run one after another), made on its first decode call, which is eager (a stage
        runs every graph's step before capturing), so every CUDA graph reads the same one."""
        tickets = self._tickets.get(device)
        if tickets is None:
            tickets = self._tickets[device] = torch.zeros(TICKETS, dtype=torch.int32, device=device)
        return tickets
