"""Reasoning models on the replica side: template kinds, the engine's thought budget (exact, half
of max_tokens at most, 0 closes at once), a thought the model closes itself, and the worker's
split of thought and answer (usage, stop strings, streamed Deltas), on the tiny random model
with the Thinking-2507 template (always thinks) and with the hybrid one (tiny-random)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest

from replica.engine.engine import Engine
from replica.engine.request import EngineRequest, EngineResult, ThinkBudget
from replica.loading.source import TINY_RANDOM, TINY_RANDOM_THINKING, resolve
from replica.startup import load_engine
from replica.text_watch import SampleWatch
from replica.tokenization import CLOSING, PromptCodec
from replica.wire.framing import BlockingChannel
from replica.wire.messages import (
    Decoding,
    Delta,
    FromReplica,
    GenerateJob,
    Reasoning,
    Request,
    Result,
    ScoreJob,
    Shutdown,
)
from replica.wire.spec import EngineConfig, ReplicaSpec
from replica.worker import Replica
from tests.test_servable import templated_model
from tests.test_worker import FrontEnd

CHAT = [{"role": "user", "content": "Which letter comes first?\nA. a\nB. b\nC. c"}]
# The closing's tokens up to and with </think>: the think block's part of it.
THOUGHT_END = CLOSING[: CLOSING.index("</think>") + len("</think>")]


@pytest.fixture(scope="module")
def codec() -> PromptCodec:
    return resolve(TINY_RANDOM_THINKING).codec()


@pytest.fixture(scope="module")
def engine(codec) -> Engine:
    config = EngineConfig(max_batch=4, max_model_len=512)
    return load_engine(resolve(TINY_RANDOM_THINKING), config, "cpu", codec.eos_ids)


def run(engine: Engine, *requests: EngineRequest) -> list[EngineResult]:
    for request in requests:
        engine.add(request)
    results = []
    while engine.has_work():
        results += engine.step()
    return sorted(results, key=lambda result: (result.id, result.sample))


def thinking(codec: PromptCodec, max_new: int, budget: int, **think) -> EngineRequest:
    settings = {"end_id": codec.think_end_id, "closing_ids": codec.closing_ids(budget), **think}
    prompt = codec.encode_chat(CHAT, think=True)
    return EngineRequest(1, prompt, max_new, think=ThinkBudget(budget, **settings))


# Templates and prompts.


def test_each_template_kind_renders_its_prompt(codec, tmp_path):
    assert codec.reasoning == "always"
    assert codec.render(CHAT, think=True).endswith("<|im_start|>assistant\n<think>\n")
    # Thinking off (a ScoreJob): the block closes at once, as the hybrid template closes it.
    assert codec.render(CHAT, "(").endswith("assistant\n<think>\n\n</think>\n\n(")
    hybrid = resolve(TINY_RANDOM).codec()
    assert hybrid.reasoning == "hybrid"
    assert hybrid.render(CHAT, think=True).endswith("assistant\n<think>\n")
    assert hybrid.render(CHAT).endswith("assistant\n<think>\n\n</think>\n\n")
    free = PromptCodec(templated_model(tmp_path, ""))  # Instruct-2507's shape: no think block
    assert free.reasoning == "none" and not free.thinks(True)
    assert free.render(CHAT, think=True).endswith("assistant\n")
    assert [codec.thinks(e) for e in (None, False, True)] == [True, True, True]
    assert [hybrid.thinks(e) for e in (None, False, True)] == [False, False, True]


# The budget, in the engine.


def test_a_thought_that_never_closes_is_cut_at_its_budget(engine, codec):
    [result] = run(engine, thinking(codec, 60, 7))
    end = len(codec.encode(THOUGHT_END))
    thought = result.thought_ids
    assert codec.think_end_id not in thought[:7]  # random weights never close it themselves
    assert thought[7:] == list(codec.closing_ids(7)[:end])  # cut at exactly 7, then closed
    assert codec.decode(thought[7:]) == THOUGHT_END
    assert result.output_ids[:1] == list(codec.closing_ids(7)[end:])  # "\n\n", then the answer
    assert len(thought) + len(result.output_ids) == 60 and result.finish_reason == "length"


def test_a_thought_the_model_closes_is_split_at_its_end(engine, codec):
    """The token the model draws fourth plays `</think>`: the model closes its own thought
    there, and nothing is forced."""
    unbudgeted = thinking(codec, 12, 100)
    [free] = run(engine, EngineRequest(1, unbudgeted.prompt_ids, 12))  # what the model draws
    drawn = free.output_ids
    [result] = run(engine, thinking(codec, 12, 100, end_id=drawn[3]))
    assert result.thought_ids == drawn[:4]
    assert result.output_ids == drawn[4:12]


def test_budget_zero_closes_at_once(engine, codec):
    [result] = run(engine, thinking(codec, 10, 0))
    assert result.thought_ids == [codec.think_end_id]
    assert codec.decode(result.output_ids[:1]) == "\n\n"
    assert len(result.output_ids) == 9


def test_the_thought_takes_at_most_half_of_max_tokens(engine, codec):
    short = codec.closing_ids(0)  # </think> then "\n\n": the answer's room is easy to count
    [result] = run(engine, thinking(codec, 20, 1024, closing_ids=short))
    assert result.thought_ids[10:] == [codec.think_end_id]
    assert codec.think_end_id not in result.thought_ids[:10]
    assert len(result.output_ids) == 9  # "\n\n" and 8 tokens of answer


def test_each_sample_keeps_its_own_thought(engine, codec):
    request = thinking(codec, 30, 4)
    sampled = EngineRequest(
        1, request.prompt_ids, 30, sampling=None, n=3, think=request.think, watch=True
    )
    results = run(engine, sampled)
    assert len(results) == 3
    end = len(codec.encode(THOUGHT_END))
    for result in results:
        assert len(result.thought_ids) == 4 + end and result.thought_ids[-1] == codec.think_end_id


# The worker: thought and answer apart.


class Front(FrontEnd):
    """FrontEnd, reading several replies at once (streamed Deltas come many to a read)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.pending: list[FromReplica] = []

    def recv(self) -> FromReplica:
        while not self.pending:
            data = self.sock.recv(1 << 16)
            assert data, "the replica closed its end"
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)


