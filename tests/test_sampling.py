"""Per-request sampling: exact greedy at temperature 0, seeds reproducible whatever shares the
batch, top-k / top-p truncation, and draws that follow softmax(logits / T)."""

from __future__ import annotations

import pytest
import torch

from replica.engine.engine import Engine
from replica.engine.request import EngineRequest
from replica.loading.source import resolve
from replica.ops.sampler import gumbel_argmax, row_keys, sample, thresholds
from replica.startup import load_engine
from replica.wire.messages import SamplingParams
from replica.wire.spec import EngineConfig

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def engine() -> Engine:
    return load_engine(
        resolve("tiny-random"), EngineConfig(max_batch=4, max_model_len=128), "cpu", ()
    )


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, 151_000, (n,), generator=gen).tolist() for n in (7, 30, 3, 12, 19)]


def generate(engine: Engine, requests: list[EngineRequest]) -> dict[int, list[int]]:
    for request in requests:
        engine.add(request)
    outputs = {}
    while engine.has_work():
        for result in engine.step():
            outputs[result.id] = result.output_ids
    return outputs


def test_temperature_zero_and_top_k_one_are_exactly_greedy(engine, prompts):
    greedy = generate(engine, [EngineRequest(i, p, NEW_TOKENS) for i, p in enumerate(prompts)])
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=1)):
        requests = [EngineRequest(i, p, NEW_TOKENS, sampling=params) for i, p in enumerate(prompts)]
        assert generate(engine, requests) == greedy


def test_a_seed_draws_the_same_tokens_whatever_shares_its_batch(engine, prompts):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    alone = generate(engine, [EngineRequest(0, prompts[0], NEW_TOKENS, sampling=seeded)])[0]
    neighbours = [
        EngineRequest(1, prompts[1], 5),
        EngineRequest(2, prompts[2], 40, sampling=SamplingParams(temperature=0.7)),
        EngineRequest(0, prompts[0], NEW_TOKENS, sampling=seeded),
        EngineRequest(3, prompts[3], 9, sampling=SamplingParams(temperature=1.3, top_k=20)),
        EngineRequest(4, prompts[4], 30),
    ]
    crowded = generate(engine, neighbours)  # five requests over four slots: refilled mid-way
    assert crowded[0] == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=99)
    assert (
        generate(engine, [EngineRequest(0, prompts[0], NEW_TOKENS, sampling=other_seed)])[0]
        != alone
    )


def test_unseeded_requests_differ(engine, prompts):
    params = SamplingParams(temperature=1.0)
    first, second = (
        generate(engine, [EngineRequest(0, prompts[1], NEW_TOKENS, sampling=params)])[0]
        for _ in range(2)
    )
    assert first != second


def test_draws_follow_softmax_of_logits_over_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.2, 1.5]])
    temperature = torch.tensor([0.7])
    draws = 20_000
    keys = row_keys(torch.full((draws,), 42), torch.arange(draws))
    tokens = gumbel_argmax(
        logits.expand(draws, -1), temperature.expand(draws), torch.full((draws,), -torch.inf), keys
    )
    frequencies = torch.bincount(tokens, minlength=8).float() / draws
    expected = torch.softmax(logits[0] / 0.7, -1)
    assert (frequencies - expected).abs().max() < 0.015


def test_top_k_and_top_p_keep_only_the_most_likely_tokens():
    logits = torch.tensor([[4.0, 3.5, 3.0, 1.0, 0.0, -1.0, 2.0, 0.5]]).expand(2000, -1)
    rows = logits.shape[0]
    temperature = torch.full((rows,), 1.0)
    seeds, positions = torch.arange(rows), torch.zeros(rows, dtype=torch.int64)

    def drawn(top_k: int, top_p: float) -> set[int]:
        k, p = torch.full((rows,), top_k), torch.full((rows,), top_p)
        return set(sample(logits, temperature, k, p, seeds, positions).tolist())

    assert drawn(top_k=3, top_p=1.0) == {0, 1, 2}
    assert drawn(top_k=2, top_p=1.0) == {0, 1}
    # softmax masses: 0.45, 0.27, 0.17 for tokens 0-2, then 0.06 (token 6): 0.6 needs two
    assert drawn(top_k=0, top_p=0.6) == {0, 1}
    assert drawn(top_k=0, top_p=1e-6) == {0}
    assert len(drawn(top_k=0, top_p=1.0)) == 8
    full = thresholds(logits[:1], temperature[:1], torch.tensor([0]), torch.tensor([1.0]))
    assert full.item() == float("-inf")


