"""`TorchOps`' work in three fused Triton kernels (CUDA): add + RMSNorm, SiLU * up, and q/k
norms + RoPE + the K/V cache write. Rounding to the activation dtype happens where transformers
rounds, so results stay within bf16 noise of `TorchOps`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from replica.ops import TorchOps


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
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    h = tl.load(h_ptr + row * n + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        h = (
            h.to(tl.float32)
            + tl.load(delta_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
        ).to(h.dtype)
        tl.store(h_out_ptr + row * n + offs, h, mask=mask)
    x = h.to(tl.float32)
    x = (x * tl.rsqrt(tl.sum(x * x, 0) / n + eps)).to(h.dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(
        x_out_ptr + row * n + offs, (w.to(tl.float32) * x.to(tl.float32)).to(h.dtype), mask=mask
    )


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(gate_up_ptr + row * 2 * inter + offs, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * 2 * inter + inter + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(
        out_ptr + row * inter + offs,
        (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype),
        mask=mask,
    )


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
    width,
    eps,
    stride_cs,
    stride_ct,
    stride_ch,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
):
    """Program (token, head): heads [0, NUM_HEADS) are queries, the rest keys (+ their values)."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, HALF)
    dim: tl.constexpr = 2 * HALF
    row_len: tl.constexpr = (NUM_HEADS + 2 * NUM_KV_HEADS) * dim
    src = qkv_ptr + token * row_len + head * dim
    x1 = tl.load(src + d)
    x2 = tl.load(src + HALF + d)
    dtype = x1.dtype
    is_q = head < NUM_HEADS
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    inv_rms = tl.rsqrt((tl.sum(a * a, 0) + tl.sum(b * b, 0)) / dim + eps)
    w1 = tl.where(is_q, tl.load(q_norm_ptr + d), tl.load(k_norm_ptr + d)).to(tl.float32)
    w2 = tl.where(is_q, tl.load(q_norm_ptr + HALF + d), tl.load(k_norm_ptr + HALF + d))
    a = (w1 * (a * inv_rms).to(dtype).to(tl.float32)).to(dtype)
    b = (w2.to(tl.float32) * (b * inv_rms).to(dtype).to(tl.float32)).to(dtype)
    pos = tl.load(pos_ptr + token)
    angle = pos.to(tl.float32) * tl.load(inv_freq_ptr + d)
    cos = tl.cos(angle).to(dtype).to(tl.float32)
    sin = tl.sin(angle).to(dtype).to(tl.float32)
    a32 = a.to(tl.float32)
    b32 = b.to(tl.float32)
    out1 = (a32 * cos - b32 * sin).to(dtype)
    out2 = (b32 * cos + a32 * sin).to(dtype)
    if is_q:
        dst = q_out_ptr + (token * NUM_HEADS + head) * dim
        tl.store(dst + d, out1)
        tl.store(dst + HALF + d, out2)
    else:
        kv_head = head - NUM_HEADS
        dst = k_out_ptr + (token * NUM_KV_HEADS + kv_head) * dim
        tl.store(dst + d, out1)
        tl.store(dst + HALF + d, out2)
        slot = tl.load(slot_ptr + token // width).to(tl.int64)
        offset = slot * stride_cs + pos * stride_ct + kv_head * stride_ch
        tl.store(k_cache_ptr + offset + d, out1)
        tl.store(k_cache_ptr + offset + HALF + d, out2)
        v_src = qkv_ptr + token * row_len + (NUM_HEADS + NUM_KV_HEADS + kv_head) * dim
        tl.store(v_cache_ptr + offset + d, tl.load(v_src + d))
        tl.store(v_cache_ptr + offset + HALF + d, tl.load(v_src + HALF + d))


class TritonOps(TorchOps):
    SILU_BLOCK = 1024

    def add_rms_norm(
        self, h: Tensor, delta: Tensor | None, weight: Tensor
    ) -> tuple[Tensor, Tensor]:
        rows, n = h.shape
        h_out = torch.empty_like(h) if delta is not None else h
        x_out = torch.empty_like(h)
        _add_rms_norm_kernel[(rows,)](
            h,
            h if delta is None else delta,
            weight,
            h_out,
            x_out,
            n,
            self.eps,
            HAS_DELTA=delta is not None,
            BLOCK=triton.next_power_of_2(n),
            num_warps=8,
        )
        return h_out, x_out

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
        grid = (rows, triton.cdiv(inter, self.SILU_BLOCK))
        _silu_mul_kernel[grid](gate_up, out, inter, BLOCK=self.SILU_BLOCK, num_warps=4)
        return out

    def rope_store(
        self,
        qkv: Tensor,
        q_norm: Tensor,
        k_norm: Tensor,
        positions: Tensor,
        slot_ids: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        tokens, d = qkv.shape[0], self.head_dim
        q = torch.empty(tokens, self.num_heads, d, dtype=qkv.dtype, device=qkv.device)
        k = torch.empty(tokens, self.num_kv_heads, d, dtype=qkv.dtype, device=qkv.device)
        _rope_store_kernel[(tokens, self.num_heads + self.num_kv_heads)](
            qkv,
            q_norm,
            k_norm,
            self.inv_freq,
            positions,
            slot_ids,
            q,
            k,
            k_cache,
            v_cache,
            positions.shape[1],
            self.eps,
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            NUM_HEADS=self.num_heads,
            NUM_KV_HEADS=self.num_kv_heads,
            HALF=d // 2,
            num_warps=1,
        )
        kv = self.num_kv_heads * d
        v = qkv[:, self.num_heads * d + kv :].unflatten(-1, (self.num_kv_heads, d))
        return q, k, v
