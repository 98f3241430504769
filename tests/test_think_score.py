"""An MCQ answered by a model that thinks: its thought, closed and followed by the answer's
opening, is scored by one more prefill over the thought's cached blocks; k sampled thoughts
(forks of one prefill) vote by their summed letter probabilities, and a busy replica takes one.
On the engine, the worker, the plans, and a real server (tiny random model, Thinking template)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import replace

import pytest

from queueing.metrics import Metrics
from queueing.service import CompletionService
from replica.engine.engine import Engine
from replica.engine.request import EngineRequest, EngineResult, ThenScore, ThinkBudget
from replica.loading.source import TINY_RANDOM, TINY_RANDOM_THINKING, resolve
from replica.startup import load_engine
from replica.tokenization import PromptCodec
from replica.wire import messages as wire
from replica.wire.framing import BlockingChannel
from replica.wire.spec import EngineConfig, ReplicaSpec
from replica.worker import Replica, Votes
from shortcuts import mcq
from shortcuts.plans import Generate, Score, with_settings
from shortcuts.prompts import plan
from tests.server_process import ServerProcess
from tests.test_reasoning import THOUGHT_END, Front, run

CHAT = [{"role": "user", "content": "Which letter comes first?\nA. a\nB. b\nC. c"}]
PREFIX = "The answer is ("
LETTERS = ("A", "B", "C")
SAMPLED = wire.SamplingParams(temperature=1.0, seed=11)


@pytest.fixture(scope="module")
def codec() -> PromptCodec:
    return resolve(TINY_RANDOM_THINKING).codec()


@pytest.fixture(scope="module")
def engine(codec) -> Engine:
    config = EngineConfig(max_batch=8, max_model_len=512)
    return load_engine(resolve(TINY_RANDOM_THINKING), config, "cpu", codec.eos_ids)


def think_then_score(
    codec: PromptCodec, budget: int, n: int = 1, sampling: wire.SamplingParams | None = None
) -> EngineRequest:
    prompt = codec.encode_chat(CHAT, think=True)
    think = ThinkBudget(budget, codec.think_end_id, codec.closing_ids(budget))
    after = ThenScore(tuple(codec.encode("\n\n" + PREFIX)), tuple(codec.choice_ids(LETTERS)))
    return EngineRequest(
        1, prompt, 4 * budget, sampling=sampling, n=n, think=think, then_score=after
    )


def test_a_thought_is_scored_after_it_closes_over_its_cached_blocks(engine, codec):
    request = think_then_score(codec, budget=40)
    hits_before = engine.blocks.hit_tokens
    [result] = run(engine, request)
    end = len(codec.encode(THOUGHT_END))
    assert result.thought_ids is not None and len(result.thought_ids) == 40 + end
    assert result.thought_ids[-1] == codec.think_end_id and result.output_ids == []
    assert result.prompt_tokens == len(request.prompt_ids)
    assert result.choice_probs is not None and sum(result.choice_probs) == pytest.approx(1.0)
    assert result.choice_index == max(range(3), key=result.choice_probs.__getitem__)
    # The scoring prefill found the prompt and the thought in the cache, all full blocks of it.
    scored = request.prompt_ids + result.thought_ids + codec.encode("\n\n" + PREFIX)
    block = engine.blocks.block_size
    written = len(request.prompt_ids) + len(result.thought_ids) - 1  # </think> never fed
    assert engine.blocks.hit_tokens - hits_before == written // block * block
    # ... and chose as a scoring request of the same tokens, computed from scratch, chooses.
    engine.clear_prefix_cache()
    [direct] = run(engine, EngineRequest(2, scored, choice_ids=codec.choice_ids(LETTERS)))
    assert direct.choice_index == result.choice_index
    assert direct.choice_probs == pytest.approx(result.choice_probs, abs=1e-4)


def test_a_thought_that_stops_inside_its_block_is_closed_before_scoring(engine, codec):
    """EOS inside the thought (a crafted budget-less closing: none is forced) still scores
    after `</think>`."""
    request = think_then_score(codec, budget=6)
    think = ThinkBudget(6, codec.think_end_id, (codec.eos_ids[0],))
    [result] = run(
        engine, EngineRequest(3, request.prompt_ids, 30, think=think, then_score=request.then_score)
    )
    assert result.thought_ids is not None and len(result.thought_ids) == 6
    assert codec.think_end_id not in result.thought_ids and result.choice_index in (0, 1, 2)


def test_votes_fork_one_prefill_and_repeat_with_their_seed(engine, codec):
    request = think_then_score(codec, budget=24, n=3, sampling=SAMPLED)
    engine.add(request)
    engine.step()  # the prefill: the three samples now share the prompt's full blocks
    forks = [s for s in engine.scheduler.running.values() if s.id == request.id]
    full = len(request.prompt_ids) // engine.blocks.block_size
    assert len(forks) == 3 and full >= 1
    assert forks[0].kv.blocks[:full] == forks[1].kv.blocks[:full] == forks[2].kv.blocks[:full]
    assert all(engine.blocks.refs[b] >= 3 for b in forks[0].kv.blocks[:full])
    first = []
    while engine.has_work():
        first += engine.step()
    first.sort(key=lambda r: r.sample)
    assert [r.sample for r in first] == [0, 1, 2]
    assert len({tuple(r.thought_ids or []) for r in first}) == 3  # each sample its own draw
    again = run(engine, request)
    assert [(r.thought_ids, r.choice_index) for r in again] == [
        (r.thought_ids, r.choice_index) for r in first
    ]


def scored(sample: int, probs: list[float], thought: int = 4) -> EngineResult:
    return EngineResult(
        7, 10, choice_index=0, sample=sample, thought_ids=[5] * thought, choice_probs=probs
    )


def test_votes_pick_the_largest_summed_probability_not_the_majority():
    votes = Votes(3, prompt_tokens=10)
    for sample, probs in enumerate(([0.5, 0.45, 0.05], [0.5, 0.45, 0.05], [0.05, 0.5, 0.45])):
        votes.done[sample] = scored(sample, probs)
    assert votes.complete
    result = votes.result(7, None, lambda ids: f"{len(ids)} tokens")  # type: ignore[arg-type]
    # A wins two votes of three and ties B's highest probability; B's sum is the largest
    assert result.choice == 1
    assert result.usage == wire.Usage(10, 3 * 4 + 3, 3 * 4)
    assert result.reasoning == "4 tokens" and result.text == ""


@pytest.fixture(scope="module")
def replica() -> Iterator[tuple[Replica, Front]]:
    ours, theirs = socket.socketpair()
    ours.settimeout(120)
    served = Replica(ReplicaSpec(TINY_RANDOM_THINKING))
    loop = threading.Thread(target=served.run, args=(BlockingChannel(theirs),), daemon=True)
    loop.start()
    yield served, Front(ours)
    Front(ours).send(wire.Shutdown())
    loop.join(30)


def mcq_job(votes: int, budget: int = 12, sampling=SAMPLED, **fields) -> wire.GenerateJob:
    score = wire.ScoreJob(CHAT, PREFIX, LETTERS, votes)
    return wire.GenerateJob(
        CHAT,
        256,
        wire.Decoding(sampling),
        reasoning=wire.Reasoning(budget=budget),
        if_thinking=score,
        **fields,
    )


def answer(front: Front, job: wire.Job, request_id: int = 1) -> wire.Result:
    front.send(wire.Request(request_id, job))
    result = front.recv()
    assert isinstance(result, wire.Result)
    return result


def test_the_replica_scores_each_vote_and_sums(replica):
    served, front = replica
    end = len(served.codec.encode(THOUGHT_END))
    one = answer(front, mcq_job(votes=1))
    assert one.choice in (0, 1, 2) and one.text == ""
    assert one.usage.reasoning_tokens == 12 + end
    assert one.usage.completion_tokens == 12 + end + 1
    assert one.reasoning is not None and one.reasoning.endswith("directly now.")
    three = answer(front, mcq_job(votes=3))
    assert three.usage.reasoning_tokens == 3 * (12 + end)
    again = answer(front, mcq_job(votes=3))  # seeded: the same votes, the same letter
    assert replace(again, kv=None) == replace(three, kv=None)
    greedy = answer(front, mcq_job(votes=3, sampling=None))
    assert greedy.usage.reasoning_tokens == 12 + end  # identical greedy thoughts: one vote


def test_a_busy_replica_takes_one_vote(replica, monkeypatch):
    served, front = replica
    end = len(served.codec.encode(THOUGHT_END))
    rows = served.engine.max_rows
    monkeypatch.setattr(served.engine, "spare_rows", lambda: rows // 2 + 2)
    assert answer(front, mcq_job(votes=3)).usage.reasoning_tokens == 12 + end
    monkeypatch.setattr(served.engine, "spare_rows", lambda: rows // 2 + 3)
    assert answer(front, mcq_job(votes=3)).usage.reasoning_tokens == 3 * (12 + end)


def test_a_model_that_does_not_think_generates_as_asked():
    ours, theirs = socket.socketpair()
    ours.settimeout(120)
    hybrid = Replica(ReplicaSpec(TINY_RANDOM))
    loop = threading.Thread(target=hybrid.run, args=(BlockingChannel(theirs),), daemon=True)
    loop.start()
    front = Front(ours)
    result = answer(front, mcq_job(votes=3))
    assert result.choice is None and result.text and result.reasoning is None
    front.send(wire.Shutdown())
    loop.join(30)


def test_the_accuracy_plan_asks_a_thinking_model_for_votes_and_reads_the_choice():
    prompt = "Question: Which is a bone?\nA. femur\nB. liver\nC. lung\nAnswer:"
    planned = plan(prompt, "accuracy")
    assert isinstance(planned, Generate) and isinstance(planned.fallback, Score)
    assert planned.job().if_thinking.votes == 1  # type: ignore[union-attr]
    accuracy = with_settings(planned, wire.Decoding(), wire.Reasoning(), votes=3)
    assert isinstance(accuracy, Generate)
    job = accuracy.job()
    assert job.if_thinking is not None and job.if_thinking.votes == 3
    assert job.if_thinking.options == ("A", "B", "C") and job.if_thinking.prefix == PREFIX
    assert plan(prompt, "throughput").__class__ is Score

    async def thought_then_chose(job: wire.Job) -> wire.Result:
        return wire.Result(0, "", "stop", wire.Usage(30, 40, 37), choice=1)

    replies = asyncio.run(accuracy.replies(thought_then_chose, n=2))
    assert [r.text for r in replies] == [mcq.answer_line("B")] * 2
    assert replies[0].usage.reasoning_tokens == 37 and replies[1].usage == wire.Usage()


def test_the_accuracy_server_answers_an_mcq_in_the_graders_form_after_thinking():
    flags = ("--cpu-replicas", "1", "--model", TINY_RANDOM_THINKING, "--profile", "accuracy")
    with ServerProcess(*flags, "--reasoning-budget", "10") as server:
        server.wait_ready()
        prompt = "Question: Which is a bone?\nA. femur\nB. liver\nC. lung\nAnswer:"
        body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 64}).encode()
        request = urllib.request.Request(
            server.url + "/v1/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            reply = json.load(response)
    text = reply["choices"][0]["text"]
    assert mcq.chosen_letter(text, list(LETTERS)) is not None and text.startswith("The answer")
    assert "think" not in text
    assert reply["usage"]["completion_tokens_details"]["reasoning_tokens"] >= 10


def test_the_service_votes_as_the_profile_says_unless_the_flag_does():
    assert CompletionService([], "accuracy", 1.0, 8, Metrics()).mcq_votes == 3
    assert CompletionService([], "accuracy", 1.0, 8, Metrics(), None, 1).mcq_votes == 1
    assert CompletionService([], "throughput", 1.0, 8, Metrics()).mcq_votes == 1
