"""Our Triton kernels against their PyTorch references on the CPU, through Triton's interpreter.

Run by `tests/test_triton_interpreted.py` in a child process, because TRITON_INTERPRET must be
set before the kernels are defined. Small shapes in fp32: the interpreter runs each program in
NumPy. `python tests/interpreted_kernels.py NAME` runs one check and exits non-zero on failure.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import torch

from replica.ops.attention import BlockTables, DecodeStep, LayerCache, PackedRows
from replica.ops.attention.reference import ReferenceAttention
from replica.ops.layer import TorchLayerOps

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
    from replica.ops.attention.triton_backend import TritonAttention
    from tests.test_attention import with_context

    lengths = [130, 1, 64, 7]
    rows = PackedRows.from_lengths(lengths, torch.device("cpu"))
    tokens = sum(lengths)
    q = torch.randn(tokens, HEADS, HEAD_DIM)
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM)
    v = torch.randn(tokens, HEADS + KV_HEADS, HEAD_DIM)[:, HEADS:]  # strided, as in the engine
    cache = LayerCache(*torch.zeros(2, 1, 16, KV_HEADS, HEAD_DIM))
    reference = ReferenceAttention().prefill(q, k, v, cache, rows)
    close(TritonAttention().prefill(q, k, v, cache, rows), reference)
    context, lengths = [5, 0, 150], [130, 1, 20]  # chunks after a cached context
    q, k, v, _, _, k_cache, v_cache, cached = with_context(
        context, lengths, (HEADS, KV_HEADS), HEAD_DIM, "cpu", torch.float32
    )
    rows = PackedRows.from_lengths(lengths, torch.device("cpu"), cached)
    kv = LayerCache(k_cache, v_cache)
    reference = ReferenceAttention().prefill(q, k, v, kv, rows)
    close(TritonAttention().prefill(q, k, v, kv, rows), reference)


def decode() -> None:
    from benchmarks.int4_variants import VARIANTS
    from replica.kernels.decode_attention import decode_attention
    from replica.ops.attention.triton_backend import TritonAttention
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
    tickets = torch.zeros(4 * KV_HEADS + 3, dtype=torch.int32)
    for waves in (1, 4, 40):  # one split per row, then several, then more than live ones
        close(decode_attention(q, kv, tables, row_ids, lengths, waves), reference)
        for _ in range(2):  # the splits merged in the launch, twice on the same tickets
            close(decode_attention(q, kv, tables, row_ids, lengths, waves, tickets), reference)
            assert not tickets.any(), "the merging split resets its ticket"
    attention = TritonAttention()
    with VARIANTS["merged_attention"]():  # the backend through a table that merges in launch
        for _ in range(2):
            close(attention.decode(q, kv, paged), reference)
    assert attention._tickets and not any(t.any() for t in attention._tickets.values())


def decode_roped() -> None:
    """The split kernel taking the projection qkv: q/k norms, RoPE and the K/V write in its
    launch, against rope_store's reference then the reference attention."""
    from benchmarks.int4_variants import VARIANTS
    from replica.kernels.decode_attention import Rope, decode_attention
    from replica.ops.attention.triton_backend import TritonAttention
    from replica.ops.layer import TritonLayerOps
    from tests.test_attention import paged_cache

    gen = torch.Generator().manual_seed(11)
    lengths = [300, 1, 65, 17]  # each row's live length, its new token included
    keys = [torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen) for n in lengths]
    k_cache, tables = paged_cache(keys, 40, 16, gen.manual_seed(5))
    v_cache, _ = paged_cache(keys, 40, 16, gen.manual_seed(5))
    v_cache.normal_(generator=gen)
    row_ids = torch.tensor([2, 0, 3, 1])  # rows read other rows' tables
    seq_lens = torch.tensor([lengths[r] for r in row_ids.tolist()], dtype=torch.int32)
    positions = seq_lens.long() - 1
    slots = tables[row_ids, positions // 16].long() * 16 + positions % 16
    qkv = torch.randn(4, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=gen)
    q_norm, k_norm = torch.rand(2, HEAD_DIM, generator=gen) + 0.5
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    ops = TorchLayerOps(HEADS, KV_HEADS, HEAD_DIM, 1e-6, inv_freq)
    want = LayerCache(k_cache.clone(), v_cache.clone())
    q, _, _ = ops.rope_store(qkv, q_norm, k_norm, positions, slots, *want)
    reference = ReferenceAttention().decode(q, want, BlockTables(tables, row_ids, seq_lens))
    rope = Rope(HEADS, q_norm, k_norm, inv_freq, positions, slots, 1e-6)
    for waves, tickets in ((1, None), (4, None), (4, torch.zeros(4 * KV_HEADS, dtype=torch.int32))):
        kv = LayerCache(k_cache.clone(), v_cache.clone())
        out = decode_attention(qkv, kv, tables, row_ids, seq_lens, waves, tickets, rope)
        close(out, reference)
        close(kv.k, want.k)
        close(kv.v, want.v)
    triton_ops = TritonLayerOps(HEADS, KV_HEADS, HEAD_DIM, 1e-6, inv_freq)
    step = DecodeStep(positions, slots, BlockTables(tables, row_ids, seq_lens))
    for variant in ("two_launch_attention", "roped_attention", "one_launch_attention"):
        with VARIANTS[variant]():  # the layer's ops through a table that asks for it
            kv = LayerCache(k_cache.clone(), v_cache.clone())
            out = triton_ops.attend_decode(TritonAttention(), qkv, (q_norm, k_norm), kv, step)
            close(out, reference)
            close(kv.k, want.k)


def elementwise() -> None:
    from replica.kernels.elementwise import silu_mul
    from replica.ops.feed_forward import silu_mul as silu_mul_reference
    from replica.ops.layer import TritonLayerOps

    inv_freq = 1.0 / 1e6 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    layer_ops = (TorchLayerOps, TritonLayerOps)
    ops = [cls(HEADS, KV_HEADS, HEAD_DIM, 1e-6, inv_freq) for cls in layer_ops]
    h, delta, weight = torch.randn(3, 64), torch.randn(3, 64), torch.randn(64)
    for delta_or_none in (delta, None):
        for a, b in zip(*(op.add_rms_norm(h, delta_or_none, weight) for op in ops), strict=True):
            close(b, a)
    gate_up = torch.randn(3, 2 * 40)
    close(silu_mul(gate_up), silu_mul_reference(gate_up))
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
    from replica.kernels.moe import expert_chunks
    from replica.ops import tables
    from replica.ops.feed_forward import TorchMoE, TritonMoE
    from replica.ops.layer import TritonLayerOps
    from replica.ops.mlp import SparseMoE
    from replica.ops.packed import quantize
    from tests.interpreted_int4 import one_token_weights

    def stacked(weights: torch.Tensor):
        return quantize(weights, group_size=16) if packed else weights

    def one_token_gemv(choice: object) -> bool:  # a program a pair: the one-token GEMV
        return isinstance(choice, tables.ExpertGemv) and not choice.bucketed

    def one_token(layer: SparseMoE) -> SparseMoE:  # the weights that GEMV computes with
        gate_up, down = one_token_weights(layer.gate_up), one_token_weights(layer.down)
        return replace(layer, gate_up=gate_up, down=down)

    experts, hidden, inter = 8, 32, 16
    norms = [
        cls(HEADS, KV_HEADS, HEAD_DIM, 1e-6, torch.ones(HEAD_DIM // 2))
        for cls in (TorchLayerOps, TritonLayerOps)
    ]
    fused_moe = TritonMoE(dequantized_bytes=3 * 3 * inter * hidden * 4)
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
        # kernels take several blocks of rows). Decode steps: the tables' choices without the
        # dequantized copy, which runs below
        for tokens in (1, 4, 60, 300):
            x, h, weight = (
                torch.randn(tokens, hidden),
                torch.randn(tokens, hidden),
                torch.randn(hidden),
            )
            choice = tables.moe_table(16 if packed else None, True).choose(tokens * top_k / experts)
            truth = one_token(layer) if one_token_gemv(choice) else layer
            expected = norms[0].add_rms_norm(h, TorchMoE()(x, truth, True), weight)
            fused = fused_moe(x, layer, True)
            assert fused.shape == (tokens * top_k, hidden)
            for a, b in zip(expected, norms[1].add_rms_norm(h, fused, weight), strict=True):
                close(b, a)
            assert fused_moe.expert_counts(layer).sum().item() == tokens * top_k
        if packed:  # every kernel at one size, the dequantized one in chunks of 3 experts
            x, h = torch.randn(60, hidden), torch.randn(60, hidden)
            expected = norms[0].add_rms_norm(h, TorchMoE()(x, layer, False), weight)
            chunks = expert_chunks(
                layer.gate_up, layer.down, torch.float32, 3 * 3 * inter * hidden * 4
            )
            assert len(chunks) == 3
            gemv = tables.MOE_NARROW_PREFILL.choose(1)
            choices = (
                gemv,
                tables.MOE_NARROW_PREFILL.choose(4),
                tables.MOE_NARROW_DECODE.choose(60 * top_k / experts),
                tables.MOE_NARROW_PREFILL.choose(60 * top_k / experts),
            )
            assert [type(c).__name__ for c in choices] == ["ExpertGemv"] * 2 + ["ExpertTiles"] * 2
            assert not choices[0].bucketed and choices[1].bucketed
            assert not choices[2].dequantized and choices[3].dequantized
            modelled = norms[0].add_rms_norm(h, TorchMoE()(x, one_token(layer), False), weight)
            for choice in choices:
                ours = norms[1].add_rms_norm(h, fused_moe.run(x, layer, choice), weight)
                for a, b in zip(
                    modelled if one_token_gemv(choice) else expected, ours, strict=True
                ):
                    close(b, a)


def int4_linear() -> None:
    """w4a16 against dequantize-then-matmul, by the tables' choices (the GEMV for 1 to 4 tokens,
    the split-K tile or the decode tile, the dequantizing copy) and each kernel explicitly: the
    GEMV gated, the tile kernel with and without split-K at the middle and prefill tiles; output
    widths that end mid-block; groups of 32 to 128."""
    from replica.kernels.int4_dequantize import dequantized
    from replica.kernels.int4_gemv import w4a16_gemv
    from replica.kernels.int4_matmul import w4a16_tiled
    from replica.kernels.launch import Tile, split_k
    from replica.ops.linear import TritonLinear
    from replica.ops.packed import dequantize, linear, quantize
    from replica.ops.tables import INT4_LINEAR_NARROW
    from tests.interpreted_int4 import one_token_weights

    assert split_k(2, 8, torch.device("cpu")) == 8  # 8 "SMs": 16 programs wanted
    ours = TritonLinear()
    tiles = {40: Tile(64, 64, 128, 4, 4), 130: Tile(128, 128, 64, 8, 3)}
    for depth, group in ((256, 128), (96, 32), (512, 64)):
        weight = quantize(torch.randn(72, depth), group_size=group)
        close(dequantized(weight, torch.float32), dequantize(weight, torch.float32))
        for tokens in (1, 3, 4, 8, 40, 130):
            x = torch.randn(tokens + 3, depth)[3:]  # a view that does not start at row 0
            # one token: the GEMV's own weights (interpreted_int4.one_token_weights)
            reference = x @ one_token_weights(weight).t() if tokens == 1 else linear(x, weight)
            close_in_scale(ours(x, weight), reference)
            if tokens in tiles:
                tiled = w4a16_tiled(x, weight, tiles[tokens])
                close_in_scale(tiled, linear(x, weight))
            gate, up = reference.chunk(2, dim=-1)
            if tokens <= 4:
                gated = w4a16_gemv(x, weight, INT4_LINEAR_NARROW.choose(tokens).gated, gated=True)
                close_in_scale(gated, torch.nn.functional.silu(gate) * up)
    strided = torch.randn(4, 2 * 256)[:, :256]  # rows of stride 512, as attention's output
    close(ours(strided, weight := quantize(torch.randn(40, 256))), strided @ dequantize(
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
            drawn, expected = sample_triton(*args, candidates=CANDIDATES), sample(*args)
            assert torch.equal(drawn, expected), (dtype, drawn, expected)


from tests import interpreted_int4  # noqa: E402 (the second design's kernels)

CHECKS = {
    "prefill": prefill,
    "decode": decode,
    "decode_roped": decode_roped,
    "elementwise": elementwise,
    "moe": moe,
    "moe_int4": moe_int4,
    "int4_linear": int4_linear,
    "sampling": sampling,
    "int4_splitk": interpreted_int4.int4_splitk,
    "one_token_gemv": interpreted_int4.one_token_gemv,
    "moe_fused": interpreted_int4.moe_fused,
    "spread_routing": interpreted_int4.spread_routing,
    "fused_routing": interpreted_int4.fused_routing,
}

if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.manual_seed(0)
    CHECKS[sys.argv[1]]()
