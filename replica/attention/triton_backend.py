"""The attention backend for CUDA machines without flash-attn: both kernels are our Triton."""

from __future__ import annotations

from torch import Tensor

from replica.attention import PackedRows
from replica.kernels.decode_attention import decode_attention
from replica.kernels.prefill_attention import prefill_attention


class TritonAttention:
    """Varlen causal prefill over the packed prompts; split-K decode over each row's live length."""

    name = "triton"

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, rows: PackedRows) -> Tensor:
        return prefill_attention(q, k, v, rows)

    def decode(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, slot_ids: Tensor, seq_lens: Tensor
    ) -> Tensor:
        return decode_attention(q, k_cache, v_cache, slot_ids, seq_lens)
