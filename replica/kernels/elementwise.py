"""`TorchOps`' work in three fused Triton kernels (CUDA): add + RMSNorm, SiLU * up, and q/k
norms + RoPE + the K/V cache write; 4-bit projections through replica.kernels.int4_linear. Rounding to the activation dtype happens where transformers
rounds, so results stay within bf16 noise of `TorchOps`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from replica.kernels.int4_linear import gemv_serves, w4a16_gemv, w4a16_linear
from replica.kernels.moe import fused_moe
from replica.ops.layer import TorchOps
from replica.ops.mlp import DenseMLP, SparseMoE
from replica.ops.packed import PackedInt4


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
    DELTA_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    h = tl.load(h_ptr + row * n + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        delta = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(DELTA_ROWS):  # the MoE's k expert outputs of this token
            src = delta_ptr + (row * DELTA_ROWS + j) * n + offs
            delta += tl.load(src, mask=mask, other=0.0).to(tl.float32)
        h = (h.to(tl.float32) + delta.to(h.dtype).to(tl.float32)).to(h.dtype)
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
    row_len: tl.constexpr = (NUM_HEADS + 2 * NUM_KV_HEADS) * dim
    src = qkv_ptr + tokens[:, None] * row_len + head * dim + d[None, :]
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
            DELTA_ROWS=1 if delta is None else delta.shape[0] // rows,
            BLOCK=triton.next_power_of_2(n),
            num_warps=8,
        )
        return h_out, x_out

    def mlp(self, x: Tensor, mlp: DenseMLP | SparseMoE) -> Tensor:
        """A packed dense MLP at a few tokens: SiLU(gate) * up fused into the gate-up GEMV."""
        if isinstance(mlp, DenseMLP) and gemv_serves(x.shape[0], mlp.gate_up):
            return self.linear(w4a16_gemv(x, mlp.gate_up, gated=True), mlp.down)
        return super().mlp(x, mlp)

    def moe(self, x: Tensor, moe: SparseMoE) -> Tensor:
        return fused_moe(x, moe)

    def linear(self, x: Tensor, weight: Tensor | PackedInt4) -> Tensor:
        if isinstance(weight, PackedInt4):
            return w4a16_linear(x, weight)
        return torch.nn.functional.linear(x, weight)

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
        slots: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        tokens, d = qkv.shape[0], self.head_dim
        k_flat, v_flat = k_cache.flatten(0, 1), v_cache.flatten(0, 1)  # views: flat slots
        q = torch.empty(tokens, self.num_heads, d, dtype=qkv.dtype, device=qkv.device)
        k = torch.empty(tokens, self.num_kv_heads, d, dtype=qkv.dtype, device=qkv.device)
        # Decode steps: a program per token and head. Prefill: blocks of tokens, so that a
        # 16k-token prompt batch is not 650k one-warp programs.
        block = 1 if tokens <= 256 else 16
        grid = (triton.cdiv(tokens, block), self.num_heads + self.num_kv_heads)
        _rope_store_kernel[grid](
            qkv,
            q_norm,
            k_norm,
            self.inv_freq,
            positions,
            slots,
            q,
            k,
            k_flat,
            v_flat,
            tokens,
            self.eps,
            k_flat.stride(0),
            k_flat.stride(1),
            NUM_HEADS=self.num_heads,
            NUM_KV_HEADS=self.num_kv_heads,
            HALF=d // 2,
            BLOCK_T=block,
            num_warps=1 if block == 1 else 4,
        )
        kv = self.num_kv_heads * d
        v = qkv[:, self.num_heads * d + kv :].unflatten(-1, (self.num_kv_heads, d))
        return q, k, v
