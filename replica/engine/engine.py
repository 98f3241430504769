"""The replica engine: the scheduler picks the work, the model runner runs it, sequences carry it.

One `step` is either one prefill (waiting prompts, longest first, packed without padding; a long
one in chunks) or one decode step over every running sequence (a CUDA-graph replay on the GPU).
The KV cache is a pool of blocks: the scheduler gives each admitted sequence its blocks (sharing
the cached blocks of a prefix others computed before), grows them as it decodes, takes them back
when it finishes, and preempts the newest sequence when the pool runs dry. Scoring requests (MCQ)
end at their prefill: the argmax over their choice tokens, no decode at all.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from dataclasses import fields as dataclass_fields
from typing import Any

import torch

from replica.engine.blocks import BlockPool
from replica.engine.kv_cache import BLOCK_SIZE, CacheShape, KVCache, plan_blocks
from replica.engine.model_runner import ModelRunner
from replica.engine.request import EngineRequest, EngineResult
from replica.engine.scheduler import Chunk, Scheduler
from replica.engine.sequence import SampleKey, Sequence
from replica.engine.thinking import Thought, scoring_request
from replica.engine.warm_up import warm_up_prefill
from replica.model.qwen3 import Qwen3
from replica.wire.messages import FinishReason, KVUsage, SamplingParams
from replica.wire.spec import EngineConfig

log = logging.getLogger(__name__)
DEFAULT_CONFIG = EngineConfig()
CPU_KV_TOKENS = 1 << 16  # the CPU's pool (the tiny model and the tests)


@dataclass
class EngineStats:
    """Counters for metrics and the benchmark's bandwidth floor."""

    prefill_calls: int = 0
    prefill_tokens: int = 0
    prefill_chunks: int = 0  # chunks that left the rest of a long prompt for later steps
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_rows: int = 0
    decode_kv_tokens: int = 0  # live K/V tokens read, summed over rows and steps
    decode_s: float = 0.0


class SampleCountError(ValueError):
    """More samples than the engine can run at once: the request's `n` is at fault."""

    param = "n"


