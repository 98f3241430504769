"""flash-attn: varlen prefill over the packed live tokens, `flash_attn_with_kvcache` decode."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
from torch import Tensor


class FlashAttention:
    name = "flash"

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, lengths: Tensor) -> Tensor:
        width = q.shape[1]
        live = torch.arange(width, device=q.device)[None, :] < lengths[:, None]
        cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        packed = flash_attn_varlen_func(
            q[live], k[live], v[live], cu_seqlens, cu_seqlens, width, width, causal=True
        )
        out = torch.zeros_like(q)
        out[live] = packed
        return out

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
