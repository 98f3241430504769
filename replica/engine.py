"""The replica engine: packed prefill, CUDA-graph decode, in-flight refill, scoring.

One `step` is either one prefill (waiting prompts of similar length, packed without padding) or
one decode step over every running row. Decode always runs at one of a few fixed batch sizes
(1, 2, 4, ..., max), padding with rows that point at the cache's scratch slot, so that on CUDA
each step replays a graph captured at start-up. With `refill` a finished row's slot is
prefilled again between decode steps; without it (the static-batching ablation) a new batch is
admitted only once every row of the last one has finished.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from replica.attention import AttentionBackend, select_backend
from replica.checkpoint import ModelSource
from replica.kv_cache import KVCache, plan_slots
from replica.model import Batch, Qwen3, load_model
from replica.protocol import EngineRequest, EngineResult

log = logging.getLogger(__name__)

QWEN3_EOS_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>
FinishReason = Literal["stop", "length"]


@dataclass
class EngineStats:
    """Counters for metrics and the benchmark's bandwidth floor."""

    prefill_calls: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_rows: int = 0
    decode_kv_tokens: int = 0  # live K/V tokens read, summed over rows and steps
    decode_s: float = 0.0


@dataclass
class _Row:
    request: EngineRequest
    slot: int
    limit: int  # most tokens it may generate: its cap, bounded by the slot's length
    output: list[int] = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)


def batch_sizes(max_rows: int) -> list[int]:
    """1, 2, 4, ... below `max_rows`, then `max_rows` itself."""
    sizes = [1 << i for i in range(max_rows.bit_length()) if 1 << i < max_rows]
    return [*sizes, max_rows]


