"""The engine against transformers' generate and logits (fp32, CPU, tiny-random weights)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from replica.engine.engine import Engine
from replica.engine.model_runner import batch_sizes
from replica.engine.request import EngineRequest, EngineResult
from replica.engine.scheduler import Chunk
from replica.engine.sequence import Placement, Sequence
from replica.engine.warm_up import warm_up_prefill, warm_up_sizes
from replica.loading.reference import build_reference_model
from replica.loading.source import resolve
from replica.startup import load_engine
from replica.wire.spec import EngineConfig
from tests.transformers_oracle import greedy_continuations

NEW_TOKENS = 64
PROMPT_LENGTHS = (5, 17, 40, 3, 64, 9, 28, 1)


@pytest.fixture(scope="module")
def source():
    return resolve("tiny-random")


@pytest.fixture(scope="module")
def reference(source):
    return build_reference_model(source)


@pytest.fixture(scope="module")
def prompts(source) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    vocab = source.config.vocab_size
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def expected(reference, prompts) -> list[list[int]]:
    return greedy_continuations(reference, prompts, NEW_TOKENS)


def run(engine: Engine, requests: list[EngineRequest]) -> dict[int, EngineResult]:
    """Each request's result, by id (every request of one sample)."""
    results = run_samples(engine, requests)
    assert all(sample == 0 for _, sample in results)
    return {request_id: result for (request_id, _), result in results.items()}


def run_samples(
    engine: Engine, requests: list[EngineRequest]
) -> dict[tuple[int, int], EngineResult]:
    """Every sample's result, by (id, sample), once the engine has nothing left to do."""
    for request in requests:
        engine.add(request)
    results: dict[tuple[int, int], EngineResult] = {}
    while engine.has_work():
        for result in engine.step():
            key = result.id, result.sample
            assert key not in results
            results[key] = result
    return results


@pytest.mark.parametrize("refill", [True, False])
def test_greedy_tokens_equal_transformers(source, prompts, expected, refill):
    # Four slots for eight prompts, and caps that end rows at different steps, so rows are
    # refilled mid-batch (or, static, wait for the whole batch).
    caps = [NEW_TOKENS, 20, NEW_TOKENS, 33, 1, NEW_TOKENS, 7, NEW_TOKENS]
    engine = load_engine(source, EngineConfig(max_batch=4, max_model_len=256, refill=refill))
    requests = [
        EngineRequest(i, p, cap) for i, (p, cap) in enumerate(zip(prompts, caps, strict=True))
    ]
    results = run(engine, requests)
    assert sorted(results) == list(range(len(prompts)))
    for i, cap in enumerate(caps):
        assert len(expected[i]) == NEW_TOKENS  # no EOS from these weights: a full comparison
        assert results[i].output_ids == expected[i][:cap]
        assert results[i].finish_reason == "length"
        assert results[i].prompt_tokens == len(prompts[i])
    assert idle(engine)


def test_prefill_packs_mixed_lengths_up_to_its_token_budget(source, prompts, expected):
    """All eight prompts (177 tokens) in prefills of at most 64 tokens each, longest first; the
    packed prompts still continue exactly as transformers does."""
    engine = load_engine(source, EngineConfig(max_batch=8, max_model_len=256, prefill_tokens=64))
    results = run(engine, [EngineRequest(i, p, 8) for i, p in enumerate(prompts)])
    assert [results[i].output_ids for i in range(len(prompts))] == [e[:8] for e in expected]
    # Longest first under a 64-token budget: [64], [40], [28, 17, 9, 5, 3, 1].
    assert engine.stats.prefill_calls == 3
    assert engine.stats.prefill_tokens == sum(PROMPT_LENGTHS)


def test_refill_runs_fewer_decode_steps_than_static(source, prompts):
    steps = {}
    for refill in (True, False):
        engine = load_engine(source, EngineConfig(max_batch=2, max_model_len=128, refill=refill))
        caps = [5, 30, 5]  # the third waits for the first (refill) or for both (static)
        run(engine, [EngineRequest(i, prompts[i], cap) for i, cap in enumerate(caps)])
        steps[refill] = engine.stats.decode_steps
    assert steps[True] < steps[False]


def test_eos_stops_and_is_not_returned(source, prompts, expected):
    tokens = expected[2]
    stop_at = next(i for i in range(5, NEW_TOKENS) if tokens[i] not in tokens[:i])
    engine = load_engine(
        source, EngineConfig(max_batch=2, max_model_len=256), "cpu", [tokens[stop_at]]
    )
    result = run(engine, [EngineRequest(0, prompts[2], NEW_TOKENS)])[0]
    assert result.output_ids == tokens[:stop_at]
    assert result.finish_reason == "stop"


def test_scoring_is_argmax_of_transformers_logits(source, reference, prompts, expected):
    choices = [[32, expected[0][0], 34], [362, 425, 356, 422], [11, 12]]
    engine = load_engine(source, EngineConfig(max_batch=4, max_model_len=256))
    requests = [EngineRequest(10 + i, prompts[i], 0, ids) for i, ids in enumerate(choices)]
    requests.append(EngineRequest(99, prompts[3], 5))  # scoring mixed with generation
    results = run(engine, requests)
    for i, ids in enumerate(choices):
        with torch.no_grad():
            logits = reference(torch.tensor([prompts[i]])).logits[0, -1, ids]
        result = results[10 + i]
        assert result.choice_index == int(logits.argmax())
        assert result.output_ids == []
        ours = prefill_logits(engine, prompts[i])[ids]  # the logits it took the argmax of
        torch.testing.assert_close(ours, logits, rtol=1e-4, atol=1e-5)
    assert results[10].choice_index == 1  # the token greedy generation picks first
    assert results[99].output_ids == expected[3][:5]
    assert idle(engine)


