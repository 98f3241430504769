"""Causal prefill attention over packed prompts in one Triton kernel (varlen, GQA-aware).

Program (query block, row, head) walks the row's keys up to the block's diagonal with an online
softmax, reading q/k/v straight from the packed [T, heads, head_dim] tensors: no padding, no
repeated K/V heads, no layout copies. This is what flash-attn's varlen kernel does, for machines
without flash-attn. A row with context (a cached prefix, or its earlier chunks) reads every key
through its block table instead, its queries sitting after the context.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from replica.kernels.online_softmax import LOG2_E, attend_block

BLOCK_M = 128
BLOCK_N = 64


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    cu_ptr,
    context_ptr,
    table_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_tr,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    block = tl.program_id(0)
    row = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(cu_ptr + row)
    length = tl.load(cu_ptr + row + 1) - start
    if block * BLOCK_M >= length:
        return
    context = 0
    if PAGED:
        context = tl.load(context_ptr + row)
    kv_head = head // GROUP
    m_offs = block * BLOCK_M + tl.arange(0, BLOCK_M)
    n_offs = tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    q_live = m_offs < length
    q_tokens = (start + m_offs).to(tl.int64)
    q = tl.load(
        q_ptr + q_tokens[:, None] * stride_qt + head * stride_qh + d[None, :],
        mask=q_live[:, None],
        other=0.0,
    )
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    table = table_ptr + row * stride_tr

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)  # noqa: E741
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    end = context + tl.minimum((block + 1) * BLOCK_M, length)
    for key_block in range(0, end, BLOCK_N):
        cols = key_block + n_offs  # key positions in the row: its context, then this chunk
        live = cols < context + length
        if PAGED:  # every key from the cache, through the row's block table
            block_id = tl.load(table + cols // BLOCK_SIZE, mask=live, other=0).to(tl.int64)
            k_at = block_id * stride_kb + (cols % BLOCK_SIZE) * stride_kt
            v_at = block_id * stride_vb + (cols % BLOCK_SIZE) * stride_vt
        else:  # no context: the chunk's own packed keys
            k_at = (start + cols).to(tl.int64) * stride_kt
            v_at = (start + cols).to(tl.int64) * stride_vt
        k = tl.load(k_base + k_at[:, None] + d[None, :], mask=live[:, None], other=0.0)
        v = tl.load(v_base + v_at[:, None] + d[None, :], mask=live[:, None], other=0.0)
        visible = live[None, :] & (cols[None, :] <= context + m_offs[:, None])
        m, l, acc = attend_block(q, k, v, visible, scale, m, l, acc)  # noqa: E741

    out = acc / l[:, None]
    tl.store(
        out_ptr + q_tokens[:, None] * stride_ot + head * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=q_live[:, None],
    )


def prefill_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    lengths: Tensor,
    max_len: int,
    context: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """q [T, Hq, D] -> [T, Hq, D], causal within each prompt: prompt b is tokens
    cu_seqlens[b] .. cu_seqlens[b + 1] (lengths[b] of them, at most `max_len`). Without
    `context`, keys are the packed k/v [T, Hkv, D] (any token and head strides, last dim
    contiguous); with it, (k_cache, v_cache, tables, context_lens): every key comes from the
    paged caches [blocks, block_size, Hkv, D], prompt b's first context_lens[b] tokens (in
    blocks tables[b]) before its chunk."""
    _, q_heads, head_dim = q.shape
    out = torch.empty_like(q)
    grid = (triton.cdiv(max_len, BLOCK_M), lengths.shape[0], q_heads)
    if context is None:
        keys, values = k[:, None], v[:, None]  # [T, 1, H, D]: one "block", strides line up
        context_lens, tables, block_size = lengths, lengths[:, None], 1
    else:
        keys, values, tables, context_lens = context
        block_size = keys.shape[1]
    _prefill_kernel[grid](
        q,
        keys,
        values,
        out,
        cu_seqlens,
        context_lens,
        tables,
        head_dim**-0.5 * LOG2_E,
        q.stride(0),
        q.stride(1),
        tables.stride(0),
        keys.stride(0),
        keys.stride(0) if context is None else keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(0) if context is None else values.stride(1),
        values.stride(2),
        out.stride(0),
        out.stride(1),
        GROUP=q_heads // keys.shape[2],
        HEAD_DIM=head_dim,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        PAGED=context is not None,
        BLOCK_SIZE=block_size,
        num_warps=8,
        num_stages=2,
    )
    return out
