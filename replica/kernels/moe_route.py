"""The fused MoE's routing on CUDA: each token's top-k (token, expert) pairs, filed in
per-expert buckets for the expert kernels of replica.kernels.moe. Two ways (`route_pairs`):

- without a ticket: the router's GEMM (cuBLAS), counts zeroed, then a program a token that
  files its pairs by atomics on the counts: three launches;
- with a ticket (at most `FUSED_MAX_TOKENS` tokens, a decode step's): one launch. Each program
  takes `ROUTER_ROWS` experts' logits over a slice of the hidden size; the program that
  finishes last (it draws the last ticket) sums the slices in a fixed order, takes every
  token's top-k and files the pairs in token order, so the counts need no memset and the
  buckets no atomics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

FUSED_MAX_TOKENS = 64
ROUTER_ROWS = 16  # experts a program of the fused routing takes (tl.dot's least width)
HIDDEN_STEP = 64
MAX_SLICES = 8  # of the hidden size: 8 x 8 programs for 128 experts


@triton.jit
def _softmax_top_k(
    logits,  # [ROWS, BLOCK_E] fp32, -inf past the experts
    experts,  # [BLOCK_E]
    num_experts,
    ROWS: tl.constexpr,
    TOP_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """([ROWS, BLOCK_K] routing weights, [ROWS, BLOCK_K] experts): each row's softmax, its
    TOP_K most probable experts in order, renormalised when NORMALIZE."""
    probs = tl.exp(logits - tl.max(logits, 1)[:, None])
    probs = probs / tl.sum(probs, 1)[:, None]
    choices = tl.arange(0, BLOCK_K)[None, :]
    top_ids = tl.zeros([ROWS, BLOCK_K], dtype=tl.int32)
    top_probs = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    remaining = tl.where(experts[None, :] < num_experts, probs, -1.0)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(remaining, 1)
        top_ids = tl.where(choices == j, best[:, None], top_ids)
        top_probs = tl.where(choices == j, tl.max(remaining, 1)[:, None], top_probs)
        remaining = tl.where(experts[None, :] == best[:, None], -1.0, remaining)
    if NORMALIZE:
        top_probs = top_probs / tl.sum(top_probs, 1)[:, None]
    return top_probs, top_ids


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
        logits_ptr + token * num_experts + experts[None, :],
        mask=experts[None, :] < num_experts,
        other=-float("inf"),
    )
    top_probs, top_ids = _softmax_top_k(logits, experts, num_experts, 1, TOP_K, NORMALIZE, BLOCK_K)
    choices = tl.arange(0, BLOCK_K)[None, :]
    live = choices < TOP_K
    pairs = token * TOP_K + choices
    tl.store(weights_ptr + pairs, top_probs, mask=live)
    tl.store(experts_ptr + pairs, top_ids, mask=live)
    place = tl.atomic_add(counts_ptr + top_ids, 1, mask=live)
    tl.store(bucket_ptr + top_ids.to(tl.int64) * bucket_stride + place, pairs, mask=live)


@triton.jit
def _residual(h_ptr, delta_ptr, at, live):
    """h + delta at offsets `at`, rounded to h's dtype as replica.kernels.elementwise's add +
    RMSNorm rounds it, as fp32."""
    h = tl.load(h_ptr + at, mask=live, other=0.0)
    delta = tl.load(delta_ptr + at, mask=live, other=0.0).to(h.dtype)
    return (h.to(tl.float32) + delta.to(tl.float32)).to(h.dtype).to(tl.float32)


@triton.jit
def _store_logit_slice(
    x_ptr,  # NORM: the residual h; its normed rows are written to x_out_ptr
    router_ptr,
    slices_ptr,
    delta_ptr,  # NORM: [tokens, hidden], added to h
    norm_ptr,  # NORM: [hidden], the RMSNorm's weight
    h_out_ptr,  # NORM: [tokens, hidden], h + delta
    x_out_ptr,  # NORM: [tokens, hidden], its RMSNorm
    eps,
    tokens,
    num_experts,
    hidden,
    SLICES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ROWS: tl.constexpr,
    STEP: tl.constexpr,
    NORM: tl.constexpr,
):
    """This program's ROWS experts' logits over its slice of the hidden size, every token's.
    NORM: the rows are RMSNorm(h + delta), each program taking the whole rows' mean square and
    the first of each slice writing h + delta and the normed rows there."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    part = tl.program_id(1)
    toks = tl.arange(0, BLOCK_T)
    ks = tl.arange(0, STEP)
    width = hidden // SLICES
    token_rows = toks[:, None] * hidden + ks[None, :]
    token_live = toks[:, None] < tokens
    w_rows = router_ptr + rows[:, None].to(tl.int64) * hidden + part * width + ks[None, :]
    if NORM:
        squares = tl.zeros([BLOCK_T, STEP], dtype=tl.float32)
        for k in range(0, hidden, STEP):
            summed = _residual(x_ptr, delta_ptr, token_rows + k, token_live)
            squares += summed * summed
        inv_rms = tl.rsqrt(tl.sum(squares, 1) / hidden + eps)[:, None]
    acc = tl.zeros([BLOCK_T, ROWS], dtype=tl.float32)
    for k in range(part * width, (part + 1) * width, STEP):
        if NORM:
            summed = _residual(x_ptr, delta_ptr, token_rows + k, token_live)
            dtype = x_out_ptr.dtype.element_ty
            weight = tl.load(norm_ptr + k + ks).to(tl.float32)[None, :]
            x = (weight * (summed * inv_rms).to(dtype).to(tl.float32)).to(dtype)
            if tl.program_id(0) == 0:
                tl.store(h_out_ptr + token_rows + k, summed.to(dtype), mask=token_live)
                tl.store(x_out_ptr + token_rows + k, x, mask=token_live)
        else:
            x = tl.load(x_ptr + token_rows + k, mask=token_live, other=0.0)
        w = tl.load(w_rows + k - part * width, mask=rows[:, None] < num_experts, other=0.0)
        acc += tl.dot(x, tl.trans(w))
    dst = slices_ptr + (part * BLOCK_T + toks[:, None]) * BLOCK_E + rows[None, :]
    tl.store(dst, acc, mask=token_live)