class DecodeRunner:
    """One greedy decode step at a fixed batch size: a CUDA-graph replay, or eager on CPU."""

    def __init__(
        self,
        model: Qwen3,
        cache: KVCache,
        attention: AttentionBackend,
        sizes: list[int],
        cuda_graphs: bool,
    ) -> None:
        self.model, self.cache, self.attention = model, cache, attention
        self.sizes = sizes
        # Static inputs, one column per row: token, position, slot, live length.
        self.inputs = torch.zeros(4, sizes[-1], dtype=torch.int64, device=model.device)
        self.inputs[2] = cache.scratch_slot
        self.inputs[3] = 1
        self.tokens = torch.zeros(sizes[-1], dtype=torch.int64, device=model.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if cuda_graphs:
            self._capture()

    def _forward(self, size: int) -> None:
        ids, positions, slots, lens = self.inputs[:, :size]
        batch = Batch(ids, positions, slots, seq_lens=lens.to(torch.int32))
        hidden = self.model.forward(batch, self.cache, self.attention)
        self.tokens[:size] = self.model.logits(hidden).argmax(-1)

    def _capture(self) -> None:
        """Warm up every size on a side stream (kernels compile, libraries pick algorithms), then
        capture largest first into one shared memory pool."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for size in self.sizes:
                self._forward(size)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def run(self, tokens: list[int], positions: list[int], slots: list[int]) -> list[int]:
        """Next greedy token of each row; row i attends over positions[i] + 1 tokens."""
        rows = len(tokens)
        size = next(s for s in self.sizes if s >= rows)
        pad = size - rows
        host = torch.tensor(
            [
                tokens + [0] * pad,
                positions + [0] * pad,
                slots + [self.cache.scratch_slot] * pad,
                [p + 1 for p in positions] + [1] * pad,
            ],
            dtype=torch.int64,
        )
        self.inputs[:, :size].copy_(host)
        if self.graphs:
            self.graphs[size].replay()
        else:
            self._forward(size)
        return self.tokens[:rows].tolist()


class Engine:
    """Our Qwen3 engine; fulfils `replica.protocol.Engine`.

    On CUDA: bf16, the fastest attention backend that imports, CUDA-graph decode. On CPU: fp32,
    the reference attention, eager decode (the tiny-random server and the tests).
    """

    def __init__(
        self,
        source: ModelSource,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        eos_ids: Iterable[int] = QWEN3_EOS_IDS,
        *,
        kv_fraction: float = 0.9,
        gpu_memory_gb: float | None = None,
        max_batch: int = 256,
        max_seq_len: int = 4096,
        refill: bool = True,
        min_refill: int | None = None,
        attention: str | None = None,
        cuda_graphs: bool | None = None,
        warm_up: bool | None = None,
        prefill_tokens: int = 16384,
        seed: int = 0,
    ) -> None:
        start = time.perf_counter()
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        dtype = dtype or (torch.bfloat16 if on_cuda else torch.float32)
        self.model = load_model(source, str(self.device), dtype, seed)
        self._sync()
        weights_s = time.perf_counter() - start

        self.max_seq_len = min(max_seq_len, source.config.max_position_embeddings)
        shape = plan_slots(
            source.config,
            dtype,
            self.device,
            self.max_seq_len,
            max_batch,
            kv_fraction,
            gpu_memory_gb,
        )
        self.cache = KVCache(shape, dtype, self.device)
        self._sync()
        kv_s = time.perf_counter() - start - weights_s

        self.attention = select_backend(self.device, attention)
        self.max_rows = shape.slots
        use_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        sizes = batch_sizes(self.max_rows)
        self.decoder = DecodeRunner(self.model, self.cache, self.attention, sizes, use_graphs)
        graphs_s = time.perf_counter() - start - weights_s - kv_s

        self.eos_ids = frozenset(eos_ids)
        self.refill = refill  # settable between runs: False is the static-batching ablation
        self.min_refill = min_refill or max(1, self.max_rows // 8)
        self.prefill_tokens = prefill_tokens
        self.stats = EngineStats()
        self._waiting: deque[EngineRequest] = deque()
        self._running: dict[int, _Row] = {}
        self._filling = False  # admitting a batch of waiting requests, one prefill a step
        if on_cuda if warm_up is None else warm_up:
            self._warm_up_prefill()
        warmup_s = time.perf_counter() - start - weights_s - kv_s - graphs_s
        self.info = {
            "engine": "qwen3",
            "device": str(self.device),
            "dtype": str(dtype).removeprefix("torch."),
            "attention": self.attention.name,
            "cuda_graphs": use_graphs,
            "batch_sizes": sizes,
            "slots": shape.slots,
            "max_seq_len": shape.max_seq_len,
            "kv_tokens": shape.tokens,
            "model_type": source.config.model_type,
            "weights_gib": round(self.model.weight_bytes() / 2**30, 2),
            "kv_gib": round(self.cache.nbytes / 2**30, 2),
            "weights_s": round(weights_s, 2),
            "kv_s": round(kv_s, 2),
            "graphs_s": round(graphs_s, 2),
            "warmup_s": round(warmup_s, 2),
            "startup_s": round(time.perf_counter() - start, 2),
        }
        log.info(
            "%s on %s: weights %.1f GiB, KV cache %d tokens (%d slots x %d), start-up %.1f s",
            source.config.model_type,
            self.device,
            self.info["weights_gib"],
            shape.tokens,
            shape.slots,
            shape.max_seq_len,
            self.info["startup_s"],
        )
        log.debug("engine ready: %s", self.info)

    def _warm_up_prefill(self) -> None:
        """Compile the prefill kernels' variants now rather than on the first requests: scoring
        prefills of 512 and 520 packed tokens (Triton specialises on sizes divisible by 16, and
        the rope kernel blocks tokens past 256), made of as many prompts as the slot length needs."""
        length = min(512, self.max_seq_len - 1)
        for total in (512, 520):
            count = min(self.max_rows, -(-total // length))
            for i in range(count):
                size = min(length, total - i * length)
                self.add(EngineRequest(-1 - i, [0] * size, choice_ids=[0]))
            while self.has_work():
                self.step()
        self.stats = EngineStats()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # The Engine protocol.

    def add(self, request: EngineRequest) -> None:
        n = len(request.prompt_ids)
        if not 0 < n < self.max_seq_len:
            raise ValueError(f"prompt of {n} tokens; this engine takes 1..{self.max_seq_len - 1}")
        if request.choice_ids is not None and not request.choice_ids:
            raise ValueError("a scoring request needs at least one choice id")
        self._waiting.append(request)

    def cancel(self, request_id: int) -> bool:
        row = self._running.pop(request_id, None)
        if row is not None:
            self.cache.release(row.slot)
            return True
        for request in self._waiting:
            if request.id == request_id:
                self._waiting.remove(request)
                return True
        return False

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def step(self) -> list[EngineResult]:
        if self._may_admit():
            return self._prefill(self._take_group())
        return self._decode() if self._running else []

    # Admission and prefill.

    def _room(self) -> int:
        return min(self.cache.num_free, self.max_rows - len(self._running))

    def _may_admit(self) -> bool:
        """Admission comes in fills: one starts once `min_refill` slots are free (static: once
        nothing runs) and goes on, one prefill a step, until the slots or the queue run out.
        Waiting for several free slots keeps prefills large enough to run at full speed."""
        room = self._room()
        if not self._waiting or room == 0:
            self._filling = False
        elif not self._filling:
            ready = self.refill and room >= min(self.min_refill, len(self._waiting))
            self._filling = ready or not self._running
        return self._filling

    def _take_group(self) -> list[EngineRequest]:
        """The longest prompts among the next ones admitted, up to `prefill_tokens` tokens in all
        (at least one). Prefill packs its prompts, so the projections do no padding work;
        grouping by length still keeps the padded attention of non-varlen backends small."""
        window = sorted(
            itertools.islice(self._waiting, self._room()),
            key=lambda r: len(r.prompt_ids),
            reverse=True,
        )
        budget = self.prefill_tokens
        count = 0
        while count < len(window) and (count == 0 or len(window[count].prompt_ids) <= budget):
            budget -= len(window[count].prompt_ids)
            count += 1
        taken = {id(r) for r in window[:count]}
        self._waiting = deque(r for r in self._waiting if id(r) not in taken)
        return window[:count]

    def _prefill(self, group: list[EngineRequest]) -> list[EngineResult]:
        start = time.perf_counter()
        lengths = [len(r.prompt_ids) for r in group]
        slots = [self.cache.allocate() for _ in group]
        batch = Batch.prefill([r.prompt_ids for r in group], slots, self.device)
        hidden = self.model.forward(batch, self.cache, self.attention)
        assert batch.rows is not None
        logits = self.model.logits(hidden[batch.rows.last_token]).float()
        first_tokens = logits.argmax(-1).tolist()

        results = []
        for i, (request, slot) in enumerate(zip(group, slots, strict=True)):
            if request.choice_ids is not None:
                self.cache.release(slot)
                results.append(self._score(request, logits[i]))
                continue
            limit = min(request.max_new_tokens, self.max_seq_len - lengths[i])
            row = _Row(request, slot, limit)
            self._running[request.id] = row
            result = (
                self._finish(row, "length") if limit <= 0 else self._append(row, first_tokens[i])
            )
            if result is not None:
                results.append(result)
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens += sum(lengths)
        self.stats.prefill_s += time.perf_counter() - start
        return results

    @staticmethod
    def _score(request: EngineRequest, logits: Tensor) -> EngineResult:
        choice_ids = request.choice_ids or []
        choice_logits = logits[choice_ids].tolist()
        best = max(range(len(choice_logits)), key=choice_logits.__getitem__)
        return EngineResult(
            id=request.id,
            prompt_tokens=len(request.prompt_ids),
            choice_index=best,
            choice_logits=choice_logits,
        )

    # Decode.

    def _decode(self) -> list[EngineResult]:
        start = time.perf_counter()
        rows = list(self._running.values())
        positions = [r.prompt_len + len(r.output) - 1 for r in rows]
        tokens = self.decoder.run([r.output[-1] for r in rows], positions, [r.slot for r in rows])
        results = [
            result
            for row, token in zip(rows, tokens, strict=True)
            if (result := self._append(row, token)) is not None
        ]
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(rows)
        self.stats.decode_kv_tokens += sum(positions) + len(rows)
        self.stats.decode_s += time.perf_counter() - start
        return results

    def _append(self, row: _Row, token: int) -> EngineResult | None:
        """Take a generated token; the row's result if it has now finished. EOS is not kept."""
        if token in self.eos_ids:
            return self._finish(row, "stop")
        row.output.append(token)
        if len(row.output) >= row.limit:
            return self._finish(row, "length")
        return None

    def _finish(self, row: _Row, reason: FinishReason) -> EngineResult:
        del self._running[row.request.id]
        self.cache.release(row.slot)
        return EngineResult(
            id=row.request.id,
            prompt_tokens=row.prompt_len,
            output_ids=row.output,
            finish_reason=reason,
        )
