"""A layer's elementwise work in three fused Triton kernels (CUDA): add + RMSNorm, SiLU * up, and
q/k norms + RoPE + the K/V cache write. Rounding to the activation dtype happens where
transformers rounds, so results stay within bf16 noise of the PyTorch oracle
(replica.ops.layer)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _add_rms_norm_kernel(
    h_ptr,
    delta_ptr,
    w_ptr,
    h_out_ptr,
    x_out_ptr,
    n,
    eps,
    HAS_DELTA: tl.constexpr,
    DELTAS_PER_TOKEN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    h = tl.load(h_ptr + token * n + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        delta = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(DELTAS_PER_TOKEN):  # the MoE's k expert outputs of this token
            src = delta_ptr + (token * DELTAS_PER_TOKEN + j) * n + offs
            delta += tl.load(src, mask=mask, other=0.0).to(tl.float32)
        h = (h.to(tl.float32) + delta.to(h.dtype).to(tl.float32)).to(h.dtype)
        tl.store(h_out_ptr + token * n + offs, h, mask=mask)
    x = h.to(tl.float32)
    x = (x * tl.rsqrt(tl.sum(x * x, 0) / n + eps)).to(h.dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(
        x_out_ptr + token * n + offs, (w.to(tl.float32) * x.to(tl.float32)).to(h.dtype), mask=mask
    )


@triton.jit
def rounded_silu_mul(gate, up, dtype: tl.constexpr):
    """SiLU(gate) * up in fp32, rounded to `dtype` where transformers' MLP rounds: the gate and
    up projections' outputs and SiLU's (the product: the caller's store)."""
    g = gate.to(dtype).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    return silu * up.to(dtype).to(tl.float32)


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(gate_up_ptr + token * 2 * inter + offs, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + token * 2 * inter + inter + offs, mask=mask, other=0.0)
    product = rounded_silu_mul(gate, up, gate.dtype)
    tl.store(out_ptr + token * inter + offs, product.to(gate.dtype), mask=mask)


@triton.jit
def _rope_store_kernel(
    qkv_ptr,
    q_norm_ptr,
    k_norm_ptr,
    inv_freq_ptr,
    pos_ptr,
    slot_ptr,
    q_out_ptr,
    k_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    num_tokens,
    eps,
    stride_cs,
    stride_ch,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Program (token block, head): heads [0, NUM_HEADS) are queries, the rest keys (+ values)."""
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    live = (tokens < num_tokens)[:, None]
    d = tl.arange(0, HALF)
    dim: tl.constexpr = 2 * HALF
    width: tl.constexpr = (NUM_HEADS + 2 * NUM_KV_HEADS) * dim
    src = qkv_ptr + tokens[:, None] * width + head * dim + d[None, :]
    x1 = tl.load(src, mask=live, other=0.0)
    x2 = tl.load(src + HALF, mask=live, other=0.0)
    dtype = x1.dtype
    is_q = head < NUM_HEADS
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    inv_rms = tl.rsqrt((tl.sum(a * a, 1) + tl.sum(b * b, 1)) / dim + eps)[:, None]
    w1 = tl.where(is_q, tl.load(q_norm_ptr + d), tl.load(k_norm_ptr + d)).to(tl.float32)
    w2 = tl.where(is_q, tl.load(q_norm_ptr + HALF + d), tl.load(k_norm_ptr + HALF + d))
    a = (w1[None, :] * (a * inv_rms).to(dtype).to(tl.float32)).to(dtype)
    b = (w2.to(tl.float32)[None, :] * (b * inv_rms).to(dtype).to(tl.float32)).to(dtype)
    pos = tl.load(pos_ptr + tokens, mask=tokens < num_tokens, other=0)[:, None]
    angle = pos.to(tl.float32) * tl.load(inv_freq_ptr + d)[None, :]
    cos = tl.cos(angle).to(dtype).to(tl.float32)
    sin = tl.sin(angle).to(dtype).to(tl.float32)
    a32 = a.to(tl.float32)
    b32 = b.to(tl.float32)
    out1 = (a32 * cos - b32 * sin).to(dtype)
    out2 = (b32 * cos + a32 * sin).to(dtype)
    if is_q:
        dst = q_out_ptr + (tokens[:, None] * NUM_HEADS + head) * dim + d[None, :]
        tl.store(dst, out1, mask=live)
        tl.store(dst + HALF, out2, mask=live)
    else:
        kv_head = head - NUM_HEADS
        dst = k_out_ptr + (tokens[:, None] * NUM_KV_HEADS + kv_head) * dim + d[None, :]
        tl.store(dst, out1, mask=live)
        tl.store(dst + HALF, out2, mask=live)
        slot = tl.load(slot_ptr + tokens, mask=tokens < num_tokens, other=0).to(tl.int64)
        cache = (slot[:, None] * stride_cs + kv_head * stride_ch) + d[None, :]
        tl.store(k_cache_ptr + cache, out1, mask=live)
        tl.store(k_cache_ptr + cache + HALF, out2, mask=live)
        v_src = src + NUM_KV_HEADS * dim  # this key head's value head
        tl.store(v_cache_ptr + cache, tl.load(v_src, mask=live), mask=live)
        tl.store(v_cache_ptr + cache + HALF, tl.load(v_src + HALF, mask=live), mask=live)


SILU_BLOCK = 1024


def add_rms_norm(
    h: Tensor, delta: Tensor | None, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """(h + delta, rms_norm(h + delta)); `delta` [T * k, hidden] adds the k rows of each token
    (the fused MoE's expert outputs) in order, in fp32."""
    tokens, n = h.shape
    h_out = torch.empty_like(h) if delta is not None else h
    x_out = torch.empty_like(h)
    _add_rms_norm_kernel[(tokens,)](
        h,
        h if delta is None else delta,
        weight,
        h_out,
        x_out,
        n,
        eps,
        HAS_DELTA=delta is not None,
        DELTAS_PER_TOKEN=1 if delta is None else delta.shape[0] // tokens,
        BLOCK=triton.next_power_of_2(n),
        num_warps=8,
    )
    return h_out, x_out


def silu_mul(gate_up: Tensor) -> Tensor:
    """SiLU(gate) * up of gate_up [T, 2 * inter] -> [T, inter]."""
    tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    grid = (tokens, triton.cdiv(inter, SILU_BLOCK))
    _silu_mul_kernel[grid](gate_up, out, inter, BLOCK=SILU_BLOCK, num_warps=4)
    return out


def rope_store(
    qkv: Tensor,
    q_norm: Tensor,
    k_norm: Tensor,
    inv_freq: Tensor,
    positions: Tensor,
    slots: Tensor,
    kv: tuple[Tensor, Tensor],
    shape: tuple[int, int, int],
    eps: float,
    block_tokens: int,
    warps: int,
) -> tuple[Tensor, Tensor]:
    """q/k norms and RoPE on qkv [T, (Hq + 2 Hkv) * D], K and V written to the caches `kv`
    [blocks, block_size, Hkv, D] at flat slots[t]; `shape` (Hq, Hkv, D). Returns q [T, Hq, D]
    and k [T, Hkv, D]. A program takes `block_tokens` tokens of one head."""
    num_heads, num_kv_heads, d = shape
    tokens = qkv.shape[0]
    k_flat, v_flat = kv[0].flatten(0, 1), kv[1].flatten(0, 1)  # views: flat slots
    q = torch.empty(tokens, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(tokens, num_kv_heads, d, dtype=qkv.dtype, device=qkv.device)
    grid = (triton.cdiv(tokens, block_tokens), num_heads + num_kv_heads)
    _rope_store_kernel[grid](
        qkv,
        q_norm,
        k_norm,
        inv_freq,
        positions,
        slots,
        q,
        k,
        k_flat,
        v_flat,
        tokens,
        eps,
        k_flat.stride(0),
        k_flat.stride(1),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=d // 2,
        BLOCK_T=block_tokens,
        num_warps=warps,
    )
    return q, k
