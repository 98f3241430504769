"""Per-row sampling (replica.ops.sampler's oracle) as one Triton program per row (CUDA): a sampled decode step draws
all its tokens in one launch inside the graph.

A row's program reads its logits in passes. The first finds the greedy argmax and each lane's
maximum. For a truncating row, the CANDIDATES-th largest of those lane maxima is a floor with at
least CANDIDATES logits at or above it and, when the logits do not line up with the lanes, few
more (274 on average, at most 290 in 300 rows of Gaussian logits), so one pass gathers them
(values and token ids) and sums the row's softmax. Bisections on the gathered values give the
k-th largest logit and the top-p threshold, and the draw runs over the gathered tokens alone.
Only when more than GATHERED logits reach the floor (ties, or logits laid out along the lanes)
does the row find its CANDIDATES-th largest logit by bisection over the whole row, one counting
pass per key bit, and draw over the whole row. Untruncated rows draw over the whole row.

Each bisection finds, bit by bit from the top, the largest order-preserving key t such that the
weights of the keys at or above t reach a target: with weight 1 the target-th largest key, with
token probabilities the top-p threshold. A bf16 logit's key has 16 significant bits (the top
half of its fp32 key), so its bisections take 16 steps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

GATHERED = 512  # room for the logits at or above a row's floor: the candidates and a margin


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _row_key(seed, position):
    """`replica.ops.sampler.row_keys` for one row."""
    seed32 = ((seed ^ (seed >> 32)) & 0xFFFFFFFF).to(tl.uint32)
    return _mix32(seed32 + _mix32((position & 0xFFFFFFFF).to(tl.uint32)))


@triton.jit
def _order_key(x):
    """Unsigned integers that sort like the fp32 values `x`: 2**31 plus or minus the magnitude,
    so a bf16 value's key keeps the low 16 bits zero."""
    bits = x.to(tl.uint32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF
    return tl.where((bits >> 31) != 0, 0x80000000 - magnitude, 0x80000000 + magnitude)


@triton.jit
def _key_value(key):
    negative = key < 0x80000000
    magnitude = tl.where(negative, 0x80000000 - key, key - 0x80000000)
    return (magnitude | tl.where(negative, 0x80000000, 0)).to(tl.float32, bitcast=True)


@triton.jit
def _trial_key(found, BIT: tl.constexpr):
    return found | tl.full([], 1 << BIT, tl.uint32)


@triton.jit
def _largest_key_reaching(keys, weights, target, KEY_BITS: tl.constexpr):
    """The largest t whose keys at or above it weigh at least `target` in all (0 if none)."""
    found = tl.zeros([], tl.uint32)
    for step in tl.static_range(KEY_BITS):
        trial = _trial_key(found, 31 - step)
        reached = tl.sum(tl.where(keys >= trial, weights, 0.0), 0) >= target
        found = tl.where(reached, trial, found)
    return found


@triton.jit
def _count_reaching(logits_ptr, vocab, stop, key, BLOCK: tl.constexpr):
    count = tl.zeros([BLOCK], tl.int32)
    for start in range(0, stop, BLOCK):
        tokens = start + tl.arange(0, BLOCK)
        logit = tl.load(logits_ptr + tokens, mask=tokens < vocab, other=float("-inf"))
        count += (_order_key(logit.to(tl.float32)) >= key).to(tl.int32)
    return tl.sum(count, 0)


@triton.jit
def _largest_key_in_row(logits_ptr, vocab, stop, target, KEY_BITS: tl.constexpr, BLOCK):
    """`_largest_key_reaching` over the whole row with weight 1 (a counting pass per step): the
    key of the `target`-th largest logit, and how many logits reach it."""
    found = tl.zeros([], tl.uint32)
    count = vocab
    for step in tl.static_range(KEY_BITS):
        trial = _trial_key(found, 31 - step)
        trial_count = _count_reaching(logits_ptr, vocab, stop, trial, BLOCK)
        reached = trial_count >= target
        found = tl.where(reached, trial, found)
        count = tl.where(reached, trial_count, count)
    return found, count


@triton.jit
def _lane_maxima(logits_ptr, vocab, BLOCK: tl.constexpr):
    """The first index of the row's largest logit, and each lane's largest logit."""
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        tokens = start + tl.arange(0, BLOCK)
        logit = tl.load(logits_ptr + tokens, mask=tokens < vocab, other=float("-inf"))
        better = logit.to(tl.float32) > best  # per lane, so ties keep the lowest token id
        best_index = tl.where(better, tokens, best_index)
        best = tl.where(better, logit.to(tl.float32), best)
    top = tl.max(best, 0)
    return tl.min(tl.where(best == top, best_index, vocab), 0), best


@triton.jit
def _gather(logits_ptr, vocab, stop, floor, inv_t, top_scaled, values_ptr, ids_ptr, CAP, BLOCK):
    """Stores the first CAP logits at or above `floor`, and their token ids, in scratch; returns
    how many there are in all, and the softmax denominator of logit / T over the whole row."""
    count = tl.zeros([], tl.int32)
    mass = tl.zeros([BLOCK], tl.float32)
    for start in range(0, stop, BLOCK):
        tokens = start + tl.arange(0, BLOCK)
        live = tokens < vocab
        logit = tl.load(logits_ptr + tokens, mask=live, other=float("-inf")).to(tl.float32)
        take = logit >= floor
        slot = count + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(values_ptr + slot, logit, mask=take & (slot < CAP))
        tl.store(ids_ptr + slot, tokens, mask=take & (slot < CAP))
        count += tl.sum(take.to(tl.int32), 0)
        mass += tl.exp(logit * inv_t - top_scaled)
    return count, tl.sum(mass, 0)


@triton.jit
def _gumbel_scores(logit, tokens, inv_t, threshold, key, live):
    """logit / T plus the Gumbel noise of (key, token); -inf below the threshold."""
    bits = _mix32(key ^ tokens.to(tl.uint32))
    uniform = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    score = logit.to(tl.float32) * inv_t - tl.log(-tl.log(uniform))
    return tl.where(live & (logit >= threshold), score, float("-inf"))


@triton.jit
def _first_best(score, tokens, vocab):
    top = tl.max(score, 0)
    return tl.min(tl.where(score == top, tokens, vocab), 0)


@triton.jit
def _gumbel_argmax(logits_ptr, vocab, stop, inv_t, threshold, key, BLOCK: tl.constexpr):
    """`replica.ops.sampler.gumbel_argmax` over the whole row."""
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK], tl.int32)
    for start in range(0, stop, BLOCK):
        tokens = start + tl.arange(0, BLOCK)
        live = tokens < vocab
        logit = tl.load(logits_ptr + tokens, mask=live, other=0.0).to(tl.float32)
        score = _gumbel_scores(logit, tokens, inv_t, threshold, key, live)
        better = score > best  # per lane, so ties keep the lowest token id
        best_index = tl.where(better, tokens, best_index)
        best = tl.where(better, score, best)
    return _first_best(best, best_index, vocab)


