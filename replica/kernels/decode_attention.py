"""Decode attention in Triton: each row reads only its live length, through its block table.

Decode is split-K ("flash decoding"): program (row, kv_head, split) takes one chunk of the row's
live length and all query heads sharing that KV head (GQA: K/V are read once per group), and
writes a partial output with its log-sum-exp. The splits are merged by a second kernel, or, given
a ticket per (row, KV head), by the split that finishes last. Given a `Rope`, the kernel takes
the layer's projection qkv instead of q: it norms and rotates q and the new key itself and writes
the new K/V (else rope_store's kernel does, before it). A decode step's attention can so be one
launch a layer instead of three small ones. Chunk sizes follow each row's live length, so a short
row costs little however long the context could be. Key t of a row is at offset t % BLOCK_SIZE of
block tables[row_id, t // BLOCK_SIZE].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from replica.kernels.launch import multiprocessors
from replica.kernels.online_softmax import LOG2_E, attend_block

BLOCK_N = 64
MAX_SPLITS = 64
WAVES = 4  # programs per multiprocessor to aim for when splitting rows
MERGE_TILE = 8192  # partial outputs' elements the merging split reads at once (64 registers)


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
    out_ptr,  # MERGE: [B, Hq, D] in q's dtype; else unused
    ticket_ptr,  # MERGE: [B * Hkv] int32, zero between calls; else unused
    q_norm_ptr,  # ROPE (q_ptr the projection qkv [B, (Hq + 2 Hkv) * D]): [D]; else unused
    k_norm_ptr,  # ROPE: [D]
    inv_freq_ptr,  # ROPE: [D / 2] fp32
    pos_ptr,  # ROPE: [B] each row's new token's position
    slot_ptr,  # ROPE: [B] its flat slot in the caches (block * BLOCK_SIZE + offset)
    eps,
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
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    MERGE: tl.constexpr,  # the last split merges (ticket_ptr); else _merge_kernel does
    MERGE_HEADS: tl.constexpr,  # GROUP's power of two
    MERGE_SPLITS: tl.constexpr,  # splits the last one reads at once
    ROPE: tl.constexpr,  # q_ptr is the projection: q/k norms, RoPE and the K/V write here
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
    q_at = q_ptr + row * stride_qb + heads[:, None] * stride_qh
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    if ROPE:
        position = tl.load(pos_ptr + row)
        q = _normed_roped(
            q_at, in_group[:, None], q_norm_ptr, inv_freq_ptr, position, eps, HEAD_DIM
        )
        if (start <= seq_len - 1) & (seq_len - 1 < end):  # the split that reads the new token
            new_at = q_ptr + row * stride_qb + (GROUP * tl.num_programs(1) + kv_head) * HEAD_DIM
            one = tl.zeros([1, 1], tl.int32)
            k_new = _normed_roped(
                new_at + one, one == 0, k_norm_ptr, inv_freq_ptr, position, eps, HEAD_DIM
            )
            slot = tl.load(slot_ptr + row).to(tl.int64)
            new_block, new_offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
            tl.store(
                k_base + new_block * stride_kb + new_offset * stride_kt + one + d[None, :], k_new
            )
            v_new = tl.load(new_at + tl.num_programs(1) * HEAD_DIM + d)  # its value head's
            tl.store(v_base + new_block * stride_vb + new_offset * stride_vt + d, v_new)
            tl.debug_barrier()  # written before any thread of this program reads it
    else:
        q = tl.load(q_at + d[None, :], mask=in_group[:, None], other=0.0)

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
    if MERGE:
        tl.debug_barrier()  # every thread's partial stored before the ticket releases it
        ticket = ticket_ptr + row * tl.num_programs(1) + kv_head
        if tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu") == splits - 1:
            tl.store(ticket, 0)
            live_splits = tl.cdiv(seq_len, tl.maximum(chunk, 1))  # none past it hold anything
            mine = tl.arange(0, MERGE_HEADS)  # the group's heads, padded less than GROUP_PAD
            merged = _merged(
                part_ptr + row * stride_pb, lse_ptr + row * stride_lb, kv_head * GROUP + mine,
                mine < GROUP, live_splits, stride_ph, stride_ps, stride_lh, HEAD_DIM,
                MERGE_SPLITS,
            )  # fmt: skip
            at = out_ptr + row * stride_ob + (kv_head * GROUP + mine)[:, None] * stride_oh
            tl.store(
                at + d[None, :], merged.to(out_ptr.dtype.element_ty), mask=(mine < GROUP)[:, None]
            )


@triton.jit
def _normed_roped(at, live, norm_ptr, inv_freq_ptr, position, eps, HEAD_DIM: tl.constexpr):
    """Heads at pointers `at` [H, 1] (each HEAD_DIM wide, those `live`) RMS-normed by the weight
    at norm_ptr, then rotated by RoPE at `position`, rounded where replica.kernels.elementwise's
    q/k norm + RoPE kernel rounds (transformers' order): [H, HEAD_DIM] in their dtype. Each
    element's partner in the rotation (d + HEAD_DIM / 2 mod HEAD_DIM) is loaded as its own
    element (no shuffle of registers)."""
    half: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HEAD_DIM)
    partner = (d + half) % HEAD_DIM
    x = tl.load(at + d[None, :], mask=live, other=0.0)
    dtype = x.dtype
    x_partner = tl.load(at + partner[None, :], mask=live, other=0.0).to(tl.float32)
    x = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, 1) / HEAD_DIM + eps)[:, None]
    normed = tl.load(norm_ptr + d).to(tl.float32)[None, :] * (x * inv_rms).to(dtype).to(tl.float32)
    partner_normed = tl.load(norm_ptr + partner).to(tl.float32)[None, :] * (
        (x_partner * inv_rms).to(dtype).to(tl.float32)
    )
    angle = position.to(tl.float32) * tl.load(inv_freq_ptr + d % half)[None, :]
    cos = tl.cos(angle).to(dtype).to(tl.float32)
    sin = tl.sin(angle).to(dtype).to(tl.float32)
    normed = normed.to(dtype).to(tl.float32)
    partner_normed = partner_normed.to(dtype).to(tl.float32)
    rotated = tl.where(d[None, :] < half, -partner_normed, partner_normed)  # rotate_half
    return (normed * cos + rotated * sin).to(dtype)


@triton.jit
def _merged(
    part_ptr, lse_ptr, heads, head_live, splits, stride_ph, stride_ps, stride_lh,
    HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    """[heads, HEAD_DIM] fp32: the first `splits` partial outputs of `heads` (one row's
    pointers) weighted by their log-sum-exps, SPLITS at a time (L2 reads: other programs may
    have written them)."""
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, HEAD_DIM)
    m = tl.full(heads.shape, float("-inf"), tl.float32)
    total = tl.zeros(heads.shape, tl.float32)
    acc = tl.zeros([heads.shape[0], HEAD_DIM], tl.float32)
    for s0 in range(0, splits, SPLITS):
        used = ((s0 + s) < splits)[:, None] & head_live[None, :]  # [SPLITS, heads]
        lse_at = lse_ptr + heads[None, :] * stride_lh + (s0 + s)[:, None]
        lse = tl.load(lse_at, mask=used, other=float("-inf"), cache_modifier=".cg")
        part_at = part_ptr + heads[None, :, None] * stride_ph + (s0 + s)[:, None, None] * stride_ps
        part = tl.load(
            part_at + d[None, None, :], mask=used[:, :, None], other=0.0, cache_modifier=".cg"
        )
        m_new = tl.maximum(m, tl.max(lse, 0))
        top = tl.where(m_new == float("-inf"), 0.0, m_new)  # a head with nothing yet
        alpha = tl.exp2(m - top)
        weight = tl.exp2(lse - top[None, :])
        total = total * alpha + tl.sum(weight, 0)
        acc = acc * alpha[:, None] + tl.sum(part * weight[:, :, None], 0)
        m = m_new
    return acc / tl.where(total > 0, total, 1.0)[:, None]


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
    heads = tl.program_id(1) + tl.arange(0, 1)
    merged = _merged(
        part_ptr + row * stride_pb, lse_ptr + row * stride_lb, heads, heads >= 0, splits,
        stride_ph, stride_ps, stride_lh, HEAD_DIM, SPLITS_PAD,
    )  # fmt: skip
    d = tl.arange(0, HEAD_DIM)
    at = out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :]
    tl.store(at, merged.to(out_ptr.dtype.element_ty))


def num_splits(rows: int, kv_heads: int, device: torch.device, waves: int) -> int:
    """Enough programs to cover the GPU `waves` times over; a fixed number per batch size."""
    sms = multiprocessors(device)
    return max(1, min(MAX_SPLITS, triton.cdiv(waves * sms, rows * kv_heads)))


@dataclass(frozen=True)
class Rope:
    """What the split kernel needs to take the projection qkv [B, (Hq + 2 Hkv) * D] as its
    queries: it RMS-norms and rotates q and the row's new key itself and writes the new K/V to
    the caches (the work of replica.kernels.elementwise.rope_store, a launch less a layer)."""

    q_heads: int
    q_norm: Tensor  # [D]
    k_norm: Tensor  # [D]
    inv_freq: Tensor  # [D / 2] fp32
    positions: Tensor  # [B] the new tokens' positions (each row's live length - 1)
    slots: Tensor  # [B] their flat slots in the caches
    eps: float


def decode_attention(
    q: Tensor,
    kv: tuple[Tensor, Tensor],
    tables: Tensor,
    row_ids: Tensor,
    seq_lens: Tensor,
    waves: int = WAVES,
    tickets: Tensor | None = None,
    rope: Rope | None = None,
) -> Tensor:
    """q [B, Hq, D] over the first seq_lens[b] tokens of the blocks tables[row_ids[b]] of the
    caches `kv` (K, V) [blocks, block_size, Hkv, D] -> [B, Hq, D]. `waves`: programs per
    multiprocessor to aim for when splitting rows over the sequence. `tickets` (int32 zeros, at
    least B * Hkv, the caller's: a CUDA graph replays with the same ones): the splits merged in
    the same launch. `rope`: q is the projection qkv, normed, rotated and its K/V written here."""
    k_cache, v_cache = kv
    block_size, kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    rows = q.shape[0]
    if rope is None:
        q = q.contiguous()
        q_heads, (stride_qb, stride_qh) = q.shape[1], q.stride()[:2]
    else:
        assert q.stride(-1) == 1 and q.shape[1] == (rope.q_heads + 2 * kv_heads) * head_dim
        q_heads, (stride_qb, stride_qh) = rope.q_heads, (q.stride(0), head_dim)
    group = q_heads // kv_heads
    splits = num_splits(rows, kv_heads, q.device, waves)
    part = torch.empty(rows, q_heads, splits, head_dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(rows, q_heads, splits, device=q.device, dtype=torch.float32)
    out = torch.empty(rows, q_heads, head_dim, device=q.device, dtype=q.dtype)
    merge = tickets is not None
    if merge:
        assert tickets.numel() >= rows * kv_heads and tickets.dtype == torch.int32
    merge_heads = triton.next_power_of_2(group)
    unused = lse
    rotation = (
        (unused,) * 5 + (0.0,)
        if rope is None
        else (rope.q_norm, rope.k_norm, rope.inv_freq, rope.positions, rope.slots, rope.eps)
    )
    _split_kernel[(rows, kv_heads, splits)](
        q, k_cache, v_cache, tables, row_ids, seq_lens, part, lse, out,
        tickets if merge else unused, *rotation, head_dim**-0.5 * LOG2_E, splits,
        stride_qb, stride_qh, tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK=BLOCK_N, BLOCK_SIZE=block_size, MERGE=merge, MERGE_HEADS=merge_heads,
        MERGE_SPLITS=max(1, min(MERGE_TILE // (merge_heads * head_dim), splits_pad(splits))),
        ROPE=rope is not None, num_warps=4, num_stages=2,
    )  # fmt: skip
    if not merge:
        _merge_kernel[(rows, q_heads)](
            part, lse, out, splits, part.stride(0), part.stride(1), part.stride(2),
            lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
            SPLITS_PAD=splits_pad(splits), HEAD_DIM=head_dim, num_warps=4,
        )  # fmt: skip
    return out


def splits_pad(splits: int) -> int:
    return max(2, triton.next_power_of_2(splits))
