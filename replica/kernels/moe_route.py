"""The fused MoE's routing on CUDA: a program per token files its top-k (token, expert) pairs
in per-expert buckets, for the expert kernels of replica.kernels.moe."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _route_kernel(
    logits_ptr,
    weights_ptr,
    experts_ptr,
    counts_ptr,
    bucket_ptr,
    num_experts,
    bucket_stride,
    TOP_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    logits = tl.load(
        logits_ptr + token * num_experts + experts,
        mask=experts < num_experts,
        other=-float("inf"),
    )
    probs = tl.exp(logits - tl.max(logits, 0))
    probs = probs / tl.sum(probs, 0)
    choices = tl.arange(0, BLOCK_K)
    top_ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    top_probs = tl.zeros([BLOCK_K], dtype=tl.float32)
    remaining = tl.where(experts < num_experts, probs, -1.0)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(remaining, 0)
        top_ids = tl.where(choices == j, best, top_ids)
        top_probs = tl.where(choices == j, tl.max(remaining, 0), top_probs)
        remaining = tl.where(experts == best, -1.0, remaining)
    if NORMALIZE:
        top_probs = top_probs / tl.sum(top_probs, 0)
    live = choices < TOP_K
    pairs = token * TOP_K + choices
    tl.store(weights_ptr + pairs, top_probs, mask=live)
    tl.store(experts_ptr + pairs, top_ids, mask=live)
    place = tl.atomic_add(counts_ptr + top_ids, 1, mask=live)
    tl.store(bucket_ptr + top_ids.to(tl.int64) * bucket_stride + place, pairs, mask=live)


@dataclass(frozen=True)
class Routing:
    """Each (token, expert) pair's routing weight and expert, and the per-expert buckets."""

    weights: Tensor  # [pairs] fp32
    experts: Tensor  # [pairs] int32
    counts: Tensor  # [experts] int32: pairs each expert took
    bucket: Tensor  # [experts, tokens] int32: each expert's pairs, counts[e] of them
    top_k: int


def router_logits(x: Tensor, router: Tensor) -> Tensor:
    """[T, experts] in fp32. bf16 inputs widen to fp32 exactly, so one GEMM that accumulates
    and writes fp32 gives fp32 logits without casting x (cheaper than the cast and an fp32 GEMM
    on a long prefill). CUDA only; the interpreter's CPU runs take the plain way."""
    if x.is_cuda:
        return torch.mm(x, router.t(), out_dtype=torch.float32)
    return torch.nn.functional.linear(x.float(), router.float())


def route_pairs(x: Tensor, router: Tensor, top_k: int, normalize: bool, counts: Tensor) -> Routing:
    """Routes x [T, hidden] over the router [experts, hidden]: softmax, top-k (renormalised when
    `normalize`), each pair filed in its expert's bucket. `counts` [experts] int32 is zeroed and
    written (the caller's buffer: a CUDA graph writes the same one every replay)."""
    tokens = x.shape[0]
    experts = router.shape[0]
    pairs = tokens * top_k
    counts.zero_()
    bucket = torch.empty(experts, tokens, dtype=torch.int32, device=x.device)
    weights = torch.empty(pairs, dtype=torch.float32, device=x.device)
    pair_experts = torch.empty(pairs, dtype=torch.int32, device=x.device)
    _route_kernel[(tokens,)](
        router_logits(x, router),
        weights,
        pair_experts,
        counts,
        bucket,
        experts,
        tokens,
        TOP_K=top_k,
        NORMALIZE=normalize,
        BLOCK_E=triton.next_power_of_2(experts),
        BLOCK_K=triton.next_power_of_2(top_k),
        num_warps=4,
    )
    return Routing(weights, pair_experts, counts, bucket, top_k)