@pytest.fixture(scope="module")
def replicas() -> Iterator[dict[str, tuple[Replica, Front]]]:
    running = {}
    for name in (TINY_RANDOM_THINKING, TINY_RANDOM):
        ours, theirs = socket.socketpair()
        ours.settimeout(120)
        replica = Replica(ReplicaSpec(name))
        loop = threading.Thread(target=replica.run, args=(BlockingChannel(theirs),), daemon=True)
        loop.start()
        running[name] = replica, Front(ours), loop
    yield {name: (replica, end) for name, (replica, end, _) in running.items()}
    for _, end, loop in running.values():
        end.send(Shutdown())
        loop.join(30)


def ask(front: Front, job: GenerateJob, request_id: int = 1) -> tuple[Result, list[Delta]]:
    front.send(Request(request_id, job))
    deltas = []
    while not isinstance(reply := front.recv(), Result):
        assert isinstance(reply, Delta)
        deltas.append(reply)
    return reply, deltas


def no_tags(*texts: str | None) -> bool:
    return not any(tag in (text or "") for text in texts for tag in ("<think>", "</think>"))


def test_the_result_holds_the_answer_and_its_thought_apart(replicas):
    replica, front = replicas[TINY_RANDOM_THINKING]
    assert replica.info(0.0)["reasoning"] == "always"
    result, _ = ask(front, GenerateJob(CHAT, 60, reasoning=Reasoning(budget=8)))
    end = len(replica.codec.encode(THOUGHT_END))
    assert result.usage.reasoning_tokens == 8 + end
    assert result.usage.completion_tokens == 60 and result.finish_reason == "length"
    assert result.reasoning is not None and result.reasoning.endswith("directly now.")
    assert result.text and result.text == result.text.lstrip() and no_tags(result.text)
    assert no_tags(result.reasoning) and result.samples[0].reasoning == result.reasoning
    # thinking disabled is ignored by a model that always thinks
    off, _ = ask(front, GenerateJob(CHAT, 60, reasoning=Reasoning(enabled=False, budget=8)))
    assert (off.text, off.reasoning, off.usage) == (result.text, result.reasoning, result.usage)


def test_stop_strings_cut_the_answer_not_the_thought(replicas):
    _, front = replicas[TINY_RANDOM_THINKING]
    job = GenerateJob(CHAT, 60, reasoning=Reasoning(budget=8))
    whole, _ = ask(front, job)
    stop = whole.text[4:8]
    stops = Decoding(stop=("limited time", stop))  # the first stop is in the thought only
    cut, _ = ask(front, GenerateJob(CHAT, 60, stops, reasoning=Reasoning(budget=8)))
    assert cut.reasoning == whole.reasoning and "limited time" in cut.reasoning
    assert cut.text == whole.text[: whole.text.index(stop)] and cut.finish_reason == "stop"
    assert cut.usage.reasoning_tokens == whole.usage.reasoning_tokens


