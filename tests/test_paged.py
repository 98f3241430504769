"""The paged KV cache: every paging case in one run, token for token against transformers
(dense and MoE), forked samples (n > 1), and the block pool's bookkeeping under a random
workload."""

from __future__ import annotations

import hashlib
import itertools
import random
import struct
from dataclasses import replace

import pytest
import torch

from replica.engine.blocks import ROOT_HASH, BlockPool, block_hashes
from replica.engine.engine import Engine
from replica.engine.request import EngineRequest
from replica.engine.scheduler import Scheduler
from replica.engine.sequence import Sequence
from replica.loading.reference import build_reference_model
from replica.loading.source import resolve
from replica.startup import load_engine
from replica.wire.messages import GenerateJob, SamplingParams
from replica.wire.spec import EngineConfig, ReplicaSpec
from replica.worker import Replica
from tests.test_engine import run, run_samples
from tests.test_mixed_batch import run_together
from tests.test_moe import checkpoint  # noqa: F401 (a fixture: the tiny MoE checkpoint)
from tests.transformers_oracle import greedy_continuations, sampled_continuation

PREFIX = 48  # three full blocks of 16


FORK_SEED = 21


def paging_workload(vocab: int) -> tuple[list[int], list[EngineRequest]]:
    """A first prompt that fills the prefix cache, then the batch: a prompt sharing its three
    full blocks, one long enough to prefill in chunks, prompts on either side of a block
    boundary, with caps that outgrow a small pool (so the newest are preempted), and two
    requests for n = 3: sampled from a partly filled last block (each fork copies it), and
    greedy from a block-aligned prompt."""
    gen = torch.Generator().manual_seed(11)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    prefix = tokens(PREFIX)
    first = prefix + tokens(5)
    batch = [(prefix + tokens(9), 12), (tokens(150), 20)]
    batch += [(tokens(n), 80) for n in (15, 16, 17, 33)]
    requests = [EngineRequest(i + 1, p, cap) for i, (p, cap) in enumerate(batch)]
    sampled = SamplingParams(temperature=1.0, seed=FORK_SEED)
    requests.append(EngineRequest(20, tokens(21), 15, sampling=sampled, n=3))
    requests.append(EngineRequest(21, tokens(32), 10, n=3))
    return first, requests


def expected_samples(reference, request: EngineRequest) -> list[list[int]]:
    """Sample j of a request is drawn from seed + j, as if it ran alone."""
    params = request.sampling
    return [
        sampled_continuation(
            reference,
            request.prompt_ids,
            params and replace(params, seed=(params.seed or 0) + j),
            request.max_new_tokens,
        )
        for j in range(request.n)
    ]


def run_paging(source, **config) -> tuple[Engine, list[int], dict]:
    """The paging workload on a small pool: the engine, the first prompt's output and every
    sample's result by (id, sample). `config` adds to the engine's (e.g. pipeline stages)."""
    engine = load_engine(
        source,
        EngineConfig(max_batch=4, max_model_len=256, kv_blocks=16, prefill_tokens=64, **config),
    )
    first, batch = paging_workload(source.config.vocab_size)
    [first_result] = run(engine, [EngineRequest(0, first, 10)]).values()
    results = run_samples(engine, batch)
    assert engine.blocks.hit_tokens >= PREFIX  # the shared prefix was not computed again
    assert engine.stats.prefill_chunks >= 2  # 150 tokens in chunks of at most 64
    assert engine.scheduler.preemptions >= 1  # 16 blocks cannot hold every row's answer
    assert not any(engine.blocks.refs) and engine.scheduler.rows.num_free == engine.max_rows
    return engine, first_result.output_ids, results


def check_paging(source, reference) -> None:
    _, first_output, results = run_paging(source)
    first, batch = paging_workload(source.config.vocab_size)
    assert first_output == greedy_continuations(reference, [first], 10)[0]
    for request in batch:
        for j, expected in enumerate(expected_samples(reference, request)):
            assert results[request.id, j].output_ids == expected, (request.id, j)
    assert len({tuple(results[20, j].output_ids) for j in range(3)}) == 3  # three streams


def test_every_paging_case_equals_transformers_dense():
    source = resolve("tiny-random")
    check_paging(source, build_reference_model(source))


def test_every_paging_case_equals_transformers_moe(checkpoint):  # noqa: F811
    source = resolve(str(checkpoint))
    check_paging(source, build_reference_model(source))


def sha256_chain(tokens: list[int], block_size: int) -> list[bytes]:
    """The prefix-cache keys computed independently: sha256(parent || 4-byte LE token ids)."""
    keys, parent = [], ROOT_HASH
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size : (i + 1) * block_size]
        parent = hashlib.sha256(parent + b"".join(t.to_bytes(4, "little") for t in block)).digest()
        keys.append(parent)
    return keys


