"""The step both attention kernels share: one block of keys folded into a flash-attention
online softmax (base-2 exponentials; the caller folds log2(e) into `scale`)."""

from __future__ import annotations

import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


@triton.jit
def attend_block(q, k, v, visible, scale, m, l, acc):  # noqa: E741
    """q [M, D] against k/v [N, D] where `visible` [M, N]; returns the updated running max `m`,
    normaliser `l` and unnormalised output `acc`."""
    s = tl.where(visible, tl.dot(q, tl.trans(k)) * scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m - m_new)
    l = l * alpha + tl.sum(p, 1)  # noqa: E741
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l, acc