@triton.jit
def _fused_route_kernel(
    x_ptr,  # [tokens, hidden], 16-bit (NORM: the residual h)
    router_ptr,  # [experts, hidden]
    slices_ptr,  # [SLICES, BLOCK_T, BLOCK_E] fp32 scratch: each slice's logits
    ticket_ptr,  # [1] int32, zero between calls
    weights_ptr,
    experts_ptr,
    counts_ptr,
    bucket_ptr,
    delta_ptr,  # NORM (else unused, as the next three): _store_logit_slice's
    norm_ptr,
    h_out_ptr,
    x_out_ptr,
    eps,
    tokens,
    num_experts,
    hidden,
    NORM: tl.constexpr,
    TOP_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    SLICES: tl.constexpr,
    BLOCK_T: tl.constexpr,  # the slices' token rows (16 or more: tl.dot's)
    FILE_T: tl.constexpr,  # the last program's (the tokens' power of two)
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROWS: tl.constexpr,
    STEP: tl.constexpr,
):
    _store_logit_slice(
        x_ptr, router_ptr, slices_ptr, delta_ptr, norm_ptr, h_out_ptr, x_out_ptr, eps, tokens,
        num_experts, hidden, SLICES, BLOCK_T, BLOCK_E, ROWS, STEP, NORM,
    )  # fmt: skip
    tl.debug_barrier()  # every thread's logits stored before the ticket releases them
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) * tl.num_programs(1) - 1:
        # The last program: every token's top-k from the slices' logits, its pairs filed in
        # token order (a pair's place: the pairs of earlier tokens its expert took), the counts
        tl.store(ticket_ptr, 0)
        toks = tl.arange(0, FILE_T)
        experts = tl.arange(0, BLOCK_E)
        logits = tl.zeros([FILE_T, BLOCK_E], dtype=tl.float32)
        for part in tl.static_range(SLICES):  # L2 reads (.cg): other programs wrote them
            src = slices_ptr + (part * BLOCK_T + toks[:, None]) * BLOCK_E + experts[None, :]
            logits += tl.load(src, mask=toks[:, None] < tokens, other=0.0, cache_modifier=".cg")
        logits = tl.where(experts[None, :] < num_experts, logits, -float("inf"))
        top_probs, top_ids = _softmax_top_k(
            logits, experts, num_experts, FILE_T, TOP_K, NORMALIZE, BLOCK_K
        )
        choices = tl.arange(0, BLOCK_K)[None, :]
        live = (toks[:, None] < tokens) & (choices < TOP_K)
        taken = tl.zeros([FILE_T, BLOCK_E], dtype=tl.int32)  # 1 where a token took an expert
        for j in tl.static_range(TOP_K):
            chosen = tl.sum(tl.where(choices == j, top_ids, 0), 1)
            taken += (experts[None, :] == chosen[:, None]).to(tl.int32)
        taken = tl.where(toks[:, None] < tokens, taken, 0)
        earlier = tl.cumsum(taken, 0) - taken
        places = tl.zeros([FILE_T, BLOCK_K], dtype=tl.int32)
        for j in tl.static_range(TOP_K):
            chosen = tl.sum(tl.where(choices == j, top_ids, 0), 1)
            place = tl.sum(tl.where(experts[None, :] == chosen[:, None], earlier, 0), 1)
            places = tl.where(choices == j, place[:, None], places)
        pairs = toks[:, None] * TOP_K + choices
        tl.store(weights_ptr + pairs, top_probs, mask=live)
        tl.store(experts_ptr + pairs, top_ids, mask=live)
        tl.store(bucket_ptr + top_ids * tokens + places, pairs, mask=live)
        tl.store(counts_ptr + experts, tl.sum(taken, 0), mask=experts < num_experts)


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