def test_top_k_keeps_ties_and_top_p_is_renormalised_over_the_top_k_tokens():
    """vLLM's order: top-k keeps every logit at or above the k-th largest, then top-p counts
    probability within those tokens (over the whole vocabulary when top-k is off)."""
    rows = 2000
    temperature, seeds = torch.full((rows,), 1.0), torch.arange(rows)
    positions = torch.zeros(rows, dtype=torch.int64)

    def drawn(logits: list[float], top_k: int, top_p: float) -> set[int]:
        k, p = torch.full((rows,), top_k), torch.full((rows,), top_p)
        batch = torch.tensor([logits]).expand(rows, -1)
        return set(sample(batch, temperature, k, p, seeds, positions).tolist())

    assert drawn([3.0, 2.0, 2.0, 1.0, 0.0], top_k=2, top_p=1.0) == {0, 1, 2}
    # probabilities 0.46 and 0.17 of the whole vocabulary; 0.73 and 0.27 within the top 2
    peaked = [2.0, 1.0] + [0.0] * 6
    assert drawn(peaked, top_k=0, top_p=0.6) == {0, 1}
    assert drawn(peaked, top_k=2, top_p=0.6) == {0}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_triton_sampler_draws_what_the_reference_draws():
    """Real vocabulary, bf16 (decode) and fp32 (prefill) logits, every kind of row, and rows
    whose ties send the kernel down its exact path: the same tokens as the PyTorch reference."""
    rows, vocab = 64, 151_936
    gen = torch.Generator().manual_seed(3)
    temperature = torch.rand(rows, generator=gen) * 1.5
    temperature[::7] = 0.0
    top_k = torch.randint(0, 300, (rows,), generator=gen)
    top_k[::3] = 0
    top_p = torch.rand(rows, generator=gen) * 0.99 + 0.01
    top_p[::4] = 1.0
    seeds = torch.randint(0, 2**62, (rows,), generator=gen)
    positions = torch.randint(0, 4000, (rows,), generator=gen)
    smooth = torch.randn(rows, vocab, generator=gen) * 3
    tied = torch.minimum(smooth.round() / 2, torch.tensor([1.0, 1.0 + 2**-7]).repeat(32)[:, None])
    tied[:, :50] = 1.1 + torch.rand(rows, 50, generator=gen)
    for logits in (smooth, tied):
        for dtype in (torch.bfloat16, torch.float32):
            args = (logits.to(dtype), temperature, top_k, top_p, seeds, positions)
            expected = sample(*args)
            drawn = sample(*(a.cuda() for a in args)).cpu()
            assert torch.equal(drawn, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_in_cuda_graphs(prompts):
    """On the GPU (graph replays, the Triton sampler): temperature 0 is exactly greedy and a
    seed draws the same tokens alone and in a crowded batch."""
    engine = load_engine(
        resolve("tiny-random"), EngineConfig(max_batch=4, max_model_len=128), "cuda", ()
    )
    greedy = generate(engine, [EngineRequest(i, p, NEW_TOKENS) for i, p in enumerate(prompts)])
    zero = SamplingParams(temperature=0.0)
    requests = [EngineRequest(i, p, NEW_TOKENS, sampling=zero) for i, p in enumerate(prompts)]
    assert generate(engine, requests) == greedy
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=40, seed=7)
    alone = generate(engine, [EngineRequest(0, prompts[0], NEW_TOKENS, sampling=seeded)])[0]
    crowd = [
        EngineRequest(i, p, NEW_TOKENS, sampling=SamplingParams(1.2)) for i, p in enumerate(prompts)
    ]
    crowd[0] = EngineRequest(0, prompts[0], NEW_TOKENS, sampling=seeded)
    assert generate(engine, crowd)[0] == alone
    assert alone != greedy[0]
