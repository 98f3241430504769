"""The replica process: owns one device, turns pipe messages into engine requests and back.

The front end spawns it (queueing.replica_link) with CUDA_VISIBLE_DEVICES already pinned to its
GPU, so importing torch here sees only that device.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import zip_longest
from typing import Any

import torch

from replica.engine.request import EngineRequest, EngineResult, ThenScore, ThinkBudget
from replica.engine.sequence import SampleKey
from replica.loading.source import resolve
from replica.startup import load_engine
from replica.text_watch import SampleWatch
from replica.wire.framing import BlockingChannel
from replica.wire.messages import (
    Cancel,
    Cancelled,
    Decoding,
    Delta,
    Failed,
    FinishReason,
    GenerateJob,
    KVUsage,
    Ready,
    Request,
    Result,
    Sample,
    SamplingParams,
    ScoreJob,
    Shutdown,
    Usage,
)
from replica.wire.spec import ReplicaSpec

# `_votes`: the share of a replica's decode rows that must stay free for an MCQ to take its votes
VOTE_ROWS_FREE = 0.5


def prompt_seed(prompt_ids: list[int]) -> int:
    """A seed of 63 bits that only the prompt decides (the course path's reproducible draws)."""
    digest = hashlib.sha256(" ".join(map(str, prompt_ids)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def serve(sock: socket.socket, spec: ReplicaSpec) -> None:
    """Process entry point: load, report ready, then serve until shutdown or a closed socket."""
    conn = BlockingChannel(sock)
    started = time.monotonic()
    replica = Replica(spec)
    conn.send(Ready(replica.info(time.monotonic() - started)))
    replica.run(conn)


class ContextOverflow(ValueError):
    """The prompt alone fills the context: OpenAI's context_length_exceeded."""

    param, code = "prompt", "context_length_exceeded"


@dataclass
class Samples:
    """A generating request's samples as they finish; its Result goes out once all n are in."""

    n: int
    prompt_tokens: int
    # sample: it, its tokens, its thought's tokens
    done: dict[int, tuple[Sample, int, int]] = field(default_factory=dict)

    def add(self, index: int, sample: Sample, tokens: int, thought_tokens: int) -> None:
        self.done[index] = (sample, tokens, thought_tokens)

    @property
    def complete(self) -> bool:
        return len(self.done) == self.n

    def result(self, request_id: int, kv: KVUsage) -> Result:
        ordered = [self.done[i] for i in range(self.n)]
        first, *more = [sample for sample, _, _ in ordered]
        tokens = sum(tokens for _, tokens, _ in ordered)
        usage = Usage(self.prompt_tokens, tokens, sum(thought for _, _, thought in ordered))
        return Result(
            request_id,
            first.text,
            first.finish_reason,
            usage,
            kv=kv,
            more=tuple(more),
            reasoning=first.reasoning,
        )


@dataclass
class Votes:
    """A think-then-score request's scored thoughts as they finish; its Result goes out once
    all are in: the option whose probabilities, summed over the thoughts, are largest
    (self-consistency), the first thought as its reasoning."""

    n: int
    prompt_tokens: int
    done: dict[int, EngineResult] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.done) == self.n

    def result(self, request_id: int, kv: KVUsage, decode: Callable[[list[int]], str]) -> Result:
        scored = [self.done[i] for i in range(self.n)]
        totals = [sum(probs) for probs in zip(*(r.choice_probs or [] for r in scored), strict=True)]
        choice = max(range(len(totals)), key=totals.__getitem__)
        thought = sum(len(r.thought_ids or []) for r in scored)
        usage = Usage(self.prompt_tokens, thought + self.n, thought)  # a scored token a vote
        reasoning = decode(scored[0].thought_ids or [])
        return Result(request_id, "", "stop", usage, choice, kv, reasoning=reasoning)


class Replica:
    def __init__(self, spec: ReplicaSpec) -> None:
        torch.set_num_threads(spec.cpu_threads)
        self.spec = spec
        self.source = resolve(spec.model, spec.random_weights)
        self.codec = self.source.codec()
        self.engine = load_engine(self.source, spec.engine, stage_devices(spec), self.codec.eos_ids)
        self.max_context = self.engine.max_context
        self.samples: dict[int, Samples] = {}  # generating requests, by id
        self.votes: dict[int, Votes] = {}  # think-then-score requests, by id
        self.watches: dict[SampleKey, tuple[SampleWatch, bool]] = {}  # its text, streamed or not

    def info(self, startup_s: float) -> dict[str, Any]:
        return {
            **self.engine.info,
            "model": self.source.name,
            "gpus": list(self.spec.gpus),
            "stages": [  # each stage's device, layer range [first, end) and GPU (as --gpus names it)
                {**stage, "gpu": gpu}
                for stage, gpu in zip_longest(self.engine.info["stages"], self.spec.gpus)
            ],
            "pid": os.getpid(),
            "max_context": self.max_context,
            "reasoning": self.codec.reasoning,  # the chat template's: none, hybrid or always
            "engine_startup_s": self.engine.info["startup_s"],
            "startup_s": round(startup_s, 2),  # the whole replica: imports, tokenizer, engine
        }

    def run(self, conn: BlockingChannel) -> None:
        while True:
            # Block only when idle; while busy, take what has arrived and step again.
            while not self.engine.has_work() or conn.poll():
                try:
                    message = conn.recv()
                except EOFError:
                    return
                if isinstance(message, Shutdown):
                    return
                self._handle(conn, message)
            for result in self.engine.step():
                self._finished(conn, result)
            self._follow(conn)

    def _follow(self, conn: BlockingChannel) -> None:
        """Watched samples' new text: streamed out as Deltas (thought pieces, then answer
        pieces), and a stop string in the answer ends its sample at once (cancelled in the
        engine, so its KV frees now)."""
        for key, ids in self.engine.new_tokens():
            watch, streamed = self.watches[key]
            watch.add(ids)
            if watch.stopped:
                self.engine.cancel(*key)
                del self.watches[key]
                self._sample_done(conn, key, watch, "stop")
            elif streamed:
                for piece, thought in watch.unsent():
                    conn.send(Delta(key[0], piece, key[1], reasoning=thought))

    def _handle(self, conn: BlockingChannel, message: Request | Cancel) -> None:
        if isinstance(message, Cancel):
            self._forget(message.id)
            if self.engine.cancel(message.id):
                conn.send(Cancelled(message.id))
            return
        try:
            request = self._to_engine_request(message)
            self.engine.add(request)
        except ValueError as error:  # the request's fault (too long, an odd option): a 400
            param, code = getattr(error, "param", None), getattr(error, "code", None)
            conn.send(Failed(message.id, 400, str(error), param, code))
            return
        job = message.job
        if request.then_score is not None:
            self.votes[message.id] = Votes(request.n, len(request.prompt_ids))
        elif isinstance(job, GenerateJob):
            self.samples[message.id] = Samples(job.n, len(request.prompt_ids))
        if request.watch and isinstance(job, GenerateJob):
            for sample in range(job.n):
                watch = self._watch(request, job.decoding.stop)
                self.watches[message.id, sample] = (watch, job.stream)

    def _watch(self, request: EngineRequest, stop: tuple[str, ...]) -> SampleWatch:
        end_id = self.codec.think_end_id if request.think is not None else None
        return SampleWatch(self.codec.decode, stop, end_id)

    def _forget(self, request_id: int) -> None:
        self.votes.pop(request_id, None)
        gathering = self.samples.pop(request_id, None)
        for sample in range(gathering.n if gathering else 0):
            self.watches.pop((request_id, sample), None)

    def _to_engine_request(self, message: Request) -> EngineRequest:
        job = message.job
        thinks = isinstance(job, GenerateJob) and self.codec.thinks(job.reasoning.enabled)
        if isinstance(job, GenerateJob) and thinks and job.if_thinking is not None:
            return self._think_then_score(message.id, job, job.if_thinking)
        prefix = job.prefix if isinstance(job, ScoreJob) else ""
        prompt_ids = self.codec.encode_chat(job.messages, prefix, thinks)
        room = self._room(prompt_ids)
        if isinstance(job, ScoreJob):
            return EngineRequest(
                message.id, prompt_ids, 0, self.codec.choice_ids(list(job.options))
            )
        return EngineRequest(
            message.id,
            prompt_ids,
            min(job.max_tokens, room),
            sampling=self._sampling(job.decoding, prompt_ids, thinks),
            watch=job.stream or bool(job.decoding.stop),
            n=job.n,
            think=self._think_budget(job.reasoning.budget) if thinks else None,
        )

    def _room(self, prompt_ids: list[int]) -> int:
        """Tokens the context leaves after the prompt (at least one, else the request fails)."""
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise ContextOverflow(
                f"This model's maximum context length is {self.max_context} tokens, "
                f"but the prompt has {len(prompt_ids)} tokens."
            )
        return room

    def _think_budget(self, budget: int) -> ThinkBudget:
        return ThinkBudget(budget, self.codec.think_end_id, self.codec.closing_ids(budget))

    def _think_then_score(
        self, request_id: int, job: GenerateJob, score: ScoreJob
    ) -> EngineRequest:
        """`score.votes` thoughts (one while the decode rows are busy, or when drawn greedily),
        each scored after `</think>` and the score's prefix. A thought takes at most its budget
        and the job's `max_tokens`; its limit leaves room for the engine's closing, within what
        the context leaves."""
        prompt_ids = self.codec.encode_chat(score.messages, "", think=True)
        suffix = tuple(self.codec.encode("\n\n" + score.prefix))
        think = self._think_budget(min(job.reasoning.budget, job.max_tokens))
        limit = min(2 * (think.budget + len(think.closing_ids)), self._room(prompt_ids))
        limit -= len(suffix) + 1  # room for the scoring prompt's closing and suffix
        if limit < 1:
            raise ContextOverflow(f"the prompt of {len(prompt_ids)} tokens leaves no room to think")
        sampling = self._sampling(job.decoding, prompt_ids, thinks=True)
        votes = self._votes(score.votes) if sampling is not None else 1
        choices = tuple(self.codec.choice_ids(list(score.options)))
        return EngineRequest(
            request_id,
            prompt_ids,
            limit,
            sampling=sampling,
            n=votes,
            think=think,
            then_score=ThenScore(suffix, choices),
        )

    def _votes(self, asked: int) -> int:
        """VOTE_ROWS_FREE: `asked` votes while the decode rows the replica runs and its queue
        waits for, plus these, leave at least half its rows free; else one."""
        spare = self.engine.spare_rows()
        return asked if spare - asked >= self.engine.max_rows * VOTE_ROWS_FREE else 1

    def _sampling(
        self, decoding: Decoding, prompt_ids: list[int], thinks: bool
    ) -> SamplingParams | None:
        """The request's sampling, or the checkpoint's where the request left it to them
        (`Decoding.defaults`), keeping the request's seed; on the course path a thinking
        model's draw is seeded by its prompt, so the same prompt gets the same answer."""
        defaults, mode = self.source.sampling_defaults, decoding.defaults
        if defaults is None or mode == "never" or (mode == "thinking" and not thinks):
            return decoding.sampling
        if defaults.greedy:
            return None
        seed = decoding.sampling.seed if decoding.sampling is not None else None
        if seed is None and mode == "thinking":
            seed = prompt_seed(prompt_ids)
        return replace(defaults, seed=seed)

    def _finished(self, conn: BlockingChannel, result: EngineResult) -> None:
        """A Score's answer is its option index and counts one completion token; a watched
        sample's text is its watch's, which a stop string in its last tokens still cuts; a
        thinking sample's thought and answer come apart in a watch of their own."""
        if result.choice_index is not None and result.id in self.votes:
            votes = self.votes[result.id]
            votes.done[result.sample] = result
            if votes.complete:
                del self.votes[result.id]
                conn.send(votes.result(result.id, self.engine.kv_usage(), self._thought_text))
            return
        if result.choice_index is not None:
            usage = Usage(result.prompt_tokens, 1)
            kv = self.engine.kv_usage()
            conn.send(Result(result.id, "", "stop", usage, result.choice_index, kv))
            return
        key = result.id, result.sample
        watched = self.watches.pop(key, None)
        if watched is None and result.thought_ids is None:
            text = self.codec.decode(result.output_ids)
            sample = Sample(text, result.finish_reason)
            self.samples[key[0]].add(key[1], sample, len(result.output_ids), 0)
            self._gathered(conn, key[0])
            return
        end_id = self.codec.think_end_id if result.thought_ids is not None else None
        watch = watched[0] if watched else SampleWatch(self.codec.decode, (), end_id)
        watch.add(((result.thought_ids or []) + result.output_ids)[watch.tokens :])
        self._sample_done(conn, key, watch, "stop" if watch.stopped else result.finish_reason)

    def _thought_text(self, ids: list[int]) -> str:
        """A thought's text as a sample's `reasoning` holds it (no tag, trimmed)."""
        watch = SampleWatch(self.codec.decode, (), self.codec.think_end_id)
        watch.add(ids)
        return watch.finish()[1] or ""

    def _sample_done(
        self, conn: BlockingChannel, key: SampleKey, watch: SampleWatch, reason: FinishReason
    ) -> None:
        text, thought = watch.finish()
        sample = Sample(text, reason, thought)
        self.samples[key[0]].add(key[1], sample, watch.tokens, watch.thought_tokens)
        self._gathered(conn, key[0])

    def _gathered(self, conn: BlockingChannel, request_id: int) -> None:
        """Send a request's Result once all its samples are in."""
        gathering = self.samples[request_id]
        if gathering.complete:
            del self.samples[request_id]
            conn.send(gathering.result(request_id, self.engine.kv_usage()))


def stage_devices(spec: ReplicaSpec) -> list[str]:
    """Each pipeline stage's device: its GPU as this process sees it (CUDA_VISIBLE_DEVICES
    lists the replica's distinct GPUs in order), or the CPU."""
    if not spec.gpus or not torch.cuda.is_available():
        return ["cpu"] * spec.engine.pipeline_parallel_size
    visible = list(dict.fromkeys(spec.gpus))
    return [f"cuda:{visible.index(gpu)}" for gpu in spec.gpus]
