"""Our Triton kernels against their PyTorch references on the CPU, through Triton's interpreter.

Run by `tests/test_triton_interpreted.py` in a child process, because TRITON_INTERPRET must be
set before the kernels are defined. Small shapes in fp32: the interpreter runs each program in
NumPy. `python tests/interpreted_kernels.py NAME` runs one check and exits non-zero on failure.
"""

from __future__ import annotations

import os
import sys

import torch

from replica.ops.attention import BlockTables, LayerCache, PackedRows
from replica.ops.attention.reference import ReferenceAttention
from replica.ops.layer import TorchOps

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 32


def close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def close_in_scale(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Errors small against the output's scale: the GEMV dequantizes by one fma,
    (128 + q) s - (128 + z) s, exact for 16-bit scales, but these fp32 scales round (128 + q) s,
    a term about 16x the weight, so its fp32 error is about 16x a plain dot product's."""
    error = (ours - reference).abs().max().item()
    assert error <= 2e-5 * reference.abs().max().item(), (error, reference.abs().max().item())


def prefill() -> None:
    from replica.kernels.prefill_attention import prefill_attention
    from tests.test_attention import with_context

    lengths = [130, 1, 64, 7]
    rows = PackedRows.from_lengths(lengths, torch.device("cpu"))
    tokens = sum(lengths)
    q = torch.randn(tokens, HEADS, HEAD_DIM)
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM)
    v = torch.randn(tokens, HEADS + KV_HEADS, HEAD_DIM)[:, HEADS:]  # strided, as in the engine
    cache = torch.zeros(1, 16, KV_HEADS, HEAD_DIM)
    reference = ReferenceAttention().prefill(q, k, v, LayerCache(cache, cache), rows)
    close(prefill_attention(q, k, v, rows), reference)
    context, lengths = [5, 0, 150], [130, 1, 20]  # chunks after a cached context
    q, k, v, _, _, k_cache, v_cache, cached = with_context(
        context, lengths, (HEADS, KV_HEADS), HEAD_DIM, "cpu", torch.float32
    )
    rows = PackedRows.from_lengths(lengths, torch.device("cpu"), cached)
    kv = LayerCache(k_cache, v_cache)
    close(prefill_attention(q, k, v, rows, kv), ReferenceAttention().prefill(q, k, v, kv, rows))


def decode() -> None:
    from replica.kernels.decode_attention import decode_attention
    from tests.test_attention import paged_cache

    gen = torch.Generator().manual_seed(7)
    keys = [torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen) for n in (300, 1, 65, 128, 9)]
    values = [torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen) for n in (300, 1, 65, 128, 9)]
    k_cache, tables = paged_cache(keys, 40, 16, gen.manual_seed(3))
    v_cache, _ = paged_cache(values, 40, 16, gen.manual_seed(3))
    q = torch.randn(4, HEADS, HEAD_DIM)
    row_ids = torch.tensor([0, 1, 2, 3])
    lengths = torch.tensor([300, 1, 65, 128], dtype=torch.int32)
    kv, paged = LayerCache(k_cache, v_cache), BlockTables(tables, row_ids, lengths)
    reference = ReferenceAttention().decode(q, kv, paged)
    for waves in (1, 4):  # one split per row, then several
        close(decode_attention(q, kv, paged, waves), reference)


def elementwise() -> None:
    from replica.kernels.elementwise import TritonOps

    inv_freq = 1.0 / 1e6 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    ops = [cls(HEADS, KV_HEADS, HEAD_DIM, 1e-6, inv_freq) for cls in (TorchOps, TritonOps)]
    h, delta, weight = torch.randn(3, 64), torch.randn(3, 64), torch.randn(64)
    for delta_or_none in (delta, None):
        for a, b in zip(*(op.add_rms_norm(h, delta_or_none, weight) for op in ops), strict=True):
            close(b, a)
    gate_up = torch.randn(3, 2 * 40)
    close(ops[1].silu_mul(gate_up), ops[0].silu_mul(gate_up))
    for tokens in (5, 300):  # a program per token (decode), then blocks of tokens (prefill)
        qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
        q_norm, k_norm = torch.randn(HEAD_DIM), torch.randn(HEAD_DIM)
        positions = torch.randint(0, 4096, (tokens,))
        slots = torch.randperm(24 * 16)[:tokens]  # flat slots, scattered over 24 blocks
        caches = [torch.zeros(2, 24, 16, KV_HEADS, HEAD_DIM).unbind(0) for _ in ops]
        outs = [
            op.rope_store(qkv, q_norm, k_norm, positions, slots, *cache)
            for op, cache in zip(ops, caches, strict=True)
        ]
        for a, b in zip(*outs, strict=True):  # q, k, v
            close(b, a)
        for a, b in zip(*caches, strict=True):  # K and V caches
            close(b, a)


