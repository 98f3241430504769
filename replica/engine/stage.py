"""One pipeline stage on its device: a contiguous range of the model's layers, the KV of those
layers, the decode inputs its graphs read, and its own decode graphs.

A replica of one stage is the whole model on one device (today's engine); with
`--pipeline-parallel-size P` the model runner drives P of them in order, each handing the next
its (residual, normed) pair. Each micro-batch in flight has its own decode inputs, hand-off
buffers and graphs, so that stage 1 can replay micro-batch 0 while stage 0 replays
micro-batch 1 (replica.engine.model_runner says when).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor

from replica.engine.batch_inputs import DecodeInputs, block_tables
from replica.engine.kv_cache import KVCache
from replica.model.qwen3 import Batch, Qwen3

Pair = tuple[Tensor, Tensor]  # (residual, normed) [rows, hidden]: what a stage hands on


class Stage:
    """`model` (its layers) over `cache` (their KV). `micro_batches` sets of decode inputs of
    `rows` rows each over one block table of `table_rows` rows; `streamed`: its own CUDA stream,
    so that the stages of a pipeline overlap (one stage runs on the caller's stream)."""

    def __init__(
        self,
        model: Qwen3,
        cache: KVCache,
        rows: int,
        micro_batches: int,
        table_rows: int,
        max_blocks: int,
        streamed: bool,
    ) -> None:
        self.model, self.cache, self.device = model, cache, model.device
        tables = block_tables(table_rows, max_blocks, cache.scratch_block, self.device)
        self.inputs = [
            DecodeInputs(rows, tables, cache.scratch_block, cache.block_size)
            for _ in range(micro_batches)
        ]
        hidden = model.config.hidden_size
        self.entering: list[Pair] = []  # the previous stage's pair a later stage's graphs read
        if not model.is_first:
            self.entering = [
                (self._zeros(rows, hidden), self._zeros(rows, hidden)) for _ in range(micro_batches)
            ]
        # the last stage's tokens, a row of them per micro-batch
        self.next_tokens = torch.zeros(micro_batches, rows, dtype=torch.int64, device=self.device)
        # (micro-batch, size, sampled) -> the graph, and the pair it hands on (kept alive, so
        # no later capture in its pool reuses its memory; the last stage hands on none)
        self.graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
        self.leaving: dict[tuple[int, int, bool], Pair] = {}
        self.stream = torch.cuda.Stream(self.device) if streamed else None

    def _zeros(self, rows: int, hidden: int) -> Tensor:
        return torch.zeros(rows, hidden, dtype=self.model.dtype, device=self.device)

    def on_device(self) -> AbstractContextManager:
        """Kernels launched inside go to this stage's GPU (Triton launches on the current one)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()

    @contextmanager
    def active(self) -> Iterator[None]:
        """Work issued inside goes to this stage's device and stream (if it has its own)."""
        if self.stream is None:
            yield
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            yield

    def key(self, micro_batch: int, size: int, sampled: bool) -> tuple[int, int, bool]:
        """Only the last stage samples: the others run one variant."""
        return micro_batch, size, sampled and self.model.is_last

    def decode(
        self, micro_batch: int, size: int, sampled: bool, entering: Pair | None
    ) -> Pair | None:
        """One decode step of micro-batch `micro_batch` over the first `size` rows of its inputs,
        continuing from the previous stage's `entering` pair (copied in first: the graphs read
        fixed buffers); the last stage leaves its tokens in `next_tokens[micro_batch]`."""
        if entering is not None:
            h, x = self.entering[micro_batch]
            h[:size].copy_(entering[0][:size], non_blocking=True)
            x[:size].copy_(entering[1][:size], non_blocking=True)
        key = self.key(micro_batch, size, sampled)
        graph = self.graphs.get(key)
        if graph is None:
            return self._forward(*key)
        graph.replay()
        return self.leaving.get(key)

    def _forward(self, micro_batch: int, size: int, sampled: bool) -> Pair:
        inputs = self.inputs[micro_batch]
        batch: Batch = inputs.batch(size)
        entering = None
        if self.entering:
            h, x = self.entering[micro_batch]
            entering = h[:size], x[:size]
        pair = self.model.forward_stage(batch, self.cache, entering)
        if not self.model.is_last:
            return pair
        logits = self.model.logits(pair[1])
        tokens = self.next_tokens[micro_batch]
        if not sampled:
            tokens[:size] = logits.argmax(-1)
            return pair
        i = inputs
        tokens[:size] = self.model.ops.sampler(
            logits,
            i.temperature[:size],
            i.top_k[:size],
            i.top_p[:size],
            i.seeds[:size],
            i.positions[:size],
        )
        return pair

    def capture(self, sizes: list[int]) -> None:
        """Warm up every variant on a side stream (kernels compile, libraries pick algorithms),
        then capture largest first into a memory pool of this stage's own per micro-batch: while
        the next stage copies micro-batch 0's output, this one replays micro-batch 1, whose
        work must not land in that output's memory."""
        with torch.cuda.device(self.device):
            keys = list(dict.fromkeys(
                self.key(m, size, sampled)
                for m in range(len(self.inputs))
                for size in sizes
                for sampled in (False, True)
            ))  # fmt: skip
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for key in keys:
                    self._forward(*key)
            torch.cuda.current_stream().wait_stream(side)
            pools = [torch.cuda.graph_pool_handle() for _ in self.inputs]
            for key in reversed(keys):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pools[key[0]]):
                    pair = self._forward(*key)
                if not self.model.is_last:
                    self.leaving[key] = pair
                self.graphs[key] = graph
            torch.cuda.synchronize()
