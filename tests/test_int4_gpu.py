"""The w4a16 kernels on CUDA against the dequantized reference at the real models' shapes, for
token counts from 1 to 16,384 (skipped without a GPU)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace

import pytest
import torch

from replica.kernels.int4_dequantize import dequantized
from replica.kernels.int4_gemv import w4a16_gemv
from replica.kernels.int4_splitk import SplitKTile, w4a16_splitk
from replica.kernels.moe import experts_gemv
from replica.kernels.moe_fused import FusedTile
from replica.kernels.moe_pairs import experts_pairs_one_launch, pair_tickets
from replica.kernels.moe_route import route_pairs
from replica.ops import tables, tinygemm
from replica.ops.feed_forward import TritonMoE
from replica.ops.linear import TritonLinear
from replica.ops.mlp import SparseMoE, moe_reference
from replica.ops.packed import dequantize, quantize

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOKENS = (1, 3, 8, 9, 16, 17, 64, 65, 256, 1000, 16384)
SHAPES = {  # (N, K) of each projection
    "4b qkv": (6144, 2560),
    "4b o_proj": (2560, 4096),
    "4b gate_up": (19456, 2560),
    "4b down": (2560, 9728),
    "235b qkv": (9216, 4096),
    "235b o_proj": (4096, 8192),
}


def finishes_within(seconds: float) -> None:
    """Wait for the GPU's queued work at most `seconds`. A kernel still running then (a spin
    that never ends) ends the process: CUDA cannot cancel it, and the rest of the run's device
    time would go waiting."""
    done = torch.cuda.Event()
    done.record()
    deadline = time.monotonic() + seconds
    while not done.query():
        if time.monotonic() > deadline:
            print(f"a kernel still ran after {seconds} s: stopping", file=sys.stderr, flush=True)
            os._exit(3)
        time.sleep(0.01)


def thirty_b_experts(gen: torch.Generator) -> SparseMoE:
    """A random 4-bit MoE layer of Qwen3-30B-A3B's shape (bf16)."""
    return SparseMoE(
        router=torch.randn(128, 2048, device="cuda", generator=gen, dtype=torch.bfloat16),
        gate_up=quantize(torch.randn(128, 1536, 2048, device="cuda", dtype=torch.bfloat16)),
        down=quantize(torch.randn(128, 2048, 768, device="cuda", dtype=torch.bfloat16)),
        top_k=8,
        norm_topk_prob=True,
    )


