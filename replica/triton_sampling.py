"""`replica.sampling.gumbel_argmax` as one Triton pass over each row's logits (CUDA).

The PyTorch version materialises the noise, the scaled logits and the scores for the whole
[B, vocab] block (several passes over 150k columns a row); this reads each logit once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _gumbel_argmax_kernel(
    logits_ptr, temperature_ptr, threshold_ptr, keys_ptr, out_ptr, vocab, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    inv_t = 1.0 / tl.maximum(tl.load(temperature_ptr + row), 1e-6)
    threshold = tl.load(threshold_ptr + row)
    key = tl.load(keys_ptr + row).to(tl.uint32)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        tokens = start + tl.arange(0, BLOCK)
        live = tokens < vocab
        logit = tl.load(logits_ptr + row * vocab + tokens, mask=live, other=0.0)
        scaled = logit.to(tl.float32) * inv_t
        bits = _mix32(key ^ tokens.to(tl.uint32))
        uniform = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        score = scaled - tl.log(-tl.log(uniform))
        score = tl.where(live & (scaled >= threshold), score, float("-inf"))
        better = score > best  # per lane, so ties keep the lowest token id
        best_index = tl.where(better, tokens, best_index)
        best = tl.where(better, score, best)
    top = tl.max(best, 0)
    winner = tl.min(tl.where(best == top, best_index, vocab), 0)
    tl.store(out_ptr + row, winner.to(tl.int64))


def gumbel_argmax_triton(
    logits: Tensor, temperature: Tensor, threshold: Tensor, keys: Tensor
) -> Tensor:
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _gumbel_argmax_kernel[(rows,)](
        logits.contiguous(), temperature, threshold, keys, out, vocab, BLOCK=2048, num_warps=8
    )
    return out
