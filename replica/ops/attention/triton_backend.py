"""The attention backend for CUDA machines without flash-attn: both kernels are our Triton."""

from __future__ import annotations

from torch import Tensor

from replica.kernels.decode_attention import decode_attention
from replica.kernels.prefill_attention import prefill_attention
from replica.ops.attention import BlockTables, LayerCache, PackedRows


class TritonAttention:
    """Varlen causal prefill over the packed chunks (through the block tables where a row has
    context); split-K decode over each row's live length, through its block table."""

    name = "triton"
    block_size = None  # any

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, kv: LayerCache, rows: PackedRows) -> Tensor:
        context = rows.context
        cached = None if context is None else (kv.k, kv.v, context.tables, context.lengths)
        return prefill_attention(q, k, v, rows.cu_seqlens, rows.lengths, rows.max_len, cached)

    def decode(self, q: Tensor, kv: LayerCache, paged: BlockTables) -> Tensor:
        return decode_attention(q, kv, paged.tables, paged.row_ids, paged.seq_lens)