def test_cancel_frees_the_row_and_blocks(source, prompts, expected):
    engine = load_engine(source, EngineConfig(max_batch=1, max_model_len=256))
    engine.add(EngineRequest(1, prompts[0], 50))
    engine.add(EngineRequest(2, prompts[1], 5))
    engine.add(EngineRequest(3, prompts[2], 5))
    assert engine.step() == []  # request 1 prefilled into the only row
    assert engine.scheduler.rows.num_free == 0
    assert engine.cancel(1)
    assert engine.scheduler.rows.num_free == 1 and not any(engine.blocks.refs)
    assert engine.cancel(3)  # still waiting
    assert not engine.cancel(1)
    assert not engine.cancel(42)
    results = run(engine, [])
    assert list(results) == [2]
    assert results[2].output_ids == expected[1][:5]
    assert not engine.has_work()


def test_generation_stops_at_the_context_length(source, prompts, expected):
    engine = load_engine(source, EngineConfig(max_batch=2, max_model_len=70))
    result = run(engine, [EngineRequest(0, prompts[4], NEW_TOKENS)])[0]
    assert result.output_ids == expected[4][:6]
    assert result.finish_reason == "length"
    with pytest.raises(ValueError):
        engine.add(EngineRequest(1, [1] * 70, 5))
    with pytest.raises(ValueError):
        engine.add(EngineRequest(2, [], 5))


def test_prefill_warm_up_fits_a_short_context_and_leaves_nothing_behind(source):
    """The start-up warm-up (on by default on CUDA) packs 512 tokens from prompts that fit a
    256-token context, and leaves every row and block free, nothing cached, counters at zero."""
    engine = load_engine(source, EngineConfig(max_batch=4, max_model_len=256, warm_up=True))
    assert engine.info["startup_s"] >= engine.info["warmup_s"] + engine.info["weights_s"]
    assert not engine.has_work()
    assert idle(engine)
    assert engine.stats.prefill_calls == 0
    assert engine.blocks.num_cached == 0 and engine.blocks.lookup_tokens == 0


def test_the_warm_up_prefills_every_ladder_size_whole(source):
    """Each size of the ladder is computed in full (no cached prefix shortens it): both sides
    of 16-divisibility at every power of two the context takes."""
    assert warm_up_sizes(255) == [1, 2, 8, 16, 24, 32, 40, 64, 72, 128, 136]
    assert warm_up_sizes(10_000)[-2:] == [512, 520]
    engine = load_engine(source, EngineConfig(max_batch=4, max_model_len=256))
    computed, prefill = [], engine.runner.prefill

    def counted(chunks):
        computed.append([chunk.end - chunk.start for chunk in chunks])
        return prefill(chunks)

    engine.runner.prefill = counted
    warm_up_prefill(engine)
    ladder = warm_up_sizes(engine.max_context - 1)
    assert computed[: len(ladder)] == [[size] for size in ladder]
    assert idle(engine)


def idle(engine: Engine) -> bool:
    """Every decode row free and no block held (cached ones may stay)."""
    rows_free = engine.scheduler.rows.num_free == engine.max_rows
    return rows_free and not any(engine.blocks.refs) and not engine.has_work()


def prefill_logits(engine: Engine, prompt: list[int]) -> torch.Tensor:
    """The last-token logits of one prompt prefilled alone, in blocks taken for it."""
    blocks = engine.blocks.take(engine.scheduler.blocks_for(len(prompt)))
    sequence = Sequence(EngineRequest(-1, prompt), kv=Placement(blocks))
    logits = engine.runner.prefill([Chunk(sequence, 0, len(prompt))])[0]
    engine.blocks.release(blocks)
    return logits


def test_batch_sizes():
    assert batch_sizes(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert batch_sizes(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert batch_sizes(1) == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_equals_eager(source, prompts):
    """Same device, dtype and batch sizes: replaying captured graphs changes no token."""
    outputs = []
    for graphs in (True, False):
        engine = load_engine(
            source, EngineConfig(max_batch=4, max_model_len=256, cuda_graphs=graphs), "cuda"
        )
        requests = [EngineRequest(i, p, 40 - 3 * i) for i, p in enumerate(prompts)]
        outputs.append({i: r.output_ids for i, r in run(engine, requests).items()})
    assert outputs[0] == outputs[1]


def test_only_the_scheduling_policy_changes_on_a_running_engine(source, prompts):
    """The ablations switch refill and prefix caching between runs; memory and shapes stay."""
    config = EngineConfig(max_batch=2, max_model_len=128)
    engine = load_engine(source, config)
    run(engine, [EngineRequest(i, p[:40], 4) for i, p in enumerate(prompts[:2])])
    assert engine.blocks.num_cached > 0
    engine.set_policy(replace(config, prefix_caching=False, refill=False, prefill_tokens=32))
    assert engine.blocks.num_cached == 0 and not engine.blocks.caching
    assert not engine.scheduler.refill and engine.scheduler.prefill_tokens == 32
    run(engine, [EngineRequest(9, prompts[0][:40], 4)])
    assert engine.kv_usage().prompt_tokens_cached == 0  # nothing shared with caching off
    with pytest.raises(ValueError, match="max_batch"):
        engine.set_policy(replace(config, max_batch=4))