def rel_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).norm() / reference.float().norm()).item()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_w4a16_linear_matches_dequantized_matmul(shape: str):
    n, k = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = quantize(torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16))
    dense = dequantize(weight, torch.bfloat16)
    for tokens in TOKENS:
        x = torch.randn(tokens, k, device="cuda", generator=gen, dtype=torch.bfloat16)
        expected = x @ dense.t()
        assert rel_error(TritonLinear()(x, weight), expected) < 1e-2, tokens
        choice = tables.INT4_LINEAR_WIDE.choose(tokens)
        tile = choice.for_rows(n) if isinstance(choice, tables.SplitK) else SplitKTile(64, 64, 4, 3)
        assert rel_error(w4a16_splitk(x, weight, tile), expected) < 1e-2, tokens
    assert torch.equal(dequantized(weight, torch.bfloat16), dense)  # bf16 scales: exact


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("symmetric", [False, True])
def test_torch_int4_matmul_on_our_converted_weights(symmetric: bool):
    """Symmetric: tinygemm's weights are ours bit for bit; asymmetric: its bf16 zero rounds."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    w = torch.randn(6144, 2560, device="cuda", generator=gen, dtype=torch.bfloat16)
    weight = quantize(w, symmetric=symmetric)
    converted = tinygemm.convert(weight)
    eye = torch.eye(2560, device="cuda", dtype=torch.bfloat16)
    unpacked = tinygemm.matmul(eye, converted).t()  # its weights, exactly: one term a sum
    if symmetric:
        assert torch.equal(unpacked, dequantize(weight, torch.bfloat16))
    else:  # our model of its arithmetic, within a bf16 rounding
        modelled = tinygemm.dequantize(weight, torch.bfloat16).float()
        error = (unpacked.float() - modelled).abs().max().item()
        assert error <= 2**-8 * modelled.abs().max().item(), error
    for tokens in (1, 8, 64, 16384):
        x = torch.randn(tokens, 2560, device="cuda", generator=gen, dtype=torch.bfloat16)
        expected = x @ dequantize(weight, torch.bfloat16).t()
        assert rel_error(tinygemm.matmul(x, converted), expected) < 1e-2, tokens


@gpu
@pytest.mark.gpu
def test_gated_gemv_fuses_silu_times_up():
    gen = torch.Generator(device="cuda").manual_seed(2)
    weight = quantize(torch.randn(19456, 2560, device="cuda", generator=gen, dtype=torch.bfloat16))
    dense = dequantize(weight, torch.bfloat16)
    for tokens in (1, 2, 3, 4):
        x = torch.randn(tokens, 2560, device="cuda", generator=gen, dtype=torch.bfloat16)
        gate, up = (x @ dense.t()).chunk(2, dim=-1)
        expected = torch.nn.functional.silu(gate) * up
        tile = tables.INT4_LINEAR_NARROW.choose(tokens).gated
        assert rel_error(w4a16_gemv(x, weight, tile, gated=True), expected) < 1e-2, tokens
    for tokens in (1, 8, 16, 64):  # and fused into the split-K tile, plain and with PTX weights
        x = torch.randn(tokens, 2560, device="cuda", generator=gen, dtype=torch.bfloat16)
        gate, up = (x @ dense.t()).chunk(2, dim=-1)
        expected = torch.nn.functional.silu(gate) * up
        for tile in (SplitKTile(16, 128, 4, 3), SplitKTile(64, 64, 4, 3, ptx=True)):
            ours = w4a16_splitk(x, weight, tile, gated=True)
            assert rel_error(ours, expected) < 1e-2, (tokens, tile)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("experts", "hidden", "inter", "top_k"), [(128, 2048, 768, 8)])
def test_packed_fused_experts_match_the_expert_loop(experts, hidden, inter, top_k):
    gen = torch.Generator(device="cuda").manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen, dtype=torch.bfloat16)

    moe = SparseMoE(
        router=randn(experts, hidden),
        gate_up=quantize(randn(experts, 2 * inter, hidden) / hidden**0.5),
        down=quantize(randn(experts, hidden, inter) / inter**0.5),
        top_k=top_k,
        norm_topk_prob=True,
    )
    # groups of 128: the fused kernel to 64 tokens (a program a pair at 1), 2048: dequantized
    fused_moe = TritonMoE()
    for tokens in (1, 8, 16, 17, 64, 2048):
        x = randn(tokens, hidden)
        fused = fused_moe(x, moe, tokens <= 64).unflatten(0, (tokens, top_k)).float().sum(1)
        assert rel_error(fused, moe_reference(x, moe)) < 2e-2, tokens
    x = randn(64, hidden)
    choices = {
        "pairs": tables.MOE_NARROW_DECODE.choose(1),
        "buckets": tables.MOE_NARROW_DECODE.choose(4),
        "tiles": tables.MOE_NARROW_DECODE.choose(8),
        "dequantized": tables.MOE_NARROW_PREFILL.choose(8),
        "fused": tables.MOE_PACKED_DECODE.choose(1),
        "fused wide": tables.MOE_PACKED_DECODE.choose(8),
    }
    for path, choice in choices.items():
        fused = fused_moe.run(x, moe, choice).unflatten(0, (64, top_k)).float().sum(1)
        assert rel_error(fused, moe_reference(x, moe)) < 2e-2, path


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ptx_weights_give_the_plain_tiles_outputs_bit_for_bit(dtype: torch.dtype):
    """The PTX path makes the oracle's weights, as the plain one does, and feeds the same dots:
    the outputs are equal (tests/test_int4_ptx.py checks the PTX's weights on the CPU)."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    weight = quantize(torch.randn(2560, 4096, device="cuda", generator=gen, dtype=dtype))
    for tokens, tile in ((1, SplitKTile(16, 128, 4, 3)), (64, SplitKTile(64, 64, 2, 3))):
        x = torch.randn(tokens, 4096, device="cuda", generator=gen, dtype=dtype)
        plain = w4a16_splitk(x, weight, tile)
        assert torch.equal(w4a16_splitk(x, weight, replace(tile, ptx=True)), plain), tokens
        assert rel_error(plain, x @ dequantize(weight, dtype).t()) < 1e-2, tokens
    experts, hidden, inter = 16, 512, 256
    moe = SparseMoE(
        router=torch.randn(experts, hidden, device="cuda", generator=gen, dtype=dtype),
        gate_up=quantize(torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=dtype)),
        down=quantize(torch.randn(experts, hidden, inter, device="cuda", dtype=dtype)),
        top_k=4,
        norm_topk_prob=True,
    )
    x = torch.randn(40, hidden, device="cuda", generator=gen, dtype=dtype) / hidden**0.5
    tile = FusedTile(16, 64, 128, 4, 3)
    plain = TritonMoE().run(x, moe, tables.FusedExperts(tile))
    ptx = TritonMoE().run(x, moe, tables.FusedExperts(replace(tile, ptx=True)))
    assert torch.equal(ptx, plain)