def test_streamed_deltas_send_the_thought_then_the_answer(replicas):
    replica, front = replicas[TINY_RANDOM_THINKING]
    job = GenerateJob(CHAT, 60, stream=True, n=2, reasoning=Reasoning(budget=8))
    result, deltas = ask(front, job)
    for sample in (0, 1):
        kinds = [d.reasoning for d in deltas if d.sample == sample]
        assert kinds[0] and not kinds[-1] and kinds == sorted(kinds, reverse=True)
        thought = "".join(d.text for d in deltas if d.sample == sample and d.reasoning)
        answer = "".join(d.text for d in deltas if d.sample == sample and not d.reasoning)
        assert thought == result.samples[sample].reasoning
        assert result.samples[sample].text.startswith(answer) and answer
    assert no_tags(*(d.text for d in deltas))
    assert result.usage.reasoning_tokens == 2 * (8 + len(replica.codec.encode(THOUGHT_END)))
    unstreamed, _ = ask(front, GenerateJob(CHAT, 60, n=2, reasoning=Reasoning(budget=8)))
    assert unstreamed.samples == result.samples


def test_a_hybrid_model_thinks_only_when_enabled(replicas):
    replica, front = replicas[TINY_RANDOM]
    assert replica.info(0.0)["reasoning"] == "hybrid"
    plain, _ = ask(front, GenerateJob(CHAT, 20))
    for enabled in (None, False):
        off, _ = ask(front, GenerateJob(CHAT, 20, reasoning=Reasoning(enabled=enabled)))
        assert replace(off, kv=None) == replace(plain, kv=None)
        assert off.reasoning is None and off.usage.reasoning_tokens == 0
    on, _ = ask(front, GenerateJob(CHAT, 40, reasoning=Reasoning(enabled=True, budget=4)))
    assert on.reasoning is not None and on.reasoning.endswith("directly now.")
    assert on.usage.prompt_tokens == len(replica.codec.encode_chat(CHAT, think=True))
    assert on.usage.reasoning_tokens == 4 + len(replica.codec.encode(THOUGHT_END))
    assert no_tags(on.text, on.reasoning)


def test_a_score_on_a_thinking_model_does_not_think(replicas):
    _, front = replicas[TINY_RANDOM_THINKING]
    front.send(Request(9, ScoreJob(CHAT, "The answer is (", ("A", "B", "C"))))
    result = front.recv()
    assert isinstance(result, Result) and result.choice in (0, 1, 2)
    assert result.reasoning is None and result.usage.reasoning_tokens == 0


# The watch that splits a sample's text.


def test_a_watch_splits_at_the_models_own_end_and_trims_as_the_template_does(codec):
    ids = codec.encode("\nplan it: 汉字 first\n</think>\n\nAn answer, then more.")
    watch = SampleWatch(codec.decode, ("then",), codec.think_end_id)
    pieces = []
    for token in ids:
        watch.add([token])
        pieces += watch.unsent()
    assert watch.stopped and watch.finish() == ("An answer, ", "plan it: 汉字 first")
    assert "".join(p for p, thought in pieces if thought) == "plan it: 汉字 first"
    assert "".join(p for p, thought in pieces if not thought) == "An answer, "
    assert watch.thought_tokens == ids.index(codec.think_end_id) + 1


def test_a_preempted_thought_keeps_its_budget(engine, codec):
    """Four thinking rows outgrow a 12-block pool: the newest are preempted, computed again,
    and still end exactly as each does alone."""
    small = load_engine(
        resolve(TINY_RANDOM_THINKING),
        EngineConfig(max_batch=4, max_model_len=512, kv_blocks=12),
        "cpu",
        codec.eos_ids,
    )
    requests = []
    for i, budget in enumerate((5, 20, 30, 0)):
        prompt = codec.encode_chat([{"role": "user", "content": f"Question {i}"}], think=True)
        think = ThinkBudget(budget, codec.think_end_id, codec.closing_ids(budget))
        requests.append(EngineRequest(i, prompt, 80, think=think))
    together = run(small, *requests)
    assert small.scheduler.preemptions >= 1
    for request, result in zip(requests, together, strict=True):
        [alone] = run(engine, request)
        assert (result.thought_ids, result.output_ids) == (alone.thought_ids, alone.output_ids)