def fused_slices(hidden: int) -> int:
    """The hidden size's slices in the fused routing (0: it cannot take this size)."""
    for slices in (MAX_SLICES, 4, 2, 1):
        if hidden % (slices * HIDDEN_STEP) == 0:
            return slices
    return 0


def one_launch_fits(x: Tensor) -> bool:
    """Whether the one-launch routing takes these states: 16-bit (fp32 dots would take tf32),
    at most FUSED_MAX_TOKENS of them, a hidden size the slices divide."""
    sixteen_bit = x.dtype in (torch.bfloat16, torch.float16)
    return sixteen_bit and x.shape[0] <= FUSED_MAX_TOKENS and fused_slices(x.shape[1]) > 0


def route_pairs(
    x: Tensor,
    router: Tensor,
    top_k: int,
    normalize: bool,
    counts: Tensor,
    ticket: Tensor | None = None,
) -> Routing:
    """Routes x [T, hidden] over the router [experts, hidden]: softmax, top-k (renormalised when
    `normalize`), each pair filed in its expert's bucket. `counts` [experts] int32 is written
    (the caller's buffer: a CUDA graph writes the same one every replay). A `ticket` ([1] int32,
    zero, the caller's too) routes in one launch, where `one_launch_fits(x)`."""
    outputs, shape = _routing_outputs(x, router, top_k, normalize, counts)
    if ticket is None:
        counts.zero_()
        logits = router_logits(x, router)
        experts = router.shape[0]
        _route_kernel[(x.shape[0],)](
            logits, *outputs, experts, x.shape[0],
            BLOCK_E=triton.next_power_of_2(experts), **shape, num_warps=4,
        )  # fmt: skip
    else:
        _fused_route(x, router, ticket, outputs, shape, None)
    return Routing(*outputs, top_k)


@dataclass(frozen=True)
class ResidualNorm:
    """The add + RMSNorm before the MoE (replica.ops.layer's add_rms_norm): h + delta, and its
    RMSNorm by `weight`."""

    h: Tensor  # [T, hidden]
    delta: Tensor  # [T, hidden]
    weight: Tensor  # [hidden]
    eps: float


def route_normed(
    norm: ResidualNorm,
    router: Tensor,
    top_k: int,
    normalize: bool,
    counts: Tensor,
    ticket: Tensor,
) -> tuple[Tensor, Tensor, Routing]:
    """(h + delta, its RMSNorm x, x's routing) in route_pairs' one launch, where
    `one_launch_fits(norm.h)`: the layer's add + RMSNorm is a launch less."""
    outputs, shape = _routing_outputs(norm.h, router, top_k, normalize, counts)
    h, x = torch.empty_like(norm.h), torch.empty_like(norm.h)
    _fused_route(norm.h, router, ticket, outputs, shape, (norm, h, x))
    return h, x, Routing(*outputs, top_k)


def _routing_outputs(
    x: Tensor, router: Tensor, top_k: int, normalize: bool, counts: Tensor
) -> tuple[tuple[Tensor, ...], dict]:
    """(weights, experts, counts, bucket) to write, and the kernels' top-k constants."""
    tokens, experts = x.shape[0], router.shape[0]
    bucket = torch.empty(experts, tokens, dtype=torch.int32, device=x.device)
    weights = torch.empty(tokens * top_k, dtype=torch.float32, device=x.device)
    pair_experts = torch.empty(tokens * top_k, dtype=torch.int32, device=x.device)
    shape = dict(TOP_K=top_k, NORMALIZE=normalize, BLOCK_K=triton.next_power_of_2(top_k))
    return (weights, pair_experts, counts, bucket), shape


def _fused_route(
    x: Tensor,
    router: Tensor,
    ticket: Tensor,
    outputs: tuple[Tensor, ...],
    shape: dict,
    norm: tuple[ResidualNorm, Tensor, Tensor] | None,
) -> None:
    """`norm`: x is its h, and (h + delta, its RMSNorm) are written to the two tensors."""
    assert x.is_contiguous() and router.is_contiguous(), "the kernel reads rows of `hidden`"
    tokens, hidden = x.shape
    experts = router.shape[0]
    slices = fused_slices(hidden)
    block_t = max(16, triton.next_power_of_2(tokens))
    block_e = max(ROUTER_ROWS, triton.next_power_of_2(experts))
    scratch = torch.empty(slices, block_t, block_e, dtype=torch.float32, device=x.device)
    if norm is None:
        normed: tuple = (x, x, x, x, 0.0)  # unused
    else:
        residual, h, x_out = norm
        assert residual.delta.is_contiguous() and residual.delta.shape == x.shape
        normed = (residual.delta, residual.weight, h, x_out, residual.eps)
    _fused_route_kernel[(triton.cdiv(experts, ROUTER_ROWS), slices)](
        x, router, scratch, ticket, *outputs, *normed, tokens, experts, hidden,
        NORM=norm is not None, SLICES=slices, BLOCK_T=block_t,
        FILE_T=triton.next_power_of_2(tokens), BLOCK_E=block_e, ROWS=ROUTER_ROWS,
        STEP=HIDDEN_STEP, **shape, num_warps=4,
    )  # fmt: skip
