"""The model on its device: the KV cache, packed prefill, and decode as CUDA-graph replays.

Decode always runs at one of a few fixed batch sizes (1, 2, 4, ..., max), padding with rows that
point at the cache's scratch slot, so that on CUDA each step replays a graph captured at start-up:
two per size, greedy and sampling, so all-greedy steps pay nothing for sampling. The graphs read
their inputs from `DecodeInputs`, static buffers the runner fills before a replay.
"""

from __future__ import annotations

import torch
from torch import Tensor

from replica.attention import AttentionBackend
from replica.engine.kv_cache import KVCache
from replica.model.qwen3 import Batch, Qwen3
from replica.model.sampling import Sampler
from replica.wire.messages import SamplingParams


def batch_sizes(max_rows: int) -> list[int]:
    """1, 2, 4, ... below `max_rows`, then `max_rows` itself."""
    sizes = [1 << i for i in range(max_rows.bit_length()) if 1 << i < max_rows]
    return [*sizes, max_rows]


class DecodeInputs:
    """What a decode graph reads, one column per row: row i feeds `tokens[i]` at `positions[i]`
    of slot `slots[i]` and attends over `seq_lens[i]` tokens; sampling graphs also read each
    row's temperature, top_p, top_k and seed. One int64 and one fp32 buffer underneath, so a
    step's inputs cross to the device in one or two copies; rows past the live ones are padding
    that writes to the cache's scratch slot."""

    def __init__(self, rows: int, scratch_slot: int, device: torch.device) -> None:
        self.scratch_slot = scratch_slot
        self.packed = torch.zeros(6, rows, dtype=torch.int64, device=device)
        self.tokens, self.positions, self.slots, self.seq_lens, self.top_k, self.seeds = (
            self.packed.unbind(0)
        )
        self.floats = torch.zeros(2, rows, dtype=torch.float32, device=device)
        self.temperature, self.top_p = self.floats.unbind(0)
        self.slots.fill_(scratch_slot)
        self.seq_lens.fill_(1)

    def set_sampling(self, sampling: list[SamplingParams], size: int) -> None:
        """Each live row's sampling settings (seeds already drawn); padding rows stay greedy."""
        pad = size - len(sampling)
        floats = [[p.temperature for p in sampling] + [0.0] * pad]
        floats.append([p.top_p for p in sampling] + [1.0] * pad)
        ints = [
            [p.top_k for p in sampling] + [0] * pad,
            [p.seed or 0 for p in sampling] + [0] * pad,
        ]
        self.floats[:, :size].copy_(torch.tensor(floats, dtype=torch.float32))
        self.packed[4:, :size].copy_(torch.tensor(ints, dtype=torch.int64))

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
        self.packed[:4, :size].copy_(host)

    def batch(self, size: int) -> Batch:
        return Batch(
            self.tokens[:size],
            self.positions[:size],
            self.slots[:size],
            seq_lens=self.seq_lens[:size].to(torch.int32),
        )


class ModelRunner:
    """Runs forwards of `model` over `cache` with the device's attention and sampler.
    `enforce_eager` skips graph capture (CPU, tests)."""

    def __init__(
        self,
        model: Qwen3,
        cache: KVCache,
        attention: AttentionBackend,
        sampler: Sampler,
        sizes: list[int],
        enforce_eager: bool,
    ) -> None:
        self.model, self.cache, self.attention, self.sampler = model, cache, attention, sampler
        self.sizes = sizes
        self.inputs = DecodeInputs(sizes[-1], cache.scratch_slot, model.device)
        self.next_tokens = torch.zeros(sizes[-1], dtype=torch.int64, device=model.device)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # (size, sampled)
        if not enforce_eager:
            self._capture()

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> Tensor:
        """Fp32 logits [B, vocab] of each prompt's last token; the prompts' K/V go to `slots`."""
        batch = Batch.prefill(prompts, slots, self.model.device)
        hidden = self.model.forward(batch, self.cache, self.attention)
        assert batch.rows is not None
        return self.model.logits(hidden[batch.rows.last_token]).float()

    def decode(
        self,
        tokens: list[int],
        positions: list[int],
        slots: list[int],
        sampling: list[SamplingParams] | None = None,
    ) -> list[int]:
        """Next token of each row (greedy, or drawn by `sampling`, one entry per row with its
        seed set); row i attends over positions[i] + 1 tokens."""
        size = self.size_for(len(tokens))
        self.inputs.set(tokens, positions, slots, size)
        if sampling is not None:
            self.inputs.set_sampling(sampling, size)
        self.step(size, sampled=sampling is not None)
        return self.next_tokens[: len(tokens)].tolist()

    def size_for(self, rows: int) -> int:
        return next(s for s in self.sizes if s >= rows)

    def step(self, size: int, sampled: bool = False) -> None:
        """One decode step over the first `size` rows of `inputs`: a replay when captured."""
        graph = self.graphs.get((size, sampled))
        if graph is not None:
            graph.replay()
        else:
            self._forward(size, sampled)

    def _forward(self, size: int, sampled: bool) -> None:
        hidden = self.model.forward(self.inputs.batch(size), self.cache, self.attention)
        logits = self.model.logits(hidden)
        if not sampled:
            self.next_tokens[:size] = logits.argmax(-1)
            return
        i = self.inputs
        self.next_tokens[:size] = self.sampler(
            logits,
            i.temperature[:size],
            i.top_k[:size],
            i.top_p[:size],
            i.seeds[:size],
            i.positions[:size],
        )

    def _capture(self) -> None:
        """Warm up every size on a side stream (kernels compile, libraries pick algorithms), then
        capture largest first into one shared memory pool."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        variants = [(size, sampled) for size in self.sizes for sampled in (False, True)]
        with torch.cuda.stream(side):
            for size, sampled in variants:
                self._forward(size, sampled)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        for size, sampled in reversed(variants):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(size, sampled)
            self.graphs[size, sampled] = graph
        torch.cuda.synchronize()
