"""Decode attention in Triton: each row reads only its live length, through its block table.

Decode is split-K ("flash decoding"): program (row, kv_head, split) takes one chunk of the row's
live length and all query heads sharing that KV head (GQA: K/V are read once per group), and
writes a partial output with its log-sum-exp; a second kernel merges the splits. Chunk sizes
follow each row's live length, so a short row costs little however long the context could be.
Key t of a row is at offset t % BLOCK_SIZE of block tables[row_id, t // BLOCK_SIZE].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from replica.kernels.launch import multiprocessors
from replica.kernels.online_softmax import LOG2_E, attend_block

BLOCK_N = 64
MAX_SPLITS = 64
WAVES = 4  # programs per multiprocessor to aim for when splitting rows


@triton.jit
def _split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    row_ptr,
    len_ptr,
    part_ptr,
    lse_ptr,
    scale,
    splits,
    stride_qb,
    stride_qh,
    stride_tr,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    table = table_ptr + tl.load(row_ptr + row).to(tl.int64) * stride_tr
    seq_len = tl.load(len_ptr + row)
    chunk = tl.cdiv(tl.cdiv(seq_len, splits), BLOCK) * BLOCK
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK)
    heads = kv_head * GROUP + g
    in_group = g < GROUP
    q = tl.load(
        q_ptr + row * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=in_group[:, None],
        other=0.0,
    )
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)  # noqa: E741
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for block in range(start, end, BLOCK):
        pos = block + n
        live = pos < end
        block_id = tl.load(table + pos // BLOCK_SIZE, mask=live, other=0).to(tl.int64)
        offset = pos % BLOCK_SIZE
        k_at = k_base + block_id * stride_kb + offset * stride_kt
        v_at = v_base + block_id * stride_vb + offset * stride_vt
        k = tl.load(k_at[:, None] + d[None, :], mask=live[:, None], other=0.0)
        v = tl.load(v_at[:, None] + d[None, :], mask=live[:, None], other=0.0)
        m, l, acc = attend_block(q, k, v, live[None, :], scale, m, l, acc)  # noqa: E741

    filled = l > 0
    out = acc / tl.where(filled, l, 1.0)[:, None]
    lse = tl.where(filled, m + tl.log2(l), float("-inf"))
    part = part_ptr + row * stride_pb + heads[:, None] * stride_ph + split * stride_ps + d[None, :]
    tl.store(part, out, mask=in_group[:, None])
    tl.store(lse_ptr + row * stride_lb + heads * stride_lh + split, lse, mask=in_group)


@triton.jit
def _merge_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    splits,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    used = s < splits
    lse = tl.load(lse_ptr + row * stride_lb + head * stride_lh + s, mask=used, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))
    weight = weight / tl.sum(weight, 0)
    part = tl.load(
        part_ptr + row * stride_pb + head * stride_ph + s[:, None] * stride_ps + d[None, :],
        mask=used[:, None],
        other=0.0,
    )
    out = tl.sum(part * weight[:, None], 0)
    tl.store(out_ptr + row * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def num_splits(rows: int, kv_heads: int, device: torch.device, waves: int) -> int:
    """Enough programs to cover the GPU `waves` times over; a fixed number per batch size."""
    sms = multiprocessors(device)
    return max(1, min(MAX_SPLITS, triton.cdiv(waves * sms, rows * kv_heads)))


def decode_attention(
    q: Tensor,
    kv: tuple[Tensor, Tensor],
    tables: Tensor,
    row_ids: Tensor,
    seq_lens: Tensor,
    waves: int = WAVES,
) -> Tensor:
    """q [B, Hq, D] over the first seq_lens[b] tokens of the blocks tables[row_ids[b]] of the
    caches `kv` (K, V) [blocks, block_size, Hkv, D] -> [B, Hq, D]. `waves`: programs per
    multiprocessor to aim for when splitting rows over the sequence."""
    k_cache, v_cache = kv
    rows, q_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    splits = num_splits(rows, kv_heads, q.device, waves)
    q = q.contiguous()
    part = torch.empty(rows, q_heads, splits, head_dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(rows, q_heads, splits, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    _split_kernel[(rows, kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        tables,
        row_ids,
        seq_lens,
        part,
        lse,
        head_dim**-0.5 * LOG2_E,
        splits,
        q.stride(0),
        q.stride(1),
        tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        part.stride(0),
        part.stride(1),
        part.stride(2),
        lse.stride(0),
        lse.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK=BLOCK_N,
        BLOCK_SIZE=block_size,
        num_warps=4,
        num_stages=2,
    )
    _merge_kernel[(rows, q_heads)](
        part,
        lse,
        out,
        splits,
        part.stride(0),
        part.stride(1),
        part.stride(2),
        lse.stride(0),
        lse.stride(1),
        out.stride(0),
        out.stride(1),
        SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
        HEAD_DIM=head_dim,
        num_warps=4,
    )
    return out
