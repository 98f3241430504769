"""Attention backends: the reference against a float64 loop on CPU, every GPU backend against
the reference (relative error < 1e-2 over random lengths 1..4096, 32 query / 8 KV heads)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from replica.ops.attention import (
    BlockTables,
    CachedContext,
    LayerCache,
    PackedRows,
    flash_attn_available,
)
from replica.ops.attention.reference import ReferenceAttention
from replica.ops.select import select_attention

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [Lq, Hq, D] over k/v [Lk, Hkv, D]; query i sees keys 0 .. Lk - Lq + i. float64."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    offset = k.shape[0] - q.shape[0]
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        for h in range(q.shape[1]):
            keys = k[: offset + i + 1, h // group]
            weights = torch.softmax(keys @ q[i, h] / q.shape[-1] ** 0.5, dim=0)
            out[i, h] = weights @ v[: offset + i + 1, h // group]
    return out


def packed_rows(lengths: list[int], device: str = "cpu") -> tuple[PackedRows, list[slice]]:
    rows = PackedRows.from_lengths(lengths, torch.device(device))
    starts = rows.cu_seqlens.tolist()
    return rows, [slice(a, b) for a, b in itertools.pairwise(starts)]


def test_packed_rows_pad_and_unpad():
    rows, spans = packed_rows([3, 1, 2])
    x = torch.arange(6.0)[:, None]
    padded = rows.pad(x)[..., 0]
    assert padded.tolist() == [[0, 1, 2], [3, 0, 0], [4, 5, 0]]
    assert torch.equal(rows.unpad(rows.pad(x)), x)
    assert rows.last_token.tolist() == [2, 3, 5]
    assert [s.stop - s.start for s in spans] == [3, 1, 2]


def paged_cache(
    sequences: list[torch.Tensor], blocks: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random cache [blocks, block_size, H, D] holding each sequence [L, H, D] in scattered
    blocks, and the block tables [B, W] int32 that find them."""
    first = sequences[0]
    cache = torch.randn(
        blocks, block_size, *first.shape[1:], generator=generator, device=first.device
    ).to(first.dtype)
    order = torch.randperm(blocks, generator=generator, device=first.device).tolist()
    width = max(-(-len(seq) // block_size) for seq in sequences)
    tables = []
    for seq in sequences:
        need = -(-len(seq) // block_size)
        table, order = order[:need], order[need:]
        flat = cache[table].flatten(0, 1)
        flat[: len(seq)] = seq
        cache[table] = flat.unflatten(0, (need, block_size))
        tables.append(table + [0] * (width - need))
    return cache, torch.tensor(tables, dtype=torch.int32, device=first.device)


def with_context(
    context: list[int], lengths: list[int], heads: tuple[int, int], dim: int, device: str, dtype
) -> tuple[torch.Tensor, ...]:
    """Rows whose first context[b] tokens are cached and whose next lengths[b] are the chunk:
    q/k/v of the chunks, packed; the full K/V of each row; the caches and their context."""
    gen = torch.Generator(device=device).manual_seed(sum(lengths))
    full_k = [
        torch.randn(c + n, heads[1], dim, generator=gen, device=device).to(dtype)
        for c, n in zip(context, lengths, strict=True)
    ]
    full_v = [
        torch.randn(c + n, heads[1], dim, generator=gen, device=device).to(dtype)
        for c, n in zip(context, lengths, strict=True)
    ]
    blocks = sum(-(-(c + n) // 16) for c, n in zip(context, lengths, strict=True)) + 3
    k_cache, tables = paged_cache(full_k, blocks, 16, gen.manual_seed(1))
    v_cache, _ = paged_cache(full_v, blocks, 16, gen.manual_seed(1))
    q = torch.randn(sum(lengths), heads[0], dim, generator=gen, device=device).to(dtype)
    k = torch.cat([kk[c:] for kk, c in zip(full_k, context, strict=True)])
    v = torch.cat([vv[c:] for vv, c in zip(full_v, context, strict=True)])
    cached = CachedContext(
        tables, torch.tensor(context, dtype=torch.int32, device=device), max(context)
    )
    return q, k, v, full_k, full_v, k_cache, v_cache, cached


def test_reference_prefill_matches_naive_loop():
    torch.manual_seed(0)
    rows, spans = packed_rows([7, 1, 12])
    q = torch.randn(20, 4, 16)
    k, v = torch.randn(2, 20, 2, 16)
    cache = torch.zeros(1, 16, 2, 16)
    out = ReferenceAttention().prefill(q, k, v, LayerCache(cache, cache), rows)
    for span in spans:
        expected = naive_attention(q[span], k[span], v[span])
        torch.testing.assert_close(out[span].double(), expected, rtol=1e-5, atol=1e-5)


def test_reference_prefill_over_a_cached_context_matches_naive_loop():
    """Each chunk's queries follow its row's context: query i sees context + i + 1 keys."""
    context, lengths = [5, 0, 33], [7, 1, 12]
    q, k, v, full_k, full_v, k_cache, v_cache, cached = with_context(
        context, lengths, (4, 2), 16, "cpu", torch.float32
    )
    rows, spans = packed_rows(lengths)
    out = ReferenceAttention().prefill(
        q, k, v, LayerCache(k_cache, v_cache), replace(rows, context=cached)
    )
    for b, span in enumerate(spans):
        expected = naive_attention(q[span], full_k[b], full_v[b])
        torch.testing.assert_close(out[span].double(), expected, rtol=1e-5, atol=1e-5)


def test_reference_decode_reads_each_rows_blocks_up_to_its_length():
    gen = torch.Generator().manual_seed(1)
    keys = [torch.randn(n, 2, 16, generator=gen) for n in (20, 1, 9, 40)]
    values = [torch.randn(n, 2, 16, generator=gen) for n in (20, 1, 9, 40)]
    k_cache, tables = paged_cache(keys, 12, 8, gen.manual_seed(5))
    v_cache, _ = paged_cache(values, 12, 8, gen.manual_seed(5))
    q = torch.randn(3, 4, 16, generator=gen)
    row_ids, lengths = torch.tensor([3, 1, 0]), torch.tensor([33, 1, 20])
    out = ReferenceAttention().decode(
        q, LayerCache(k_cache, v_cache), BlockTables(tables, row_ids, lengths)
    )
    for b in range(3):
        r, n = row_ids[b], lengths[b]
        expected = naive_attention(q[b : b + 1], keys[r][:n], values[r][:n])[0]
        torch.testing.assert_close(out[b].double(), expected, rtol=1e-5, atol=1e-5)


def test_cpu_selects_reference():
    assert select_attention(torch.device("cpu")).name == "reference"


def float_(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


GPU_BACKENDS = ["triton", *(["flash"] if flash_attn_available() else [])]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_decode_matches_reference(name: str):
    gen = torch.Generator(device="cuda").manual_seed(2)
    dev, dt = "cuda", torch.bfloat16
    rows, capacity, blocks = 24, 4096, 32 * 256 + 8
    k_cache = torch.randn(blocks, 16, 8, 128, device=dev, dtype=dt, generator=gen)
    v_cache = torch.randn(blocks, 16, 8, 128, device=dev, dtype=dt, generator=gen)
    tables = torch.randperm(blocks, device=dev, generator=gen)[: 32 * 256].view(32, 256)
    tables = tables.to(torch.int32)
    q = torch.randn(rows, 32, 128, device=dev, dtype=dt, generator=gen)
    row_ids = torch.randperm(32, device=dev, generator=gen)[:rows]
    lengths = torch.randint(1, capacity + 1, (rows,), device=dev, generator=gen)
    lengths[:3] = torch.tensor([1, capacity, 65])
    lengths = lengths.to(torch.int32)
    for size in (1, 2, 8, rows):  # every split count the engine uses at these sizes
        paged = BlockTables(tables, row_ids[:size], lengths[:size])
        kv = LayerCache(k_cache, v_cache)
        out = select_attention(torch.device(dev), name).decode(q[:size], kv, paged)
        ref = ReferenceAttention().decode(q[:size].float(), LayerCache(*map(float_, kv)), paged)
        assert torch.isfinite(out).all()
        errors = [rel_error(out[b], ref[b]) for b in range(size)]
        assert max(errors) < 1e-2, (size, errors)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(32, 8), (32, 4), (64, 4)])  # 4B, 30B, 235B
def test_gpu_decode_merged_in_its_launch_replays_in_a_graph(q_heads: int, kv_heads: int):
    """The splits merged by the last one, captured in a CUDA graph and replayed on new queries:
    the two-kernel merge's output each time, and every ticket back at zero."""
    from replica.kernels.decode_attention import decode_attention

    gen = torch.Generator(device="cuda").manual_seed(4)
    dev, dt = "cuda", torch.bfloat16
    capacity, blocks = 4096, 64 * 256
    k_cache, v_cache = torch.randn(
        2, blocks, 16, kv_heads, 128, device=dev, dtype=dt, generator=gen
    )
    tables = torch.randperm(blocks, device=dev, generator=gen).view(64, 256).to(torch.int32)
    lengths = torch.randint(1, capacity + 1, (64,), device=dev, generator=gen)
    lengths[:3] = torch.tensor([1, capacity, 65])
    lengths = lengths.to(torch.int32)
    tickets = torch.zeros(1 << 16, dtype=torch.int32, device=dev)
    for rows in (1, 8, 64):
        row_ids = torch.arange(rows, device=dev)
        q = torch.empty(rows, q_heads, 128, device=dev, dtype=dt)
        args = (q, (k_cache, v_cache), tables, row_ids, lengths[:rows])
        decode_attention(*args, tickets=tickets)  # compiled before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = decode_attention(*args, tickets=tickets)
        for _ in range(3):
            q.copy_(torch.randn(q.shape, device=dev, dtype=dt, generator=gen))
            graph.replay()
            two_kernels = decode_attention(*args)
            assert torch.isfinite(out).all() and not tickets.any()
            errors = [rel_error(out[b], two_kernels[b]) for b in range(rows)]
            assert max(errors) < 2e-3, (rows, errors)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(32, 8), (32, 4), (64, 4)])  # 4B, 30B, 235B
def test_gpu_decode_taking_the_projection_replays_as_rope_store_then_decode(q_heads, kv_heads):
    """The split kernel norming and rotating q and the new key itself and writing K/V, merged or
    not, in a CUDA graph replayed on new projections: rope_store then the two-kernel decode's
    output and caches each time."""
    from replica.kernels.decode_attention import Rope, decode_attention
    from replica.ops.layer import TritonLayerOps

    gen = torch.Generator(device="cuda").manual_seed(5)
    dev, dt, d = "cuda", torch.bfloat16, 128
    blocks = 64 * 256
    k_cache, v_cache = torch.randn(2, blocks, 16, kv_heads, d, device=dev, dtype=dt, generator=gen)
    tables = torch.randperm(blocks, device=dev, generator=gen).view(64, 256).to(torch.int32)
    lengths = torch.randint(1, 4097, (64,), device=dev, generator=gen)
    lengths[:3] = torch.tensor([1, 4096, 65])
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, d, 2, device=dev).float() / d)
    layer_ops = TritonLayerOps(q_heads, kv_heads, d, 1e-6, inv_freq)
    norms = torch.rand(2, d, device=dev, generator=gen).to(dt) + 0.5
    tickets = torch.zeros(1 << 16, dtype=torch.int32, device=dev)
    for rows, merged in ((1, True), (8, False), (64, True)):
        seq_lens, positions = lengths[:rows].to(torch.int32), lengths[:rows] - 1
        row_ids = torch.arange(rows, device=dev)
        slots = tables[row_ids, positions // 16].long() * 16 + positions % 16
        qkv = torch.empty(rows, (q_heads + 2 * kv_heads) * d, device=dev, dtype=dt)
        rope = Rope(q_heads, *norms, inv_freq, positions, slots, 1e-6)
        ours = (k_cache.clone(), v_cache.clone())
        args = (qkv, ours, tables, row_ids, seq_lens)
        launch = dict(tickets=tickets if merged else None, rope=rope)
        decode_attention(*args, **launch)  # compiled before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = decode_attention(*args, **launch)
        for _ in range(3):
            qkv.copy_(torch.randn(qkv.shape, device=dev, dtype=dt, generator=gen))
            graph.replay()
            theirs = (k_cache.clone(), v_cache.clone())
            q, _, _ = layer_ops.rope_store(qkv, *norms, positions, slots, *theirs)
            want = decode_attention(q, theirs, tables, row_ids, seq_lens)
            assert torch.isfinite(out).all() and not tickets.any()
            assert max(rel_error(out[b], want[b]) for b in range(rows)) < 2e-3
            flat = [cache.flatten(0, 1)[slots] for cache in (*ours, *theirs)]
            assert rel_error(flat[0], flat[2]) < 1e-2 and torch.equal(flat[1], flat[3])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_prefill_matches_reference(name: str):
    gen = torch.Generator(device="cuda").manual_seed(3)
    dev, dt = "cuda", torch.bfloat16
    rows, spans = packed_rows([4096, 1, 1500, 37], dev)
    tokens = spans[-1].stop
    q = torch.randn(tokens, 32, 128, device=dev, dtype=dt, generator=gen)
    k, v = torch.randn(2, tokens, 8, 128, device=dev, dtype=dt, generator=gen)
    cache = torch.zeros(1, 16, 8, 128, device=dev, dtype=dt)
    kv = LayerCache(cache, cache)
    out = select_attention(torch.device(dev), name).prefill(q, k, v, kv, rows)
    ref = ReferenceAttention().prefill(q.float(), k.float(), v.float(), kv, rows)
    assert torch.isfinite(out).all()
    for span in spans:
        assert rel_error(out[span], ref[span]) < 1e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_prefill_over_a_cached_context_matches_reference(name: str):
    context, lengths = [3000, 0, 17, 512], [1000, 300, 1, 64]
    q, k, v, _, _, k_cache, v_cache, cached = with_context(
        context, lengths, (32, 8), 128, "cuda", torch.bfloat16
    )
    rows, spans = packed_rows(lengths, "cuda")
    rows = replace(rows, context=cached)
    kv = LayerCache(k_cache, v_cache)
    out = select_attention(torch.device("cuda"), name).prefill(q, k, v, kv, rows)
    ref = ReferenceAttention().prefill(
        q.float(), k.float(), v.float(), LayerCache(*map(float_, kv)), rows
    )
    assert torch.isfinite(out).all()
    for span in spans:
        assert rel_error(out[span], ref[span]) < 1e-2