def moe(packed: bool = False) -> None:
    """The fused experts against the expert loop; `packed`: 4-bit experts (w4a16)."""
    from replica.kernels import moe as moe_kernels
    from replica.kernels.elementwise import TritonOps
    from replica.kernels.moe import fused_moe
    from replica.ops.mlp import SparseMoE
    from replica.ops.packed import quantize

    def stacked(weights: torch.Tensor):
        return quantize(weights, group_size=16) if packed else weights

    experts, hidden, inter = 8, 32, 16
    ops = [
        cls(HEADS, KV_HEADS, HEAD_DIM, 1e-6, torch.ones(HEAD_DIM // 2))
        for cls in (TorchOps, TritonOps)
    ]
    for top_k, normalize in ((2, True), (3, False)):  # top_k 3: a padded top-k block
        layer = SparseMoE(
            router=torch.randn(experts, hidden),
            gate_up=stacked(torch.randn(experts, 2 * inter, hidden) / hidden**0.5),
            down=stacked(torch.randn(experts, hidden, inter) / inter**0.5),
            top_k=top_k,
            norm_topk_prob=normalize,
        )
        # packed, top-2 (top-3): 1 and 4 tokens a pair an expert or fewer (4: 1.5, the GEMV's
        # buckets); 60 the buckets, several chunks an expert (tiles); 300 the tiles (16-bit
        # kernels take several blocks of rows)
        for tokens in (1, 4, 60, 300):
            x, h, weight = (
                torch.randn(tokens, hidden),
                torch.randn(tokens, hidden),
                torch.randn(hidden),
            )
            expected = ops[0].add_rms_norm(h, ops[0].mlp(x, layer), weight)
            fused = ops[1].mlp(x, layer)
            assert fused.shape == (tokens * top_k, hidden)
            for a, b in zip(expected, ops[1].add_rms_norm(h, fused, weight), strict=True):
                close(b, a)
            assert layer.expert_tokens.sum().item() == tokens * top_k
        if packed:  # every path at one size, the dequantized one in chunks of 3 experts
            x, h = torch.randn(60, hidden), torch.randn(60, hidden)
            expected = ops[0].add_rms_norm(h, ops[0].mlp(x, layer), weight)
            moe_kernels.DEQUANTIZED_BYTES = 3 * 3 * inter * hidden * 4
            assert len(moe_kernels._expert_chunks(layer, torch.float32)) == 3
            for path in ("pairs", "buckets", "tiles", "dequantized"):
                ours = ops[1].add_rms_norm(h, fused_moe(x, layer, path), weight)
                for a, b in zip(expected, ours, strict=True):
                    close(b, a)


def int4_linear() -> None:
    """w4a16 against dequantize-then-matmul: the GEMV for 1 to 4 tokens (split K, gated), the
    decode tile with and without split-K, the middle and prefill tiles, the dequantizing copy;
    output widths that end mid-block; groups of 32 to 128."""
    from replica.kernels.int4_linear import (
        GEMV_TOKENS,
        dequantized,
        split_k,
        w4a16_gemv,
        w4a16_linear,
    )
    from replica.ops.packed import dequantize, linear, quantize

    assert split_k(2, 8, torch.device("cpu")) == 8  # 8 "SMs": 16 programs wanted
    for depth, group in ((256, 128), (96, 32), (512, 64)):
        weight = quantize(torch.randn(72, depth), group_size=group)
        close(dequantized(weight, torch.float32), dequantize(weight, torch.float32))
        for tokens in (1, 3, 4, 8, 40, 130):
            x = torch.randn(tokens + 3, depth)[3:]  # a view that does not start at row 0
            close_in_scale(w4a16_linear(x, weight), linear(x, weight))
            gate, up = linear(x, weight).chunk(2, dim=-1)
            if tokens <= GEMV_TOKENS:
                gated = w4a16_gemv(x, weight, gated=True)
                close_in_scale(gated, torch.nn.functional.silu(gate) * up)
    strided = torch.randn(4, 2 * 256)[:, :256]  # rows of stride 512, as attention's output
    close(w4a16_linear(strided, weight := quantize(torch.randn(40, 256))), strided @ dequantize(
        weight, torch.float32).t())  # fmt: skip


def moe_int4() -> None:
    moe(packed=True)


def sampling() -> None:
    from replica.kernels.sampling import GATHERED, sample_triton
    from replica.ops.sampler import CANDIDATES, sample

    # a vocabulary past one block and not a multiple of it, and every kind of row
    rows, vocab, lanes = 8, 5000, 2048
    temperature = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.7, 1.3, 0.0, 0.9])
    top_k = torch.tensor([0, 40, 0, 300, 7, 0, 20, 256])
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.8, 0.05, 0.5, 0.1])
    seeds, positions = torch.arange(rows) * 7919, torch.arange(rows) + 100
    smooth = torch.randn(rows, vocab) * 3
    # many ties at the CANDIDATES-th largest logit, under 50 distinct larger ones (1 + 2**-7
    # ends its bf16 key in a set bit)
    tie = torch.tensor([1.0, 1.0 + 2**-7]).repeat(rows // 2)[:, None]
    coarse = torch.minimum(smooth.round() / 2, tie)
    coarse[:, :50] = 1.1 + torch.rand(rows, 50)
    for logits in (smooth, coarse):
        # how many logits reach the kernel's floor: the CANDIDATES-th largest lane maximum
        lane_max = torch.full((rows, lanes), -torch.inf).scatter_reduce(
            1, (torch.arange(vocab) % lanes).expand(rows, -1), logits, "amax"
        )
        floor = lane_max.sort(-1, descending=True).values[:, CANDIDATES - 1 : CANDIDATES]
        reach = (logits >= floor).sum(-1)
        assert (reach <= GATHERED).all() if logits is smooth else (reach > GATHERED).all()
        for dtype in (torch.float32, torch.bfloat16):
            args = (logits.to(dtype), temperature, top_k, top_p, seeds, positions)
            drawn, expected = sample_triton(*args), sample(*args)
            assert torch.equal(drawn, expected), (dtype, drawn, expected)


CHECKS = {
    "prefill": prefill,
    "decode": decode,
    "elementwise": elementwise,
    "moe": moe,
    "moe_int4": moe_int4,
    "int4_linear": int4_linear,
    "sampling": sampling,
}

if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.manual_seed(0)
    CHECKS[sys.argv[1]]()
