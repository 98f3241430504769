"""Per-request sampling (temperature, top-k, top-p, seed) that fits inside a decode CUDA graph.

Each row draws its token by the Gumbel-max trick: argmax over the vocabulary of logit / T plus
Gumbel noise, which samples exactly from softmax(logit / T) without a softmax or a cumulative
sum over the vocabulary. The noise is a counter-based hash of (the row's seed, the position the
token follows, the token id), so a seeded request draws the same tokens whatever else shares its
batch, on any batch size. Top-k and top-p become one threshold per row on logit / T, found
among the CANDIDATES most likely tokens (so top-k is capped at CANDIDATES and top-p keeps at most
CANDIDATES tokens); with neither, the whole vocabulary is sampled. Greedy rows stay an exact argmax.
"""

from __future__ import annotations

import torch
from torch import Tensor

CANDIDATES = 256
MASK32 = 0xFFFFFFFF


def inverse(temperature: Tensor) -> Tensor:
    """1 / T, as the Triton kernel computes it: both sides must round logit / T alike, or a token
    right at a row's threshold could fall on different sides of it."""
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
    """[B] fp32: the smallest logit / T a row may still draw (-inf: no truncation)."""
    values = torch.topk(logits, min(CANDIDATES, logits.shape[-1]), dim=-1).values.float()
    values = values * inverse(temperature)[:, None]
    width = values.shape[-1]
    ranks = torch.arange(width, device=logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=width), width)
    probs = torch.softmax(values, dim=-1)
    before = probs.cumsum(-1) - probs  # mass of the more likely candidates
    kept = (before < top_p[:, None]) & (ranks[None, :] < k[:, None])
    last = kept.sum(-1).clamp_min(1) - 1
    threshold = values.gather(1, last[:, None])[:, 0]
    truncates = (top_k > 0) | (top_p < 1.0)
    return torch.where(truncates, threshold, torch.full_like(threshold, float("-inf")))


def gumbel_argmax(logits: Tensor, temperature: Tensor, threshold: Tensor, keys: Tensor) -> Tensor:
    """[B] int64: argmax of logit / T + Gumbel noise over the tokens at or above the threshold.
    Plain PyTorch (the CPU path and the reference of the Triton kernel)."""
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    bits = mix32(keys[:, None] ^ vocab[None, :])
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))
    scaled = logits.float() * inverse(temperature)[:, None]
    noisy = scaled - torch.log(-torch.log(uniform))
    return torch.where(scaled >= threshold[:, None], noisy, -torch.inf).argmax(-1)


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
    batch, so this runs inside a CUDA graph."""
    greedy = logits.argmax(-1)
    threshold = thresholds(logits, temperature, top_k, top_p)
    keys = row_keys(seeds, positions)
    if logits.is_cuda:
        from replica.triton_sampling import gumbel_argmax_triton

        drawn = gumbel_argmax_triton(logits, temperature, threshold, keys)
    else:
        drawn = gumbel_argmax(logits, temperature, threshold, keys)
    return torch.where(temperature > 0, drawn, greedy)
