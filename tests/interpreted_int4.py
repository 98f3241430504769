"""The second design's 4-bit kernels (issue 36) against the dequantize oracle in Triton's
interpreter, at shapes that straddle their tiles: run through tests/interpreted_kernels.py."""

from __future__ import annotations

import torch

from replica.ops.packed import PackedInt4, linear, quantize, unpack


def close_in_scale(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """fp32 scales round (128 + q) s, about 16x the weight: errors relative to the output's
    scale (tests/interpreted_kernels.py says why)."""
    error = (ours - reference).abs().max().item()
    assert error <= 2e-5 * reference.abs().max().item(), (error, reference.abs().max().item())


def asymmetric(n: int, k: int, group: int, lead: tuple[int, ...] = ()) -> PackedInt4:
    """Zero points spread over 0..15 (not 8 everywhere): a wrong zero shows."""
    return quantize(torch.randn(*lead, n, k) + torch.rand(*lead, n, 1) * 3, group_size=group)


def one_token_weights(weight: PackedInt4) -> torch.Tensor:
    """The weights the one-token GEMV computes with, fp32 [..., N, K]: in each group the second
    half's columns (nibbles 4 to 7 of its words) read 1/2^16 of the first half's nibble over
    (replica.kernels.int4_gemv_rows._one_token_nibbles), everything else exact."""
    half = weight.group_size // 2
    q = unpack(weight.qweight, weight.group_size).double().unflatten(-1, (-1, 2, half))
    q[..., 1, :] += q[..., 0, :] / 65536
    w = (q.flatten(-2) - weight.zeros.double()[..., None]) * weight.scales.double()[..., None]
    return w.flatten(-2).float()


def one_token_gemv() -> None:
    """The one-token GEMV (four sets of rows sharing x) against the weights it computes with,
    and those within 15 / 2^16 of a step of the oracle's: widths that end mid-set and mid-block
    (70 rows: row 69 of the second set live, row 71 of the fourth not; a gate of 35), tiles of 2
    to 8 rows a set, a K split, loop steps that do not divide K (the last one masked), groups of
    128 and 256, a strided x, loads a step ahead (`prefetch`); a tile whose rows do not split in
    four, refused."""
    from replica.kernels.int4_gemv import GemvTile, w4a16_gemv

    tiles = (GemvTile(8, 8, 4), GemvTile(16, 4, 4), GemvTile(32, 2, 4), GemvTile(8, 16, 4))
    tiles += (GemvTile(16, 4, 4, prefetch=True), GemvTile(8, 16, 4, prefetch=True))
    for depth, group in ((384, 128), (1280, 128), (768, 256)):
        x = torch.randn(1, 2 * depth)[:, :depth]
        weight = asymmetric(70, depth, group)
        modelled = x @ one_token_weights(weight).t()  # within the bound of the oracle's
        steps = weight.scales.repeat_interleave(group, dim=-1)
        bound = 15 / 65536 * (x.abs() @ steps.t()) + 1e-4
        assert ((modelled - linear(x, weight)).abs() <= bound).all()
        gate, up = modelled.chunk(2, dim=-1)
        for tile in tiles:
            close_in_scale(w4a16_gemv(x, weight, tile), modelled)
            ours = w4a16_gemv(x, weight, tile, gated=True)
            close_in_scale(ours, torch.nn.functional.silu(gate) * up)
    try:  # a block's rows in four sets: 6 rows are not
        w4a16_gemv(x, weight, GemvTile(6, 4, 4))
    except ValueError:
        pass
    else:
        raise AssertionError("a one-token tile of 6 rows was launched")


def int4_splitk() -> None:
    """Tokens 1 to 40 (one and three token tiles, a tile cut short), 72 features (a block cut
    short), split-K of several lengths and none (the GEMV's too), groups of 128 and 256, a
    strided x; a PTX tile takes the plain path here (the interpreter runs no PTX); SiLU(gate) *
    up fused into the tile, by the kernel and through the MLP op whose table asks for it."""
    from dataclasses import replace

    from replica.kernels.int4_gemv import w4a16_gemv
    from replica.kernels.int4_splitk import SplitKTile, splits, w4a16_splitk
    from replica.kernels.launch import split_k
    from replica.ops import tables
    from replica.ops.feed_forward import TritonMLP, silu_mul
    from replica.ops.linear import TritonLinear
    from replica.ops.tables import GEMV_2, Entry, SplitK, Table

    assert splits(3, 3, 2, torch.device("cpu")) == 3  # 8 "SMs": 16 programs wanted, 3 groups
    assert splits(3, 20, 2, torch.device("cpu")) == 5  # 6 slices of 4 would leave one empty
    for depth, group in ((384, 128), (1280, 128), (512, 256)):
        weight = asymmetric(72, depth, group)
        for tokens, tile in ((1, SplitKTile(16, 32, 4, 2)), (17, SplitKTile(16, 64, 4, 2)),
                             (40, SplitKTile(32, 32, 4, 2, waves=0, ptx=True))):  # fmt: skip
            x = torch.randn(tokens, 2 * depth)[:, :depth]
            close_in_scale(w4a16_splitk(x, weight, tile), linear(x, weight))
    deep = asymmetric(72, 1280, 128)  # the GEMV's split K
    assert split_k(3, 10, torch.device("cpu")) == 2  # 3 feature blocks: K split in two
    for tokens in (1, 2, 3):
        x = torch.randn(tokens, 1280)
        close_in_scale(w4a16_gemv(x, deep, GEMV_2.tile), linear(x, deep))
    served = TritonLinear()  # the served table through the ops layer
    for tokens in (3, 20, 64):
        assert isinstance(served.choose(tokens, weight), SplitK)
        x = torch.randn(tokens, 512)
        close_in_scale(served(x, weight), linear(x, weight))
    for tokens, tile in ((1, SplitKTile(16, 32, 4, 2)), (17, SplitKTile(32, 16, 4, 2, ptx=True))):
        x = torch.randn(tokens, 512)  # SiLU(gate) * up fused: a gate of 36 rows, K whole
        expected = silu_mul(linear(x, weight))
        close_in_scale(w4a16_splitk(x, weight, tile, gated=True), expected)
    fused = replace(tables.INT4_LINEAR_WIDE.choose(20), gated=True)
    mlp = TritonMLP(TritonLinear(lambda group: Table("fused", "tokens", (Entry(64, fused, ""),))))
    x = torch.randn(20, 512)
    close_in_scale(mlp.gated(x, weight), silu_mul(linear(x, weight)))
    two_groups_a_step(w4a16_splitk, SplitKTile)
    tokens_on_m(w4a16_splitk, SplitKTile)


def tokens_on_m(w4a16_splitk, SplitKTile) -> None:
    """Tokens on the MMA's M side, one dot a group (the slabs concatenated, x read in their
    column order): against the oracle at 17 and 40 tokens (blocks cut short), K split and
    whole, groups of 128 and 256, and two groups a step."""
    for depth, group in ((1280, 128), (512, 256)):
        weight = asymmetric(72, depth, group)
        for tokens in (17, 40):
            x = torch.randn(tokens, 2 * depth)[:, :depth]  # strided
            for tile in (
                SplitKTile(64, 32, 4, 2, tokens_on_m=True),
                SplitKTile(32, 64, 4, 2, 0, True, tokens_on_m=True),
            ):
                close_in_scale(w4a16_splitk(x, weight, tile), linear(x, weight))
            two = SplitKTile(64, 16, 4, 2, two_groups=True, tokens_on_m=True)
            close_in_scale(w4a16_splitk(x, weight, two), linear(x, weight))


def two_groups_a_step(w4a16_splitk, SplitKTile) -> None:
    """Two groups a loop step: K whole, the outputs of one group a step bit for bit (the same
    sums in the same order); K split, slices rounded to an even count of groups (10 groups in
    4 slices of 3 would be 3 of 4); an odd count of groups (3) one a step."""
    from dataclasses import replace

    for depth, group in ((1280, 128), (512, 256), (384, 128)):
        weight = asymmetric(72, depth, group)
        x = torch.randn(17, depth)
        whole = SplitKTile(32, 32, 4, 2, waves=0)
        two = w4a16_splitk(x, weight, replace(whole, two_groups=True))
        assert torch.equal(two, w4a16_splitk(x, weight, whole)), depth
        split = SplitKTile(16, 16, 4, 2, two_groups=True)  # 5 feature blocks: K split in 3
        close_in_scale(w4a16_splitk(x, weight, split), linear(x, weight))


def packed_experts(experts: int, hidden: int, inter: int, top_k: int):
    """A random MoE layer, its experts packed in groups of 128 with asymmetric zeros."""
    from replica.ops.mlp import SparseMoE

    return SparseMoE(
        router=torch.randn(experts, hidden),
        gate_up=asymmetric(2 * inter, hidden, 128, (experts,)),
        down=asymmetric(hidden, inter, 128, (experts,)),
        top_k=top_k,
        norm_topk_prob=True,
    )


def moe_fused() -> None:
    """The fused 4-bit experts against the expert loop: 1 token (segments of one pair), 5 and
    40 (segments of several blocks, blocks past the last segment), top-2 and top-3, asymmetric
    zeros, groups of 128."""
    from replica.kernels.moe_fused import FusedTile, experts_fused, max_blocks, segments
    from replica.kernels.moe_route import route_pairs
    from replica.ops.feed_forward import TritonMoE
    from replica.ops.mlp import moe_reference

    experts, hidden, inter = 8, 256, 128
    tile = FusedTile(16, 32, 64, 4, 2, ptx=True)  # the plain path here: no PTX in the interpreter
    assert max_blocks(2, 8, 16) == 2 and max_blocks(80, 8, 16) == 12
    for top_k, tokens in ((2, 1), (3, 5), (2, 40)):
        layer = packed_experts(experts, hidden, inter, top_k)
        x = torch.randn(tokens, hidden)
        counts = torch.zeros(experts, dtype=torch.int32)
        routing = route_pairs(x, layer.router, top_k, True, counts)
        seg = segments(routing, tile.tokens)
        live = seg.experts >= 0
        assert live.sum() == ((counts + 15) // 16).sum() and not live[live.sum() :].any()
        filed = seg.pairs[seg.pairs < tokens * top_k]
        assert torch.equal(filed.sort().values, torch.arange(tokens * top_k, dtype=torch.int32))
        expected = moe_reference(x, layer)
        ours = experts_fused(x, layer.gate_up, layer.down, routing, tile)
        close_in_scale(ours.view(tokens, top_k, hidden).sum(1), expected)
        served = TritonMoE()(x, layer, True)  # the served table, a decode step
        close_in_scale(served.view(tokens, top_k, hidden).sum(1), expected)
    fused_two_groups(tile)
    served_pairs(hidden, inter)


def fused_two_groups(tile) -> None:
    """The fused experts two groups a loop step give one group a step's outputs bit for bit:
    gate-up over 2 groups, down over 2 (an even count) and over 1 (odd: one a step)."""
    from dataclasses import replace

    from replica.kernels.moe_fused import experts_fused
    from replica.kernels.moe_route import route_pairs

    for inter in (256, 128):
        layer = packed_experts(8, 256, inter, 2)
        x = torch.randn(5, 256)
        routing = route_pairs(x, layer.router, 2, True, torch.zeros(8, dtype=torch.int32))
        one = experts_fused(x, layer.gate_up, layer.down, routing, tile)
        two = experts_fused(x, layer.gate_up, layer.down, routing, replace(tile, two_groups=True))
        assert torch.equal(two, one), inter


def served_pairs(hidden: int, inter: int) -> None:
    """Under a quarter pair an expert (one token, top-2 of 16) the served table runs a program a
    pair (the one-token GEMV, its down tile deeper than the 128 columns K holds); and its tiles
    with loads a step ahead."""
    from dataclasses import replace

    from replica.ops import tables
    from replica.ops.feed_forward import TritonMoE
    from replica.ops.mlp import moe_reference

    experts, top_k = 16, 2
    assert isinstance(tables.moe_table(128, True).choose(top_k / experts), tables.ExpertGemv)
    layer = packed_experts(experts, hidden, inter, top_k)
    gate_up, down = one_token_weights(layer.gate_up), one_token_weights(layer.down)
    x = torch.randn(1, hidden)
    expected = moe_reference(x, replace(layer, gate_up=gate_up, down=down))
    served = TritonMoE()(x, layer, True)
    close_in_scale(served.view(1, top_k, hidden).sum(1), expected)
    pairs = tables.EXPERT_PAIRS
    ahead = replace(
        pairs, up=replace(pairs.up, prefetch=True), down=replace(pairs.down, prefetch=True)
    )
    prefetched = TritonMoE().run(x, layer, ahead)
    close_in_scale(prefetched.view(1, top_k, hidden).sum(1), expected)
    pairs_in_one_launch(layer, hidden)


def pairs_in_one_launch(layer, hidden: int) -> None:
    """The pair GEMV's gate-up and down in one launch (replica.kernels.moe_pairs): the two
    launches' outputs bit for bit at 2 tokens (4 pairs), twice on the same tickets, which are zero
    after each call; then TritonMoE through an entry that asks for it."""
    from dataclasses import replace

    from replica.kernels.moe import experts_gemv
    from replica.kernels.moe_pairs import experts_pairs_one_launch, pair_tickets
    from replica.kernels.moe_route import route_pairs
    from replica.ops import tables
    from replica.ops.feed_forward import TritonMoE

    tiles = (tables.EXPERT_PAIRS.up, tables.EXPERT_PAIRS.down)
    tickets = pair_tickets(torch.device("cpu"))
    x = torch.randn(2, hidden)
    counts = torch.zeros(layer.num_experts, dtype=torch.int32)
    routing = route_pairs(x, layer.router, layer.top_k, True, counts)
    two = experts_gemv(x, layer.gate_up, layer.down, routing, tiles, False)
    for _ in range(2):
        one = experts_pairs_one_launch(x, layer.gate_up, layer.down, routing, tiles, tickets)
        assert torch.equal(one, two)
        assert not tickets.any(), tickets.nonzero()
    one_launch = replace(tables.EXPERT_PAIRS, one_launch=True)
    assert torch.equal(
        TritonMoE().run(x, layer, one_launch), TritonMoE().run(x, layer, tables.EXPERT_PAIRS)
    )


def spread_routing() -> None:
    """benchmarks.bench_moe.spread_routing: tokens that share one large component go to a few
    experts; inside it the same batch spreads over many, routed by `routing_rows`, while the
    experts still compute on the states themselves (the reference routed the same way)."""
    from unittest import mock

    from benchmarks.bench_moe import routing_rows, spread_routing
    from replica.ops import mlp
    from replica.ops.feed_forward import TritonMoE
    from replica.ops.mlp import SparseMoE, moe_reference

    experts, hidden, inter, top_k, tokens = 64, 128, 32, 4, 64
    layer = SparseMoE(
        router=torch.randn(experts, hidden),
        gate_up=torch.randn(experts, 2 * inter, hidden) / hidden**0.5,
        down=torch.randn(experts, hidden, inter) / inter**0.5,
        top_k=top_k,
        norm_topk_prob=True,
    )
    x = 10 * torch.randn(hidden) + 0.3 * torch.randn(tokens, hidden)
    moe = TritonMoE()
    moe(x, layer, True)
    few = int((moe.expert_counts(layer) > 0).sum())
    with spread_routing():
        out = moe(x, layer, True)
    many = int((moe.expert_counts(layer) > 0).sum())
    assert few <= 2 * top_k and many >= experts // 2, (few, many)
    route = mlp.route
    with mock.patch.object(mlp, "route", lambda x, moe: route(routing_rows(x), moe)):
        expected = moe_reference(x, layer)
    close_in_scale(out.view(tokens, top_k, hidden).sum(1), expected)


def assert_same_routing(fused, plain) -> None:
    """The one-launch routing's pairs are the plain routing's, filed in token order."""
    assert torch.equal(fused.experts, plain.experts), (fused.experts, plain.experts)
    torch.testing.assert_close(fused.weights, plain.weights, rtol=1e-4, atol=1e-5)
    assert torch.equal(fused.counts, plain.counts)
    for e, count in enumerate(fused.counts.tolist()):
        filed = fused.bucket[e, :count]
        assert torch.equal(filed, plain.bucket[e, :count].sort().values), e
        assert torch.equal(fused.experts[filed.long()], torch.full_like(filed, e))


def normed_routing(router, top_k: int, tokens: int, counts, ticket) -> None:
    """The one launch taking the layer's add + RMSNorm too: h + delta and its norm as the layer
    ops' kernel writes them, routed as the plain routing routes that norm."""
    from replica.kernels.moe_route import ResidualNorm, route_normed, route_pairs
    from replica.ops.layer import TritonLayerOps

    hidden = router.shape[1]
    h, delta = torch.randn(2, tokens, hidden) * 3
    weight = torch.rand(hidden) + 0.5
    layer_ops = TritonLayerOps(2, 1, 16, 1e-6, torch.ones(8))
    want_h, want_x = layer_ops.add_rms_norm(h, delta, weight)
    for _ in range(2):
        got_h, got_x, routing = route_normed(
            ResidualNorm(h, delta, weight, 1e-6), router, top_k, True, counts, ticket
        )
        assert torch.equal(got_h, want_h) and ticket.item() == 0
        torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-6)
        plain = route_pairs(got_x, router, top_k, True, torch.empty_like(counts))
        assert_same_routing(routing, plain)


def fused_routing() -> None:
    """The one-launch routing against the router's GEMM and a program a token: the same
    weights and experts, every expert's pairs filed in token order, counts written without a
    memset, the ticket back at zero so the next call (a graph's next replay) routes too.
    Experts past a multiple of 16, a padded top-k, 1 to 40 tokens, 1 to 8 slices of hidden;
    then TritonMoE through a table that asks for it, which routes 16-bit states alone so."""
    from dataclasses import replace
    from unittest import mock

    from replica.kernels.moe_route import fused_slices, route_pairs
    from replica.ops import feed_forward, tables
    from replica.ops.feed_forward import TritonMoE

    for experts, hidden, top_k, tokens, dtype in (
        (20, 64, 3, 1, torch.float32),
        (20, 256, 2, 5, torch.float32),
        (64, 512, 4, 40, torch.float32),
    ):  # 16-bit states on the GPU alone (tests/test_int4_gpu.py): the interpreter's bf16 dot
        router = torch.randn(experts, hidden).to(dtype)
        counts = torch.full((experts,), 7, dtype=torch.int32)  # stale: the kernel writes them
        ticket = torch.zeros(1, dtype=torch.int32)
        assert fused_slices(hidden) == min(hidden // 64, 8)
        for _ in range(2):
            x = torch.randn(tokens, hidden).to(dtype)
            plain = route_pairs(x, router, top_k, True, torch.empty_like(counts))
            fused = route_pairs(x, router, top_k, True, counts, ticket)
            assert ticket.item() == 0
            assert_same_routing(fused, plain)
        normed_routing(router, top_k, tokens, counts, ticket)

    layer = packed_experts(16, 128, 32, 2)
    layer = replace(layer, router=layer.router.bfloat16())
    fused_table = tables.Table(
        "fused", "tokens", (tables.Entry(float("inf"), tables.Route(True), "t"),)
    )
    moe, tickets = TritonMoE(routes=lambda: fused_table), []

    def spy(*args):
        tickets.append(args[5] is not None)
        return route_pairs(*args)

    with mock.patch.object(feed_forward, "route_pairs", spy):
        for tokens, dtype in ((3, torch.bfloat16), (3, torch.float32), (65, torch.bfloat16)):
            routing = moe.route(torch.randn(tokens, 128).to(dtype), layer)
            assert moe.expert_counts(layer).sum().item() == tokens * 2 == routing.experts.numel()
    assert tickets == [True, False, False]  # fp32 states and 65 tokens: three launches
    moe_from_residual(packed_experts(16, 128, 32, 2))


def moe_from_residual(layer) -> None:
    """TritonMoE taking the layer's add + RMSNorm in its routing where its table says so (16-bit
    decode states of up to 8 tokens), and (in fp32, the interpreter's) the layer ops' add +
    RMSNorm then the MoE: the same residual and output."""
    from replica.ops import tables
    from replica.ops.feed_forward import TritonMoE
    from replica.ops.layer import TritonLayerOps

    normed = tables.Route(fused=True, normed=True)
    routes = tables.Table(
        "normed", "tokens", (tables.Entry(8, normed, "t"), tables.MOE_ROUTE.entries[-1])
    )
    moe = TritonMoE(routes=lambda: routes)
    states = [
        torch.empty(tokens, 128, dtype=dtype)
        for tokens, dtype in ((8, torch.bfloat16), (9, torch.bfloat16), (8, torch.float32))
    ]
    assert [moe.takes_residual(h, True) for h in states] == [True, False, False]
    assert not moe.takes_residual(states[0], False)  # a prefill: the layer ops' kernel
    layer_ops = TritonLayerOps(2, 1, 16, 1e-6, torch.ones(8))
    h, delta = torch.randn(2, 1, 128)  # a token: the pairs' GEMV (the tiles are slow here)
    weight = torch.rand(128) + 0.5
    for _ in range(2):  # the layer's ticket back at zero between calls
        got_h, got = moe.from_residual((h, delta, weight, 1e-6), layer, True)
        want_h, x = layer_ops.add_rms_norm(h, delta, weight)
        assert torch.equal(got_h, want_h)
        close_in_scale(got, TritonMoE()(x, layer, True))
