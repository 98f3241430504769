"""flash-attn: varlen prefill straight over the packed tokens (through the block tables where a
row has context), `flash_attn_with_kvcache` decode over the paged cache.

flash-attn's paged kernels take blocks of a multiple of 256 tokens: the engine sizes its blocks
by `block_size` when this backend is chosen. Not run here (no flash-attn on our machines)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
from torch import Tensor

from replica.ops.attention import BlockTables, LayerCache, PackedRows


class FlashAttention:
    name = "flash"
    block_size = 256

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, kv: LayerCache, rows: PackedRows) -> Tensor:
        cu, width, context = rows.cu_seqlens, rows.max_len, rows.context
        if context is None:
            return flash_attn_varlen_func(q, k, v, cu, cu, width, width, causal=True)
        key_lens = context.lengths + rows.lengths
        cu_keys = F.pad(key_lens.cumsum(0, dtype=torch.int32), (1, 0))
        return flash_attn_varlen_func(
            q,
            kv.k,
            kv.v,
            cu,
            cu_keys,
            width,
            context.max_len + width,
            causal=True,  # bottom-right aligned: each row's queries follow its context
            block_table=context.tables,
        )

    def takes_projection(self, rows: int) -> bool:
        return False

    def decode(self, q: Tensor, kv: LayerCache, paged: BlockTables) -> Tensor:
        out = flash_attn_with_kvcache(
            q[:, None],
            kv.k,
            kv.v,
            cache_seqlens=paged.seq_lens,
            block_table=paged.tables[paged.row_ids],
            causal=True,
        )
        return out[:, 0]