@gpu
@pytest.mark.gpu
def test_two_groups_a_step_give_the_served_tiles_outputs_bit_for_bit():
    """span_dots' TWO moves the scale loads, not the sums: K whole (no split to differ), the
    served split-K tiles at 8 and 64 tokens and the served fused tiles equal one group a step's
    outputs; K split, within the oracle's tolerance."""
    gen = torch.Generator(device="cuda").manual_seed(6)
    weight = quantize(torch.randn(2560, 4096, device="cuda", generator=gen, dtype=torch.bfloat16))
    for tokens in (8, 64):
        x = torch.randn(tokens, 4096, device="cuda", generator=gen, dtype=torch.bfloat16)
        tile = tables.INT4_LINEAR_WIDE.choose(tokens).for_rows(2560)
        whole = replace(tile, waves=0)
        two = w4a16_splitk(x, weight, replace(whole, two_groups=True))
        assert torch.equal(two, w4a16_splitk(x, weight, whole)), tokens
        split = w4a16_splitk(x, weight, replace(tile, two_groups=True))
        assert rel_error(split, x @ dequantize(weight, torch.bfloat16).t()) < 1e-2, tokens
    moe = thirty_b_experts(gen)
    for tokens in (8, 64):
        x = torch.randn(tokens, 2048, device="cuda", generator=gen, dtype=torch.bfloat16)
        served = tables.MOE_PACKED_DECODE.choose(tokens * 8 / 128)
        two = tables.FusedExperts(replace(served.tile, two_groups=True))
        ones = TritonMoE().run(x / 2048**0.5, moe, served)
        assert torch.equal(TritonMoE().run(x / 2048**0.5, moe, two), ones), tokens


@gpu
@pytest.mark.gpu
def test_pairs_in_one_launch_replay_as_the_two_launches():
    """The 30B's and the 235B's experts at 1 and 2 tokens: gate-up and down in one launch
    (replica.kernels.moe_pairs), captured in a CUDA graph and replayed on new states and
    routings, give the two launches' outputs bit for bit and leave the tickets at zero."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    tiles = (tables.EXPERT_PAIRS.up, tables.EXPERT_PAIRS.down)
    for hidden, inter in ((2048, 768), (4096, 1536)):
        moe = SparseMoE(
            router=torch.randn(128, hidden, device="cuda", generator=gen, dtype=torch.bfloat16),
            gate_up=quantize(torch.randn(128, 2 * inter, hidden, device="cuda").bfloat16()),
            down=quantize(torch.randn(128, hidden, inter, device="cuda").bfloat16()),
            top_k=8,
            norm_topk_prob=True,
        )
        tickets = pair_tickets(torch.device("cuda"))
        for tokens in (1, 2):
            x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5
            counts = torch.zeros(128, dtype=torch.int32, device="cuda")
            routing = route_pairs(x, moe.router, 8, True, counts)
            experts_pairs_one_launch(x, moe.gate_up, moe.down, routing, tiles, tickets)
            finishes_within(20.0)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = experts_pairs_one_launch(x, moe.gate_up, moe.down, routing, tiles, tickets)
            for _ in range(3):
                x.copy_(torch.randn_like(x) / hidden**0.5)
                new = route_pairs(x, moe.router, 8, True, counts)
                routing.experts.copy_(new.experts)
                routing.weights.copy_(new.weights)
                graph.replay()
                two = experts_gemv(x, moe.gate_up, moe.down, routing, tiles, False)
                assert torch.equal(out, two), (hidden, tokens)
                assert not tickets.any()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tokens_on_m_match_the_oracle(dtype: torch.dtype):
    """group_dots' ON_M (one dot a group, x read in the slabs' column order) at 33 and 64
    tokens, the 4B's o and gate_up shapes, plain and PTX weights, one and two groups a step."""
    gen = torch.Generator(device="cuda").manual_seed(8)
    for n, k in ((2560, 4096), (19456, 2560)):
        weight = quantize(torch.randn(n, k, device="cuda", generator=gen, dtype=dtype))
        oracle = dequantize(weight, dtype)
        for tokens in (33, 64):
            x = torch.randn(tokens, k, device="cuda", generator=gen, dtype=dtype)
            for tile in (SplitKTile(64, 64, 4, 3), SplitKTile(64, 128, 4, 2)):
                for ptx, two in ((False, False), (True, False), (True, True)):
                    on_m = replace(tile, ptx=ptx, two_groups=two, tokens_on_m=True)
                    ours = w4a16_splitk(x, weight, on_m)
                    assert rel_error(ours, x @ oracle.t()) < 1e-2, (n, tokens, on_m)


