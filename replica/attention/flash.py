"""flash-attn: varlen prefill straight over the packed tokens, `flash_attn_with_kvcache` decode."""

from __future__ import annotations

import torch
from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
from torch import Tensor

from replica.attention import PackedRows


class FlashAttention:
    name = "flash"

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, rows: PackedRows) -> Tensor:
        cu, width = rows.cu_seqlens, rows.max_len
        return flash_attn_varlen_func(q, k, v, cu, cu, width, width, causal=True)

    def decode(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, slot_ids: Tensor, seq_lens: Tensor
    ) -> Tensor:
        out = flash_attn_with_kvcache(
            q[:, None],
            k_cache,
            v_cache,
            cache_seqlens=seq_lens,
            cache_batch_idx=slot_ids.to(torch.int32),
            causal=True,
        )
        return out[:, 0]