def test_block_keys_are_chained_sha256_digests_of_every_earlier_token():
    rng = random.Random(8)
    tokens = [rng.randrange(151_936) for _ in range(5 * 16)]
    keys = block_hashes(tokens, 16, 5)
    assert keys == block_hashes(list(tokens), 16, 5) == sha256_chain(tokens, 16)
    assert len(ROOT_HASH) == 32 and all(type(k) is bytes and len(k) == 32 for k in keys)
    assert len(set(keys)) == 5 and block_hashes(tokens, 16, 3) == keys[:3]
    for position in (0, 17, 47, 79):  # one token changed: its block's key and every later one
        changed = list(tokens)
        changed[position] ^= 1
        others = block_hashes(changed, 16, 5)
        first = position // 16
        assert others[:first] == keys[:first]
        assert all(a != b for a, b in zip(others[first:], keys[first:], strict=True))
    # the same tokens under another parent (a block moved to another place) get another key
    assert block_hashes(tokens[16:32], 16, 1) != keys[1:2]
    with pytest.raises(struct.error):  # an id four bytes cannot hold is refused, never wrapped
        block_hashes([2**32, *tokens[1:16]], 16, 1)


def test_the_pool_shares_a_prefix_by_its_keys_and_no_further():
    pool = BlockPool(8, 4)
    prompt = list(range(1, 14))  # three full blocks and a token
    blocks = pool.take(4)
    pool.register(blocks, prompt, len(prompt))
    assert pool.num_cached == 3 and set(pool.by_hash) == set(sha256_chain(prompt, 4))
    assert pool.cached_prefix(prompt) == blocks[:3]
    assert pool.cached_prefix([*prompt[:5], 99, *prompt[6:]]) == blocks[:1]
    assert pool.cached_prefix([0, *prompt[1:]]) == []


def check_pool(scheduler: Scheduler, sequences: list[Sequence]) -> None:
    """Every block is free, idle in the cache, or held, exactly once, and held as often as the
    sequences that list it; the cache's two maps agree."""
    pool = scheduler.blocks
    holders = [0] * pool.num_blocks
    for sequence in sequences:
        for block in sequence.kv.blocks + sequence.kv.fork_blocks:
            holders[block] += 1
    assert holders == pool.refs
    free, idle = list(pool._free), list(pool._idle)
    held = [b for b in range(pool.num_blocks) if pool.refs[b]]
    assert sorted(free + idle + held) == list(range(pool.num_blocks))
    assert all(pool.hash_of[b] is not None for b in idle)
    assert all(pool.hash_of[b] is None for b in free)
    assert {b: h for b, h in enumerate(pool.hash_of) if h is not None} == {
        b: h for h, b in pool.by_hash.items()
    }


def test_the_block_pool_stays_consistent_under_a_random_workload():
    rng = random.Random(3)
    scheduler = Scheduler(
        BlockPool(40, 4), max_rows=6, prefill_tokens=24, min_refill=1, refill=True
    )
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    sequences: list[Sequence] = []
    forks = chunked_forks = cut_forks = 0
    live: list[Sequence] = []
    for step in range(3000):
        action = rng.random()
        if action < 0.25 and len(scheduler.waiting) < 8:
            tail = [rng.randrange(50) for _ in range(rng.choice((1, 1, 1, 30)))]
            prompt = [*rng.choice(prefixes)[: rng.randrange(1, 13)], *tail]  # some in chunks
            scoring = rng.random() < 0.2
            n = 1 if scoring else rng.choice((1, 1, 2, 3))
            request = EngineRequest(
                step, prompt, 0 if scoring else 8, [1] if scoring else None, n=n
            )
            sequence = Sequence(request, limit=rng.randrange(10, 40))
            sequences.append(sequence)
            scheduler.add(sequence)
        elif action < 0.6:
            chunks = scheduler.next_prefill()
            chunked_forks += any(not c.completes and c.sequence.kv.forks for c in chunks)
            done = scheduler.prefilled(chunks)
            copies = done.copies
            assert len({destination for _, destination in copies}) == len(copies)
            for _, started in done.samples:
                if started.is_scoring:
                    continue
                if started.sample > 0 and not started.output:  # forked by this prefill
                    forks += 1
                    sequences.append(started)
                started.output.append(rng.randrange(50))
        elif action < 0.9:
            for sequence in scheduler.decode_batch():
                sequence.output.append(rng.randrange(50))
                if len(sequence.output) >= sequence.limit:
                    scheduler.finish(sequence)
        elif live:  # half the time, a prompt between its chunks (with its forks' blocks)
            partial = scheduler.partial
            dropped = partial if partial and rng.random() < 0.5 else rng.choice(live)
            cut_forks += bool(dropped.kv.fork_blocks)
            scheduler.cancel(dropped.id, rng.choice((None, dropped.sample)))
        live = list(scheduler.running.values()) + list(scheduler.waiting)
        live += [scheduler.partial] if scheduler.partial else []
        check_pool(scheduler, [s for s in sequences if s in live or s.kv.blocks])
    assert scheduler.preemptions > 0 and scheduler.blocks.hit_tokens > 0 and forks > 0
    assert chunked_forks > 0 and cut_forks > 0


