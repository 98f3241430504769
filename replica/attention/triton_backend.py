"""The attention backend for CUDA machines without flash-attn: both kernels are our Triton."""

from __future__ import annotations

from torch import Tensor

from replica.attention import CachedContext, PackedRows
from replica.kernels.decode_attention import decode_attention
from replica.kernels.prefill_attention import prefill_attention


class TritonAttention:
    """Varlen causal prefill over the packed chunks (through the block tables where a row has
    context); split-K decode over each row's live length, through its block table."""

    name = "triton"
    block_size = None  # any

    def prefill(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        rows: PackedRows,
        context: CachedContext | None,
    ) -> Tensor:
        return prefill_attention(q, k, v, rows, k_cache, v_cache, context)

    def decode(
        self,
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        tables: Tensor,
        row_ids: Tensor,
        seq_lens: Tensor,
    ) -> Tensor:
        return decode_attention(q, k_cache, v_cache, tables, row_ids, seq_lens)
