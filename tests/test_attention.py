"""Attention backends: the reference against a float64 loop on CPU, every GPU backend against
the reference (relative error < 1e-2 over random lengths 1..4096, 32 query / 8 KV heads)."""

from __future__ import annotations

import itertools

import pytest
import torch

from replica.attention import PackedRows, flash_attn_available
from replica.attention.reference import ReferenceAttention
from replica.backends import select_attention

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


def test_reference_prefill_matches_naive_loop():
    torch.manual_seed(0)
    rows, spans = packed_rows([7, 1, 12])
    q = torch.randn(20, 4, 16)
    k, v = torch.randn(2, 20, 2, 16)
    out = ReferenceAttention().prefill(q, k, v, rows)
    for span in spans:
        expected = naive_attention(q[span], k[span], v[span])
        torch.testing.assert_close(out[span].double(), expected, rtol=1e-5, atol=1e-5)


def test_reference_decode_reads_each_rows_slot_up_to_its_length():
    torch.manual_seed(1)
    k_cache, v_cache = torch.randn(2, 5, 20, 2, 16)
    q = torch.randn(3, 4, 16)
    slots, lengths = torch.tensor([4, 0, 2]), torch.tensor([20, 1, 9])
    out = ReferenceAttention().decode(q, k_cache, v_cache, slots, lengths)
    for b in range(3):
        s, n = slots[b], lengths[b]
        expected = naive_attention(q[b : b + 1], k_cache[s, :n], v_cache[s, :n])[0]
        torch.testing.assert_close(out[b].double(), expected, rtol=1e-5, atol=1e-5)


def test_cpu_selects_reference():
    assert select_attention(torch.device("cpu")).name == "reference"


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


GPU_BACKENDS = ["triton", *(["flash"] if flash_attn_available() else [])]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_decode_matches_reference(name: str):
    gen = torch.Generator(device="cuda").manual_seed(2)
    dev, dt = "cuda", torch.bfloat16
    rows, slots, capacity = 24, 32, 4096
    k_cache = torch.randn(slots, capacity, 8, 128, device=dev, dtype=dt, generator=gen)
    v_cache = torch.randn(slots, capacity, 8, 128, device=dev, dtype=dt, generator=gen)
    q = torch.randn(rows, 32, 128, device=dev, dtype=dt, generator=gen)
    slot_ids = torch.randperm(slots, device=dev, generator=gen)[:rows]
    lengths = torch.randint(1, capacity + 1, (rows,), device=dev, generator=gen)
    lengths[:3] = torch.tensor([1, capacity, 65])
    lengths = lengths.to(torch.int32)
    for size in (1, 2, 8, rows):  # every split count the engine uses at these sizes
        args = (slot_ids[:size], lengths[:size])
        out = select_attention(torch.device(dev), name).decode(q[:size], k_cache, v_cache, *args)
        ref = ReferenceAttention().decode(q[:size].float(), k_cache.float(), v_cache.float(), *args)
        assert torch.isfinite(out).all()
        errors = [rel_error(out[b], ref[b]) for b in range(size)]
        assert max(errors) < 1e-2, (size, errors)


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
    out = select_attention(torch.device(dev), name).prefill(q, k, v, rows)
    ref = ReferenceAttention().prefill(q.float(), k.float(), v.float(), rows)
    assert torch.isfinite(out).all()
    for span in spans:
        assert rel_error(out[span], ref[span]) < 1e-2
