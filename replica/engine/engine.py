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
from typing import Any

import torch
from torch import Tensor

from replica.engine.blocks import BlockPool
from replica.engine.kv_cache import BLOCK_SIZE, KVCache, plan_blocks
from replica.engine.model_runner import DecodeRows, ModelRunner, batch_sizes
from replica.engine.request import EngineRequest, EngineResult
from replica.engine.scheduler import Chunk, Scheduler
from replica.engine.sequence import SampleKey, Sequence
from replica.loading.model import load_model
from replica.loading.source import ModelSource
from replica.ops import select_ops
from replica.ops.sampler import Sampler
from replica.tokenization import PromptCodec
from replica.wire.messages import FinishReason, KVUsage, SamplingParams

log = logging.getLogger(__name__)
GREEDY = SamplingParams()
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
        source: ModelSource,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        eos_ids: Iterable[int] | None = None,
        *,
        kv_fraction: float = 0.9,
        gpu_memory_gb: float | None = None,
        max_batch: int = 256,
        max_model_len: int = 32768,
        kv_blocks: int | None = None,
        refill: bool = True,
        min_refill: int | None = None,
        attention: str | None = None,
        cuda_graphs: bool | None = None,
        warm_up: bool | None = None,
        prefill_tokens: int = 16384,
        prefix_caching: bool = True,
        seed: int = 0,
        quantize: str | None = None,
    ) -> None:
        """`max_model_len` caps the context (the model's own is the most); `kv_blocks` fixes
        the pool's size (default: what free GPU memory holds; on the CPU, CPU_KV_TOKENS);
        `prefix_caching` False computes every prompt whole (the ablation); `quantize="int4"`
        makes a 16-bit model's projections 4-bit as they load."""
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        dtype = dtype or (torch.bfloat16 if on_cuda else torch.float32)
        clock = StartupClock(self.device)
        with clock.phase("weights"):
            ops = select_ops(self.device, attention)
            self.model = load_model(source, str(self.device), dtype, seed, ops, quantize)
        attention_backend = ops.attention
        block_size = attention_backend.block_size or BLOCK_SIZE
        with clock.phase("kv"):
            cpu_blocks = kv_blocks or CPU_KV_TOKENS // block_size
            shape = plan_blocks(
                source.config,
                dtype,
                self.device,
                block_size,
                cpu_blocks,
                kv_fraction,
                gpu_memory_gb,
            )
            if kv_blocks is not None:
                shape = replace(shape, blocks=min(shape.blocks, kv_blocks))
            self.cache = KVCache(shape, dtype, self.device)
        # The longest sequence: the model's context, the flag, and what the pool could hold alone.
        self.max_context = min(max_model_len, source.config.max_position_embeddings, shape.tokens)
        self.max_rows = min(max_batch, shape.blocks)
        sizes = batch_sizes(self.max_rows)
        enforce_eager = not (on_cuda if cuda_graphs is None else cuda_graphs)
        with clock.phase("graphs"):
            self.runner = ModelRunner(
                self.model,
                self.cache,
                attention_backend,
                ops.sampler,
                sizes,
                -(-self.max_context // block_size),
                enforce_eager,
            )
        self.blocks = BlockPool(shape.blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(
            self.blocks,
            self.max_rows,
            prefill_tokens,
            min_refill or max(1, self.max_rows // 8),
            refill,
        )
        if eos_ids is None:  # the tokenizer's end-of-turn and end-of-text tokens
            eos_ids = PromptCodec(source.tokenizer_dir).eos_ids
        self.eos_ids = frozenset(eos_ids)
        self.stats = EngineStats()
        self._watched: dict[SampleKey, Sequence] = {}  # the samples of requests with `watch`
        self._seeds = random.Random(os.urandom(16))  # for sampled requests that bring none
        with clock.phase("warmup"):
            if on_cuda if warm_up is None else warm_up:
                self._warm_up_prefill()
        self.info = self._describe(source, dtype, attention_backend.name, clock)
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

    def _describe(
        self, source: ModelSource, dtype: torch.dtype, attention: str, clock: StartupClock
    ) -> dict[str, Any]:
        shape = self.cache.shape
        return {
            "engine": "qwen3",
            "device": str(self.device),
            "dtype": str(dtype).removeprefix("torch."),
            "attention": attention,
            "cuda_graphs": bool(self.runner.graphs),
            "batch_sizes": self.runner.sizes,
            "kv_blocks": shape.blocks,
            "block_size": shape.block_size,
            "kv_tokens": shape.tokens,
            "max_context": self.max_context,
            "max_rows": self.max_rows,
            "prefix_caching": self.blocks.caching,
            "model_type": source.config.model_type,
            "weights_gib": round(self.model.weight_bytes() / 2**30, 2),
            "kv_gib": round(self.cache.nbytes / 2**30, 2),
            **clock.phases,
            "startup_s": clock.total(),
        }

    def _warm_up_prefill(self) -> None:
        """Compile the prefill kernels' variants now rather than on the first requests: scoring
        prefills of 512 and 520 packed tokens (Triton specialises on sizes divisible by 16, and
        the rope kernel blocks tokens past 256), made of as many prompts as the context needs.
        They leave nothing behind: not their blocks in the prefix cache, nor their counts."""
        length = min(512, self.max_context - 1)
        for total in (512, 520):
            count = min(self.max_rows, -(-total // length))
            for i in range(count):
                size = min(length, total - i * length)
                self.add(EngineRequest(-1 - i, [0] * size, choice_ids=[0]))
            while self.has_work():
                self.step()
        self.stats = EngineStats()
        self.blocks.forget()

    @property
    def refill(self) -> bool:
        return self.scheduler.refill

    @refill.setter
    def refill(self, on: bool) -> None:
        """Settable between runs: False is the static-batching ablation."""
        self.scheduler.refill = on

    # What the worker calls.

    def add(self, request: EngineRequest) -> None:
        n = len(request.prompt_ids)
        if not 0 < n < self.max_context:
            raise ValueError(f"prompt of {n} tokens; this engine takes 1..{self.max_context - 1}")
        if request.choice_ids is not None and not request.choice_ids:
            raise ValueError("a scoring request needs at least one choice id")
        self._check_samples(request)
        sequence = Sequence(request, self._sampling(request.sampling), forks=request.n - 1)
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
        logits = self.runner.prefill(
            [(c.sequence.tokens, c.start, c.end, c.sequence.blocks) for c in chunks]
        )
        copies = self.scheduler.prefilled(chunks)
        if copies:
            self.cache.copy_blocks(copies)
        group, rows = self._prefilled_samples(chunks)
        logits = logits[rows]
        first_tokens = _first_tokens(group, logits, self.runner.sampler)
        choices = _best_choices(group, logits)
        results = []
        for i, (sequence, token) in enumerate(zip(group, first_tokens, strict=True)):
            if sequence.is_scoring:
                results.append(
                    EngineResult(sequence.id, sequence.prompt_len, choice_index=choices[i])
                )
                continue
            if not sequence.output:  # a first prefill (a preempted one keeps its limit)
                room = self.max_context - sequence.prompt_len
                sequence.limit = min(sequence.request.max_new_tokens, room)
            if sequence.limit <= 0:
                result = self._finish(sequence, "length")
            else:
                result = self._append(sequence, token)
            if result is not None:
                results.append(result)
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens += sum(c.end - c.start for c in chunks)
        self.stats.prefill_chunks += sum(not chunk.completes for chunk in chunks)
        self.stats.prefill_s += time.perf_counter() - start
        return results

    def _prefilled_samples(self, chunks: list[Chunk]) -> tuple[list[Sequence], list[int]]:
        """The sequences whose prefill ended, each followed by the samples it forked, and the
        logits row (the chunk) each one's first token comes from."""
        group, rows = [], []
        for i, chunk in enumerate(chunks):
            if not chunk.completes:
                continue
            for sequence in (chunk.sequence, *chunk.sequence.forked):
                group.append(sequence)
                rows.append(i)
                if sequence.request.watch:
                    self._watched[sequence.key] = sequence
        return group, rows

    def _decode(self, running: list[Sequence]) -> list[EngineResult]:
        start = time.perf_counter()
        rows, size = DecodeRows(), self.blocks.block_size
        for sequence in running:
            position = sequence.position
            rows.tokens.append(sequence.output[-1])
            rows.positions.append(position)
            rows.row_ids.append(sequence.row)
            rows.slots.append(sequence.blocks[position // size] * size + position % size)
            written, held = sequence.table_written, len(sequence.blocks)
            if written < held:
                rows.table_entries += [
                    (sequence.row, j, sequence.blocks[j]) for j in range(written, held)
                ]
                sequence.table_written = held
        sampled = any(s.sampling is not None for s in running)
        tokens = self.runner.decode(
            rows, [s.sampling or GREEDY for s in running] if sampled else None
        )
        results = [
            result
            for sequence, token in zip(running, tokens, strict=True)
            if (result := self._append(sequence, token)) is not None
        ]
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(running)
        self.stats.decode_kv_tokens += sum(rows.positions) + len(running)
        self.stats.decode_s += time.perf_counter() - start
        return results

    def _append(self, sequence: Sequence, token: int) -> EngineResult | None:
        """Take a generated token; the sequence's result if it has now finished. EOS is not kept."""
        if token in self.eos_ids:
            return self._finish(sequence, "stop")
        sequence.output.append(token)
        if len(sequence.output) >= sequence.limit:
            return self._finish(sequence, "length")
        return None

    def _finish(self, sequence: Sequence, reason: FinishReason) -> EngineResult:
        self._watched.pop(sequence.key, None)
        self.scheduler.finish(sequence)
        return sequence.result(reason)


def _first_tokens(group: list[Sequence], logits: Tensor, sample: Sampler) -> list[int]:
    """Each prompt's first generated token: greedy, or drawn like a decode step's."""
    tokens = logits.argmax(-1)
    rows = [i for i, s in enumerate(group) if s.sampling is not None]
    if rows:
        params = [group[i].sampling or GREEDY for i in rows]
        device = logits.device
        drawn = sample(
            logits[rows],
            torch.tensor([p.temperature for p in params], device=device),
            torch.tensor([p.top_k for p in params], device=device),
            torch.tensor([p.top_p for p in params], device=device),
            torch.tensor([p.seed or 0 for p in params], device=device),
            torch.tensor([group[i].position for i in rows], device=device),
        )
        tokens[rows] = drawn
    return tokens.tolist()


def _best_choices(group: list[Sequence], logits: Tensor) -> dict[int, int]:
    """Row -> index of the highest-scoring choice token, for the scoring rows of a prefill, in
    one device sync rather than one per request."""
    rows = [i for i, s in enumerate(group) if s.is_scoring]
    if not rows:
        return {}
    choice_ids = [group[i].request.choice_ids or [] for i in rows]
    width = max(len(ids) for ids in choice_ids)
    index = torch.tensor([ids + ids[-1:] * (width - len(ids)) for ids in choice_ids])
    picked = logits[rows].gather(1, index.to(logits.device))
    widths = torch.tensor([len(ids) for ids in choice_ids], device=logits.device)
    padding = torch.arange(width, device=logits.device)[None, :] >= widths[:, None]
    best = picked.masked_fill(padding, float("-inf")).argmax(-1).tolist()
    return dict(zip(rows, best, strict=True))