@triton.jit
def _candidates(
    logits_ptr, vocab, lane_max, stop, width, inv_t, values_ptr, ids_ptr, CAP, KEY_BITS, BLOCK
):
    """A truncating row's candidates (`stop` is its vocabulary size; 0 for other rows) in CAP
    slots: the logits at or above the floor (weight 1), or, when too many reach it, the ones
    above the exact width-th largest logit and that logit weighing its ties. Returns their
    values (-inf in empty slots), weights and token ids, which slots hold gathered logits,
    whether the exact way was taken, and the row's softmax denominator of logit / T."""
    lane_weight = tl.where(stop > 0, 1.0, 0.0)
    floor = _key_value(_largest_key_reaching(_order_key(lane_max), lane_weight, width, KEY_BITS))
    top_scaled = tl.max(lane_max, 0) * inv_t
    count, full_mass = _gather(
        logits_ptr, vocab, stop, floor, inv_t, top_scaled, values_ptr, ids_ptr, CAP, BLOCK
    )
    exact = (stop > 0) & (count > CAP)
    stop = tl.where(exact, vocab, 0)
    boundary, reaching = _largest_key_in_row(logits_ptr, vocab, stop, width, KEY_BITS, BLOCK)
    floor = _key_value(boundary + tl.full([], 1 << (32 - KEY_BITS), tl.uint32))  # next key
    above, _ = _gather(
        logits_ptr, vocab, stop, floor, inv_t, top_scaled, values_ptr, ids_ptr, CAP, BLOCK
    )
    tl.debug_barrier()  # the gathered logits were stored by other threads of this program

    slots = tl.arange(0, CAP)
    stored = slots < tl.where(exact, above, count)
    values = tl.load(values_ptr + slots, mask=stored, other=float("-inf"))
    ids = tl.load(ids_ptr + slots, mask=stored, other=0)
    tied = slots == tl.where(exact, above, CAP)  # (no slot is CAP)
    values = tl.where(tied, _key_value(boundary), values)
    copies = tl.where(stored, 1.0, tl.where(tied, (reaching - above).to(tl.float32), 0.0))
    return values, copies, ids, stored, exact, full_mass