@gpu
@pytest.mark.gpu
def test_gemv_loads_a_step_ahead_give_the_same_outputs_bit_for_bit():
    """Prefetching moves the one-token GEMV's loads, not its arithmetic: a projection, the fused
    gate-up and the experts' pairs equal the served tiles' outputs."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    weight = quantize(torch.randn(6144, 2560, device="cuda", generator=gen, dtype=torch.bfloat16))
    x = torch.randn(1, 2560, device="cuda", generator=gen, dtype=torch.bfloat16)
    gemv = tables.INT4_LINEAR_WIDE.choose(1)
    for tile, gated in ((gemv.tile, False), (gemv.gated, True), (gemv.shallow, False)):
        served = w4a16_gemv(x, weight, tile, gated=gated)
        ahead = w4a16_gemv(x, weight, replace(tile, prefetch=True), gated=gated)
        assert torch.equal(ahead, served), tile
    moe = thirty_b_experts(gen)
    x = torch.randn(1, 2048, device="cuda", generator=gen, dtype=torch.bfloat16) / 2048**0.5
    pairs = tables.EXPERT_PAIRS
    ahead = replace(
        pairs, up=replace(pairs.up, prefetch=True), down=replace(pairs.down, prefetch=True)
    )
    assert torch.equal(TritonMoE().run(x, moe, ahead), TritonMoE().run(x, moe, pairs))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_launch_routing_routes_as_the_plain_one_in_a_graph(dtype: torch.dtype):
    """The 30B's and the 235B's routers, 1 to 64 tokens, the routing captured in a CUDA graph
    and replayed on new states: each replay's pairs are the plain routing's."""
    from tests.interpreted_int4 import assert_same_routing

    gen = torch.Generator(device="cuda").manual_seed(2)
    for hidden in (2048, 4096):
        router = torch.randn(128, hidden, device="cuda", generator=gen).to(dtype)
        counts = torch.zeros(128, dtype=torch.int32, device="cuda")
        ticket = torch.zeros(1, dtype=torch.int32, device="cuda")
        for tokens in (1, 8, 16, 64):
            x = torch.empty(tokens, hidden, device="cuda", dtype=dtype)
            route_pairs(x.normal_(generator=gen), router, 8, True, counts, ticket)  # compiled
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fused = route_pairs(x, router, 8, True, counts, ticket)
            for _ in range(2):
                x.normal_(generator=gen)
                graph.replay()
                plain = route_pairs(x, router, 8, True, torch.empty_like(counts))
                assert_same_routing(fused, plain)
            assert ticket.item() == 0


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_routing_with_the_norm_replays_as_the_norm_then_the_routing(dtype: torch.dtype):
    """The one launch taking the layer's add + RMSNorm, at the 30B's and the 235B's sizes, 1 to
    8 tokens, captured in a CUDA graph and replayed on new states: the layer ops' add + RMSNorm
    (h + delta exactly, its norm within a rounding), routed as the plain routing routes it."""
    from replica.kernels.moe_route import ResidualNorm, route_normed, route_pairs
    from replica.ops.layer import TritonLayerOps
    from tests.interpreted_int4 import assert_same_routing

    gen = torch.Generator(device="cuda").manual_seed(3)
    layer_ops = TritonLayerOps(2, 1, 16, 1e-6, torch.ones(8, device="cuda"))
    for hidden in (2048, 4096):
        router = torch.randn(128, hidden, device="cuda", generator=gen).to(dtype)
        weight = (torch.rand(hidden, device="cuda", generator=gen) + 0.5).to(dtype)
        counts = torch.zeros(128, dtype=torch.int32, device="cuda")
        ticket = torch.zeros(1, dtype=torch.int32, device="cuda")
        for tokens in (1, 8):
            h, delta = torch.empty(2, tokens, hidden, device="cuda", dtype=dtype)
            norm = ResidualNorm(h, delta, weight, 1e-6)
            route_normed(norm, router, 8, True, counts, ticket)  # compiled before the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                got_h, got_x, fused = route_normed(norm, router, 8, True, counts, ticket)
            for _ in range(2):
                h.normal_(generator=gen)
                delta.normal_(generator=gen)
                graph.replay()
                want_h, want_x = layer_ops.add_rms_norm(h, delta, weight)
                assert torch.equal(got_h, want_h) and ticket.item() == 0
                torch.testing.assert_close(got_x, want_x, rtol=1e-2, atol=1e-2)
                plain = route_pairs(got_x, router, 8, True, torch.empty_like(counts))
                assert_same_routing(fused, plain)
