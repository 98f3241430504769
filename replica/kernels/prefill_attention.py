"""Causal prefill attention over packed prompts in one Triton kernel (varlen, GQA-aware).

Program (query block, row, head) walks the row's keys up to the block's diagonal with an online
softmax, reading q/k/v straight from the packed [T, heads, head_dim] tensors: no padding, no
repeated K/V heads, no layout copies. This is what flash-attn's varlen kernel does, for machines
without flash-attn.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from replica.attention import PackedRows
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
    scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    block = tl.program_id(0)
    row = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(cu_ptr + row)
    length = tl.load(cu_ptr + row + 1) - start
    if block * BLOCK_M >= length:
        return
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

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)  # noqa: E741
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    end = tl.minimum((block + 1) * BLOCK_M, length)
    for key_block in range(0, end, BLOCK_N):
        cols = key_block + n_offs
        live = cols < length
        k_tokens = (start + cols).to(tl.int64)
        k = tl.load(
            k_base + k_tokens[:, None] * stride_kt + d[None, :], mask=live[:, None], other=0.0
        )
        v = tl.load(
            v_base + k_tokens[:, None] * stride_vt + d[None, :], mask=live[:, None], other=0.0
        )
        visible = live[None, :] & (cols[None, :] <= m_offs[:, None])
        m, l, acc = attend_block(q, k, v, visible, scale, m, l, acc)  # noqa: E741

    out = acc / l[:, None]
    tl.store(
        out_ptr + q_tokens[:, None] * stride_ot + head * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=q_live[:, None],
    )


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, rows: PackedRows) -> Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] (any token and head strides, last dim contiguous)
    -> [T, Hq, D], causal within each row."""
    _, q_heads, head_dim = q.shape
    out = torch.empty_like(q)
    grid = (triton.cdiv(rows.max_len, BLOCK_M), rows.lengths.shape[0], q_heads)
    _prefill_kernel[grid](
        q,
        k,
        v,
        out,
        rows.cu_seqlens,
        head_dim**-0.5 * LOG2_E,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        GROUP=q_heads // k.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        num_warps=8,
        num_stages=2,
    )
    return out