@triton.jit
def _threshold(
    values, copies, full_mass, top_k, top_p, width, inv_t, top_scaled, KEY_BITS: tl.constexpr
):
    """`replica.ops.sampler.thresholds` from a row's candidates."""
    keys = _order_key(values)
    top_k_width = tl.where((top_k > 0) & (top_k < width), top_k, width)
    kth = _largest_key_reaching(keys, copies, top_k_width, KEY_BITS)
    weight = copies * tl.exp(values * inv_t - top_scaled)
    top_k_mass = tl.sum(tl.where(keys >= kth, weight, 0.0), 0)
    mass = tl.where(top_k > 0, top_k_mass, full_mass)
    nucleus = _largest_key_reaching(keys, weight, top_p * mass, KEY_BITS)
    return _key_value(tl.maximum(kth, nucleus))


@triton.jit
def _sample_kernel(
    logits_ptr,
    temperature_ptr,
    top_k_ptr,
    top_p_ptr,
    seeds_ptr,
    positions_ptr,
    values_ptr,
    ids_ptr,
    out_ptr,
    vocab,
    BLOCK: tl.constexpr,
    CAND: tl.constexpr,
    CAP: tl.constexpr,
    KEY_BITS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * vocab
    temperature = tl.load(temperature_ptr + row)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    sampled = temperature > 0
    truncated = sampled & ((top_k > 0) | (top_p < 1.0))
    inv_t = 1.0 / tl.maximum(temperature, 1e-6)
    width = tl.minimum(vocab, CAND)
    greedy, lane_max = _lane_maxima(logits_ptr, vocab, BLOCK)
    top_scaled = tl.max(lane_max, 0) * inv_t

    values_ptr += row * CAP
    ids_ptr += row * CAP
    stop = tl.where(truncated, vocab, 0)
    values, copies, ids, stored, exact, full_mass = _candidates(
        logits_ptr, vocab, lane_max, stop, width, inv_t, values_ptr, ids_ptr, CAP, KEY_BITS, BLOCK
    )
    threshold = _threshold(
        values, copies, full_mass, top_k, top_p, width, inv_t, top_scaled, KEY_BITS
    )
    threshold = tl.where(truncated, threshold, float("-inf"))

    key = _row_key(tl.load(seeds_ptr + row), tl.load(positions_ptr + row))
    scores = _gumbel_scores(values, ids, inv_t, threshold, key, stored)
    whole_row = sampled & (~truncated | exact)
    drawn = _gumbel_argmax(
        logits_ptr, vocab, tl.where(whole_row, vocab, 0), inv_t, threshold, key, BLOCK
    )
    drawn = tl.where(whole_row, drawn, _first_best(scores, ids, vocab))
    tl.store(out_ptr + row, tl.where(sampled, drawn, greedy).to(tl.int64))


def sample_triton(logits: Tensor, *row_settings: Tensor, candidates: int) -> Tensor:
    """[B] next tokens, what `replica.ops.sampler.sample` returns, in one launch: `row_settings`
    are its temperature, top_k, top_p, seeds and positions, `candidates` its CANDIDATES (the
    most tokens top-k and top-p look at)."""
    assert candidates < GATHERED
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    values = torch.empty(rows, GATHERED, dtype=torch.float32, device=logits.device)
    ids = torch.empty(rows, GATHERED, dtype=torch.int32, device=logits.device)
    _sample_kernel[(rows,)](
        logits.contiguous(),
        *row_settings,
        values,
        ids,
        out,
        vocab,
        BLOCK=2048,
        CAND=candidates,
        CAP=GATHERED,
        KEY_BITS=16 if logits.dtype == torch.bfloat16 else 32,  # bf16: the top half of fp32
        num_warps=8,
    )
    return out