class StartupClock:
    """Seconds per named start-up phase, each ended by a device sync so it holds its own work."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.started = time.perf_counter()
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        begin = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.phases[f"{name}_s"] = round(time.perf_counter() - begin, 2)

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 2)


class Engine:
    """Our Qwen3 engine (dense or MoE): `add` requests, `step` until `has_work` is False.

    On CUDA: bf16, the fastest attention backend that imports, the Triton kernels, CUDA-graph
    decode. On CPU: fp32, the PyTorch references, eager decode (the tiny-random server and the
    tests). replica.ops.select makes each choice, once, here.
    """

    def __init__(
        self,
        model: Qwen3 | list[Qwen3],
        eos_ids: Iterable[int],
        config: EngineConfig = DEFAULT_CONFIG,
        clock: StartupClock | None = None,
    ) -> None:
        """`model` on its device, with the ops it runs, or its pipeline stages in order (each
        on its own device: replica.engine.stage); `eos_ids` end a sequence (the tokenizer's
        end-of-turn and end-of-text); `clock` carries the start-up phases timed before (the
        weights' load)."""
        self.stages = model if isinstance(model, list) else [model]
        self.model = self.stages[0]  # the whole model when there is one stage
        self.config, self.device = config, self.model.device
        on_cuda = self.device.type == "cuda"
        clock = clock or StartupClock(self.device)
        attention = self.model.ops.attention
        with clock.phase("kv"):
            shapes = self._plan_cache(attention.block_size or BLOCK_SIZE)
            caches = [
                KVCache(s, m.dtype, m.device) for s, m in zip(shapes, self.stages, strict=True)
            ]
        shape = shapes[0]
        # The longest sequence: the model's context, the flag, and what the pool could hold alone.
        self.max_context = min(
            config.max_model_len, self.model.config.max_position_embeddings, shape.tokens
        )
        self.max_rows = min(config.max_batch, shape.blocks)
        enforce_eager = not (on_cuda if config.cuda_graphs is None else config.cuda_graphs)
        with clock.phase("graphs"):
            max_blocks = -(-self.max_context // shape.block_size)
            self.runner = ModelRunner(
                self.stages, caches, self.max_rows, max_blocks, enforce_eager, config.micro_batches
            )
        self.blocks = BlockPool(shape.blocks, shape.block_size, config.prefix_caching)
        self.scheduler = Scheduler(self.blocks, self.max_rows, *self._policy(config))
        self.eos_ids = frozenset(eos_ids)
        self.stats = EngineStats()
        self._watched: dict[SampleKey, Sequence] = {}  # the samples of requests with `watch`
        self._seeds = random.Random(os.urandom(16))  # for sampled requests that bring none
        with clock.phase("warmup"):
            if on_cuda if config.warm_up is None else config.warm_up:
                warm_up_prefill(self)  # what it leaves (counts, cached blocks) is dropped
                self.reset_stats()
                self.clear_prefix_cache()
        self.info = self._describe(attention.name, clock)
        log.info(
            "%s on %s: weights %.1f GiB, KV cache %d blocks x %d = %d tokens, max context %d, "
            "start-up %.1f s",
            self.info["model_type"],
            self.device,
            self.info["weights_gib"],
            shape.blocks,
            shape.block_size,
            shape.tokens,
            self.max_context,
            self.info["startup_s"],
        )

    @property
    def cache(self) -> KVCache:
        """The first stage's KV (the whole model's when there is one stage)."""
        return self.runner.first.cache

    def _plan_cache(self, block_size: int) -> list[CacheShape]:
        """Each stage's cache: the same blocks, as many as fit the memory left on the fullest
        device (CPU: CPU_KV_TOKENS), at most `kv_blocks`."""
        config = self.config
        cpu_blocks = config.kv_blocks or CPU_KV_TOKENS // block_size
        shapes = plan_blocks(
            self.model.config,
            self.model.dtype,
            [stage.device for stage in self.stages],
            [len(stage.layers) for stage in self.stages],
            block_size,
            cpu_blocks,
            config.kv_fraction,
            config.gpu_memory_gb,
        )
        if config.kv_blocks is not None:
            shapes = [replace(s, blocks=min(s.blocks, config.kv_blocks)) for s in shapes]
        return shapes

    def set_policy(self, config: EngineConfig) -> None:
        """The scheduling policy of `config` (refill, prefix caching, the prefill chunk) from
        now on: settable between runs (the ablations), nothing else of the config. Forgets the
        prefix cache when caching is switched."""
        fixed = [
            name
            for name in (f.name for f in dataclass_fields(EngineConfig))
            if name not in EngineConfig.POLICY_FIELDS
            and getattr(config, name) != getattr(self.config, name)
        ]
        if fixed:
            raise ValueError(f"only the policy may change on a running engine, not {fixed}")
        if config.prefix_caching != self.blocks.caching:
            self.blocks.set_caching(config.prefix_caching)
        self.scheduler.set_policy(*self._policy(config))
        self.config = config

    def _policy(self, config: EngineConfig) -> tuple[bool, int, int]:
        """The scheduler's (refill, prefill_tokens, min_refill): by default a fill starts once
        an eighth of the decode rows are free."""
        return config.refill, config.prefill_tokens, config.min_refill or max(1, self.max_rows // 8)

    def _describe(self, attention: str, clock: StartupClock) -> dict[str, Any]:
        shape = self.cache.shape
        return {
            "engine": "qwen3",
            "device": str(self.device),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "attention": attention,
            "cuda_graphs": bool(self.runner.graphs),
            "batch_sizes": self.runner.sizes,
            "kv_blocks": shape.blocks,
            "stages": [
                {"device": str(m.device), "layers": [m.first_layer, m.first_layer + len(m.layers)]}
                for m in self.stages
            ],
            "block_size": shape.block_size,
            "kv_tokens": shape.tokens,
            "max_context": self.max_context,
            "max_rows": self.max_rows,
            "prefix_caching": self.blocks.caching,
            "model_type": self.model.config.model_type,
            "weights_gib": round(sum(m.weight_bytes() for m in self.stages) / 2**30, 2),
            "kv_gib": round(sum(s.cache.nbytes for s in self.runner.stages) / 2**30, 2),
            **clock.phases,
            "startup_s": clock.total(),
        }

    def clear_prefix_cache(self) -> None:
        """Forget every cached block and the cache's hit counts (nothing may be running)."""
        self.blocks.forget()

    def reset_stats(self) -> EngineStats:
        """The counters so far; they start again from zero."""
        stats, self.stats = self.stats, EngineStats()
        return stats

    # What the worker calls.

    def add(self, request: EngineRequest) -> None:
        n = len(request.prompt_ids)
        if not 0 < n < self.max_context:
            raise ValueError(f"prompt of {n} tokens; this engine takes 1..{self.max_context - 1}")
        if request.choice_ids is not None and not request.choice_ids:
            raise ValueError("a scoring request needs at least one choice id")
        self._check_samples(request)
        sequence = Sequence(request, self._sampling(request.sampling))
        if request.watch:
            self._watched[sequence.key] = sequence
        self.scheduler.add(sequence)

    def _check_samples(self, request: EngineRequest) -> None:
        """n samples need n decode rows at once, and their prefill plus each fork's copy of
        its last block must fit the pool."""
        if not 1 <= request.n <= self.max_rows:
            raise SampleCountError(f"n = {request.n}; this engine runs 1..{self.max_rows} at once")
        scheduler = self.scheduler
        prompt = len(request.prompt_ids)
        needed = scheduler.blocks_for(prompt) + scheduler.fork_copies(prompt, request.n - 1)
        if needed > self.blocks.num_blocks:
            raise SampleCountError(
                f"n = {request.n} samples of a {prompt}-token prompt need {needed} KV blocks; "
                f"this engine has {self.blocks.num_blocks}"
            )

    def _sampling(self, params: SamplingParams | None) -> SamplingParams | None:
        """None for greedy; a sampled request without a seed gets one of its own."""
        if params is None or params.greedy:
            return None
        if params.seed is None:
            return replace(params, seed=self._seeds.getrandbits(63))
        return params

    def new_tokens(self) -> list[tuple[SampleKey, list[int]]]:
        """((id, sample), tokens) for each running watched sample that generated tokens since
        the last call: host ints the step already had, so no device sync. A finished sample's
        last tokens come in its result instead."""
        fresh = []
        for sequence in self._watched.values():
            if len(sequence.output) > sequence.reported:
                fresh.append((sequence.key, sequence.output[sequence.reported :]))
                sequence.reported = len(sequence.output)
        return fresh

    def cancel(self, request_id: int, sample: int | None = None) -> bool:
        """Drop a request (or one of its samples); False if nothing of it was here."""
        dropped = self.scheduler.cancel(request_id, sample)
        for sequence in dropped:
            self._watched.pop(sequence.key, None)
        return bool(dropped)

    def spare_rows(self) -> int:
        """Decode rows that neither a running sequence holds nor a waiting one will need."""
        waiting = sum(s.rows_needed for s in self.scheduler.waiting if not s.is_scoring)
        return self.max_rows - len(self.scheduler.running) - waiting

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def kv_usage(self) -> KVUsage:
        pool = self.blocks
        return KVUsage(
            pool.num_blocks, pool.num_free, pool.num_cached, pool.lookup_tokens, pool.hit_tokens
        )

    def step(self) -> list[EngineResult]:
        chunks = self.scheduler.next_prefill()
        if chunks:
            return self._prefill(chunks)
        running = self.scheduler.decode_batch()
        return self._decode(running) if running else []

    # Prefill and decode.

    def _prefill(self, chunks: list[Chunk]) -> list[EngineResult]:
        start = time.perf_counter()
        logits = self.runner.prefill(chunks)
        done = self.scheduler.prefilled(chunks)
        self.runner.copy_blocks(done.copies)
        picks, probs = self.runner.first_picks(logits, done.samples)
        results = []
        for (_, sequence), pick, choice_probs in zip(done.samples, picks, probs, strict=True):
            if sequence.is_scoring:
                results.append(sequence.choice_result(pick, choice_probs or []))
                continue
            if sequence.request.watch:
                self._watched[sequence.key] = sequence
            if not sequence.output:  # a first prefill (a preempted one keeps its limit)
                room = self.max_context - sequence.prompt_len
                sequence.limit = min(sequence.request.max_new_tokens, room)
                sequence.thought = Thought.begin(sequence.request.think, sequence.limit)
            if sequence.limit <= 0:
                result = self._finish(sequence, "length")
            else:
                result = self._append(sequence, pick)
            if result is not None:
                results.append(result)
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens += sum(c.end - c.start for c in chunks)
        self.stats.prefill_chunks += sum(not chunk.completes for chunk in chunks)
        self.stats.prefill_s += time.perf_counter() - start
        return results

    def _decode(self, running: list[Sequence]) -> list[EngineResult]:
        start = time.perf_counter()
        tokens = self.runner.decode(running)
        self.stats.decode_kv_tokens += sum(s.position + 1 for s in running)
        results = [
            result
            for sequence, token in zip(running, tokens, strict=True)
            if (result := self._append(sequence, token)) is not None
        ]
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(running)
        self.stats.decode_s += time.perf_counter() - start
        return results

    def _append(self, sequence: Sequence, token: int) -> EngineResult | None:
        """Take a generated token (a thinking one's may give way to the closing its budget
        forces); the sequence's result if it has now finished. EOS is not kept."""
        if sequence.thought is not None:
            token = sequence.thought.choose(token, len(sequence.output))
        if token in self.eos_ids:
            return self._finish(sequence, "stop")
        sequence.output.append(token)
        if len(sequence.output) >= sequence.limit:
            return self._finish(sequence, "length")
        thought = sequence.thought
        if sequence.request.then_score is not None and thought and thought.end is not None:
            return self._finish(sequence, "stop")
        return None

    def _finish(self, sequence: Sequence, reason: FinishReason) -> EngineResult | None:
        """Its row and blocks go back; its result, unless its thought is to be scored: then
        that prefill waits first in line, and its choice is the result."""
        self._watched.pop(sequence.key, None)
        self.scheduler.finish(sequence)
        if sequence.request.then_score is None or sequence.thought is None:
            return sequence.result(reason)
        request = scoring_request(sequence.request, sequence.thought, sequence.output)
        self.scheduler.add(Sequence(request, sample=sequence.sample), first=True)
        return None