def test_forked_samples_share_one_prefill_and_its_full_blocks():
    engine = load_engine(resolve("tiny-random"), EngineConfig(max_batch=8), "cpu", ())
    prompt = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    sampling = SamplingParams(temperature=1.0, seed=3)
    engine.add(EngineRequest(1, prompt, 6, sampling=sampling, n=4))
    engine.step()  # the one prefill
    assert engine.stats.prefill_calls == 1 and engine.stats.prefill_tokens == 40
    samples = sorted(engine.scheduler.running.values(), key=lambda s: s.sample)
    assert [s.sample for s in samples] == [0, 1, 2, 3]
    full = samples[0].kv.blocks[:2]  # 40 tokens: two full blocks, then a partly filled one
    assert all(s.kv.blocks[:2] == full for s in samples)
    assert [engine.blocks.refs[b] for b in full] == [4, 4]
    assert len({s.kv.blocks[2] for s in samples}) == 4  # each writes its own last block
    results = run_samples(engine, [])
    assert sorted(results) == [(1, j) for j in range(4)]
    assert all(len(r.output_ids) == 6 for r in results.values())
    assert not any(engine.blocks.refs)


def test_without_prefix_caching_a_repeated_prompt_is_computed_whole():
    prompt = list(range(100, 150))
    outputs = {}
    for caching in (True, False):
        engine = load_engine(resolve("tiny-random"), EngineConfig(prefix_caching=caching))
        first = run(engine, [EngineRequest(1, prompt, 5)])[1].output_ids
        again = run(engine, [EngineRequest(2, prompt, 5)])[2].output_ids
        assert first == again
        outputs[caching] = first, engine.blocks.hit_tokens, engine.stats.prefill_tokens
    assert outputs[True][1:] == (48, 50 + 2) and outputs[False][1:] == (0, 100)
    assert outputs[True][0] == outputs[False][0]


def test_more_samples_than_decode_rows_is_refused():
    engine = load_engine(resolve("tiny-random"), EngineConfig(max_batch=4))
    with pytest.raises(ValueError, match="n = 5") as refused:
        engine.add(EngineRequest(1, [1, 2, 3], 4, n=5))
    assert getattr(refused.value, "param", None) == "n"


def test_a_prompt_longer_than_any_old_slot_is_served_beside_short_ones():
    """Through the worker: a 3,000-token prompt (the old slots held 2,048 tokens, prompt and
    answer) arrives with short ones and is prefilled in chunks; every request is answered."""
    replica = Replica(
        ReplicaSpec("tiny-random", engine=EngineConfig(max_batch=8, prefill_tokens=512))
    )
    long_chat = [{"role": "user", "content": "word " * 2990}]
    jobs = [GenerateJob(long_chat, 6)] + [
        GenerateJob([{"role": "user", "content": f"Say {i}."}], 24) for i in range(4)
    ]
    results = run_together(replica, jobs)
    assert results[0].usage.prompt_tokens > 2048 + 900
    assert results[0].usage.completion_tokens == 6
    assert all(results[i].usage.completion_tokens == 24 for i in range(1, 5))
    assert replica.engine.stats.prefill_chunks >= 5  # 3,000 tokens in chunks of 512


def test_running_rows_decode_between_the_chunks_of_a_long_prompt():
    engine = load_engine(
        resolve("tiny-random"), EngineConfig(max_batch=8, prefill_tokens=512), "cpu", ()
    )
    gen = torch.Generator().manual_seed(4)
    for i in range(4):
        engine.add(EngineRequest(i, torch.randint(0, 1000, (9,), generator=gen).tolist(), 40))
    engine.step()  # the short prompts prefill together and start decoding
    engine.add(EngineRequest(9, torch.randint(0, 1000, (3000,), generator=gen).tolist(), 6))
    kinds, results = [], {}
    while engine.has_work():
        prefills = engine.stats.prefill_calls
        results.update({r.id: r for r in engine.step()})
        kinds.append("prefill" if engine.stats.prefill_calls > prefills else "decode")
    chunked = [i for i, kind in enumerate(kinds) if kind == "prefill"]
    assert len(chunked) == 6  # ceil(3,000 / 512)
    assert all(b - a == 2 for a, b in itertools.pairwise(chunked))  # one decode step between
    assert len(results[9].output_ids) == 6
    assert all(len(results[i].output_ids) == 40 for i in range(4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_greedy_forks_on_cuda_decode_alike():
    """Three greedy samples of a 21-token prompt are three identical rows of each decode graph
    replay; a fork whose copy of the partly filled block were wrong would drift apart."""
    engine = load_engine(
        resolve("tiny-random"), EngineConfig(max_batch=8, max_model_len=256), "cuda", ()
    )
    forked = run_samples(engine, [EngineRequest(1, list(range(100, 121)), 24, n=3)])
    outputs = [forked[1, j].output_ids for j in range(3)]
    assert len(outputs[0]) == 24 and outputs == [outputs[0]] * 3
    assert not any(engine.blocks.refs)
