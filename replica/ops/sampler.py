"""Per-request sampling (temperature, top-k, top-p, seed) that fits inside a decode CUDA graph.

Each row draws its token by the Gumbel-max trick: argmax over the vocabulary of logit / T plus
Gumbel noise, which samples exactly from softmax(logit / T) without a softmax or a cumulative
sum over the vocabulary. The noise is a counter-based hash of (the row's seed, the position the
token follows, the token id), so a seeded request draws the same tokens whatever else shares its
batch, on any batch size. Top-k and top-p become one threshold per row, the smallest logit the
row may draw, as vLLM applies them: top-k keeps the logits at or above the k-th largest (ties
kept); top-p then keeps the most likely of those, down to the largest logit whose tokens at or
above it hold top_p of the probability, renormalised over the top-k tokens when top_k is set and
over the whole vocabulary when not. Both are found among the CANDIDATES most likely tokens, so
top-k is capped at CANDIDATES and the threshold never falls below the CANDIDATES-th largest
logit; with neither, the whole vocabulary is sampled. Greedy rows stay an exact argmax.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

CANDIDATES = 256
MASK32 = 0xFFFFFFFF
# (logits, temperature, top_k, top_p, seeds, positions) -> next tokens: `sample`, or the Triton
# kernel that draws the same tokens on CUDA (replica.kernels.sampling; replica.ops.select chooses).
Sampler = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def inverse(temperature: Tensor) -> Tensor:
    """1 / T, as the Triton kernel computes it: both sides must round logit / T alike, or their
    draws could differ."""
    return 1.0 / temperature.clamp_min(1e-6)


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values below 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def row_keys(seeds: Tensor, positions: Tensor) -> Tensor:
    """[B] int64: one noise stream per (seed, position)."""
    seed32 = (seeds ^ (seeds >> 32)) & MASK32
    return mix32((seed32 + mix32(positions & MASK32)) & MASK32)


def thresholds(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """[B] fp32: the smallest logit a row may still draw (-inf: no truncation)."""
    logits = logits.float()
    inv_t = inverse(temperature)[:, None]
    width = min(CANDIDATES, logits.shape[-1])
    top = torch.topk(logits, width, dim=-1).values
    k = torch.where((top_k > 0) & (top_k < width), top_k, width)
    kth = top.gather(1, k[:, None] - 1)
    weight = torch.exp(logits * inv_t - top[:, :1] * inv_t)
    top_k_mass = torch.where(logits >= kth, weight, 0.0).sum(-1)
    mass = torch.where(top_k > 0, top_k_mass, weight.sum(-1))
    # the probability held by the candidates at or above each candidate
    candidate_weight = torch.exp(top * inv_t - top[:, :1] * inv_t)
    at_or_above = top[:, None, :] >= top[:, :, None]
    reach = torch.where(at_or_above, candidate_weight[:, None, :], 0.0).sum(-1)
    nucleus = torch.where(reach >= top_p[:, None] * mass[:, None], top, -torch.inf).amax(-1)
    threshold = torch.maximum(kth[:, 0], nucleus)
    truncates = (top_k > 0) | (top_p < 1.0)
    return torch.where(truncates, threshold, torch.full_like(threshold, float("-inf")))


def gumbel_argmax(logits: Tensor, temperature: Tensor, threshold: Tensor, keys: Tensor) -> Tensor:
    """[B] int64: argmax of logit / T + Gumbel noise over the logits at or above the threshold.
    Plain PyTorch (the CPU path and the reference of the Triton kernel)."""
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    bits = mix32(keys[:, None] ^ vocab[None, :])
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))
    scaled = logits.float() * inverse(temperature)[:, None]
    noisy = scaled - torch.log(-torch.log(uniform))
    return torch.where(logits.float() >= threshold[:, None], noisy, -torch.inf).argmax(-1)


def sample(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    seeds: Tensor,
    positions: Tensor,
) -> Tensor:
    """[B] next tokens: greedy where temperature is 0, sampled elsewhere. `logits` in the model's
    dtype (widened to fp32 where they are read, never copied whole). Every shape is fixed by the
    batch, so this runs inside a CUDA graph (replica.kernels.sampling does it in one launch)."""
    threshold = thresholds(logits, temperature, top_k, top_p)
    drawn = gumbel_argmax(logits, temperature, threshold, row_keys(seeds, positions))
    return torch.where(temperature > 0, drawn, logits.argmax(-1))
