"""Plain SDPA with explicit masks: the reference every other backend is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from replica.ops.attention import BlockTables, LayerCache, PackedRows


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D], mask [B, Lq, Lk] (True = attend) -> [B, Lq, Hq, D]."""
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None]
    )
    return out.transpose(1, 2)


class ReferenceAttention:
    """Gathers whole padded rows and whole block tables, masking what is not live. Slow and
    obviously right."""

    name = "reference"
    block_size = None  # any

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, kv: LayerCache, rows: PackedRows) -> Tensor:
        pos = torch.arange(rows.max_len, device=q.device)
        live = pos[None, :, None] < rows.lengths[:, None, None]
        context = rows.context
        if context is None:
            causal = pos[None, :, None] >= pos[None, None, :]
            return rows.unpad(_sdpa(rows.pad(q), rows.pad(k), rows.pad(v), causal & live))
        keys, values = _gather(kv.k, context.tables), _gather(kv.v, context.tables)
        key_pos = torch.arange(keys.shape[1], device=q.device)
        query_pos = context.lengths[:, None, None] + pos[None, :, None]
        visible = (key_pos[None, None, :] <= query_pos) & live
        return rows.unpad(_sdpa(rows.pad(q), keys, values, visible))

    def takes_projection(self, rows: int) -> bool:
        return False

    def decode(self, q: Tensor, kv: LayerCache, paged: BlockTables) -> Tensor:
        tables = paged.tables[paged.row_ids]
        k, v = _gather(kv.k, tables), _gather(kv.v, tables)
        pos = torch.arange(k.shape[1], device=q.device)
        live = pos[None, None, :] < paged.seq_lens[:, None, None]
        return _sdpa(q[:, None], k, v, live)[:, 0]


def _gather(cache: Tensor, tables: Tensor) -> Tensor:
    """[blocks, block_size, H, D] read through tables [B, W] -> [B, W * block_size, H, D]."""
    return cache[tables.long()].flatten(1, 2)
