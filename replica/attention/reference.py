"""Plain SDPA with explicit masks: the reference every other backend is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from replica.attention import PackedRows


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
    """Reads whole padded rows and whole slots, masking what is not live. Slow and obviously right."""

    name = "reference"

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, rows: PackedRows) -> Tensor:
        pos = torch.arange(rows.max_len, device=q.device)
        causal = pos[None, :, None] >= pos[None, None, :]
        live = pos[None, None, :] < rows.lengths[:, None, None]
        return rows.unpad(_sdpa(rows.pad(q), rows.pad(k), rows.pad(v), causal & live))

    def decode(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, slot_ids: Tensor, seq_lens: Tensor
    ) -> Tensor:
        k, v = k_cache[slot_ids], v_cache[slot_ids]
        pos = torch.arange(k.shape[1], device=q.device)
        live = pos[None, None, :] < seq_lens[:, None, None]
        return _sdpa(q[:, None], k, v, live)[:, 0]
