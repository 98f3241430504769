"""The model on its device: the KV cache, packed prefill, and decode as CUDA-graph replays.

Decode always runs at one of a few fixed batch sizes (1, 2, 4, ..., max), padding with rows that
point at the cache's scratch slot, so that on CUDA each step replays a graph captured at start-up.
The graphs read their inputs from `DecodeInputs`, static buffers the runner fills before a replay.
"""

from __future__ import annotations

import torch
from torch import Tensor

from replica.attention import AttentionBackend
from replica.kv_cache import KVCache
from replica.model import Batch, Qwen3


def batch_sizes(max_rows: int) -> list[int]:
    """1, 2, 4, ... below `max_rows`, then `max_rows` itself."""
    sizes = [1 << i for i in range(max_rows.bit_length()) if 1 << i < max_rows]
    return [*sizes, max_rows]


class DecodeInputs:
    """What a decode graph reads, one column per row: row i feeds `tokens[i]` at `positions[i]`
    of slot `slots[i]` and attends over `seq_lens[i]` tokens. One int64 buffer underneath, so a
    step's inputs cross to the device in one copy; rows past the live ones are padding that
    writes to the cache's scratch slot."""

    def __init__(self, rows: int, scratch_slot: int, device: torch.device) -> None:
        self.scratch_slot = scratch_slot
        self.packed = torch.zeros(4, rows, dtype=torch.int64, device=device)
        self.tokens, self.positions, self.slots, self.seq_lens = self.packed.unbind(0)
        self.slots.fill_(scratch_slot)
        self.seq_lens.fill_(1)

    def set(self, tokens: list[int], positions: list[int], slots: list[int], size: int) -> None:
        """Live rows first, padding up to `size`; row i attends over positions[i] + 1 tokens."""
        pad = size - len(tokens)
        host = torch.tensor(
            [
                tokens + [0] * pad,
                positions + [0] * pad,
                slots + [self.scratch_slot] * pad,
                [p + 1 for p in positions] + [1] * pad,
            ],
            dtype=torch.int64,
        )
        self.packed[:, :size].copy_(host)

    def batch(self, size: int) -> Batch:
        return Batch(
            self.tokens[:size],
            self.positions[:size],
            self.slots[:size],
            seq_lens=self.seq_lens[:size].to(torch.int32),
        )


class ModelRunner:
    """Runs forwards of `model` over `cache`. `enforce_eager` skips graph capture (CPU, tests)."""

    def __init__(
        self,
        model: Qwen3,
        cache: KVCache,
        attention: AttentionBackend,
        sizes: list[int],
        enforce_eager: bool,
    ) -> None:
        self.model, self.cache, self.attention = model, cache, attention
        self.sizes = sizes
        self.inputs = DecodeInputs(sizes[-1], cache.scratch_slot, model.device)
        self.next_tokens = torch.zeros(sizes[-1], dtype=torch.int64, device=model.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if not enforce_eager:
            self._capture()

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> Tensor:
        """Fp32 logits [B, vocab] of each prompt's last token; the prompts' K/V go to `slots`."""
        batch = Batch.prefill(prompts, slots, self.model.device)
        hidden = self.model.forward(batch, self.cache, self.attention)
        assert batch.rows is not None
        return self.model.logits(hidden[batch.rows.last_token]).float()

    def decode(self, tokens: list[int], positions: list[int], slots: list[int]) -> list[int]:
        """Next greedy token of each row; row i attends over positions[i] + 1 tokens."""
        size = self.size_for(len(tokens))
        self.inputs.set(tokens, positions, slots, size)
        self.step(size)
        return self.next_tokens[: len(tokens)].tolist()

    def size_for(self, rows: int) -> int:
        return next(s for s in self.sizes if s >= rows)

    def step(self, size: int) -> None:
        """One decode step over the first `size` rows of `inputs`: a replay when captured."""
        graph = self.graphs.get(size)
        if graph is not None:
            graph.replay()
        else:
            self._forward(size)

    def _forward(self, size: int) -> None:
        hidden = self.model.forward(self.inputs.batch(size), self.cache, self.attention)
        self.next_tokens[:size] = self.model.logits(hidden).argmax(-1)

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
