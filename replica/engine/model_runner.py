"""The model on its device: the KV cache, packed prefill, and decode as CUDA-graph replays.

Decode always runs at one of a few fixed batch sizes (1, 2, 4, ..., max), padding with rows that
point at the cache's scratch block, so that on CUDA each step replays a graph captured at start-up:
two per size, greedy and sampling, so all-greedy steps pay nothing for sampling. The graphs read
their inputs from `DecodeInputs`, static buffers the runner fills before a replay.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from replica.engine.kv_cache import KVCache
from replica.model.qwen3 import Batch, Qwen3
from replica.ops.attention import AttentionBackend, BlockTables, CachedContext, PackedRows
from replica.ops.sampler import Sampler
from replica.wire.messages import SamplingParams


def pack_prefill(
    chunks: list[tuple[list[int], int, int, list[int]]], block_size: int, device: torch.device
) -> Batch:
    """One prefill's packed batch. `chunks`: (tokens, start, end, blocks) for each row: tokens
    start..end are computed, 0..start are already in `blocks`."""
    host = []
    for tokens, start, end, blocks in chunks:
        positions = torch.arange(start, end)
        table = torch.tensor(blocks, dtype=torch.int64)
        slots = table[positions // block_size] * block_size + positions % block_size
        host.append(torch.stack((torch.tensor(tokens[start:end]), positions, slots)))
    input_ids, positions, slots = torch.cat(host, dim=1).to(device).unbind(0)
    context = None  # when no row has tokens cached before
    if any(start for _, start, _, _ in chunks):
        context = CachedContext.from_blocks(
            [blocks for *_, blocks in chunks], [start for _, start, _, _ in chunks], device
        )
    lengths = [end - start for _, start, end, _ in chunks]
    rows = PackedRows.from_lengths(lengths, device, context)
    return Batch(input_ids, positions, slots, rows=rows)


def batch_sizes(max_rows: int) -> list[int]:
    """1, 2, 4, ... below `max_rows`, then `max_rows` itself."""
    sizes = [1 << i for i in range(max_rows.bit_length()) if 1 << i < max_rows]
    return [*sizes, max_rows]


class DecodeInputs:
    """What a decode graph reads, one column per row: row i feeds `tokens[i]` at `positions[i]`,
    writes its K/V to flat slot `slots[i]` and attends over `seq_lens[i]` tokens of the blocks
    in `tables[row_ids[i]]`; sampling graphs also read each row's temperature, top_p, top_k and
    seed. One int64 and one fp32 buffer underneath, so a step's inputs cross to the device in one
    copy (three when a row samples). The block tables live on the device, one row per decode row
    and grown entry by entry as sequences take blocks; rows past the live ones are padding, whose
    table row points at the scratch block."""

    def __init__(
        self, rows: int, max_blocks: int, scratch_block: int, block_size: int, device
    ) -> None:
        self.scratch_row, self.scratch_slot = rows, scratch_block * block_size
        self.packed = torch.zeros(7, rows, dtype=torch.int64, device=device)
        (
            self.tokens,
            self.positions,
            self.row_ids,
            self.slots,
            self.seq_lens,
            self.top_k,
            self.seeds,
        ) = self.packed.unbind(0)
        self.floats = torch.zeros(2, rows, dtype=torch.float32, device=device)
        self.temperature, self.top_p = self.floats.unbind(0)
        self.tables = torch.full(
            (rows + 1, max_blocks), scratch_block, dtype=torch.int32, device=device
        )
        self.row_ids.fill_(self.scratch_row)
        self.slots.fill_(self.scratch_slot)
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
        self.packed[5:, :size].copy_(torch.tensor(ints, dtype=torch.int64))

    def set(self, rows: DecodeRows, size: int) -> None:
        """Live rows first, padding up to `size`; row i attends over positions[i] + 1 tokens."""
        pad = size - len(rows.tokens)
        host = torch.tensor(
            [
                rows.tokens + [0] * pad,
                rows.positions + [0] * pad,
                rows.row_ids + [self.scratch_row] * pad,
                rows.slots + [self.scratch_slot] * pad,
                [p + 1 for p in rows.positions] + [1] * pad,
            ],
            dtype=torch.int64,
        )
        self.packed[:5, :size].copy_(host)
        if rows.table_entries:  # (row, index, block) for blocks the table lacks
            entries = torch.tensor(rows.table_entries).to(self.tables.device)
            self.tables[entries[:, 0], entries[:, 1]] = entries[:, 2].to(torch.int32)

    def batch(self, size: int) -> Batch:
        return Batch(
            self.tokens[:size],
            self.positions[:size],
            self.slots[:size],
            paged=BlockTables(
                self.tables, self.row_ids[:size], self.seq_lens[:size].to(torch.int32)
            ),
        )


@dataclass
class DecodeRows:
    """One decode step's live rows: each row's token, its position, its decode row (which
    block table it reads), the flat slot its K/V go to, and the table entries to add first."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    row_ids: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    table_entries: list[tuple[int, int, int]] = field(default_factory=list)


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
        max_blocks: int,
        enforce_eager: bool,
    ) -> None:
        """`sizes`: the decode batch sizes (graphs on CUDA); `max_blocks`: the most blocks one
        sequence holds (the block tables' width)."""
        self.model, self.cache, self.attention, self.sampler = model, cache, attention, sampler
        self.sizes = sizes
        self.inputs = DecodeInputs(
            sizes[-1], max_blocks, cache.scratch_block, cache.block_size, model.device
        )
        self.next_tokens = torch.zeros(sizes[-1], dtype=torch.int64, device=model.device)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # (size, sampled)
        if not enforce_eager:
            self._capture()

    def prefill(self, chunks: list[tuple[list[int], int, int, list[int]]]) -> Tensor:
        """Fp32 logits [B, vocab] of each chunk's last token. A chunk is (tokens, start, end,
        blocks): tokens start..end are computed, their K/V written to `blocks`, which already
        hold tokens 0..start."""
        batch = pack_prefill(chunks, self.cache.block_size, self.model.device)
        hidden = self.model.forward(batch, self.cache)
        assert batch.rows is not None
        return self.model.logits(hidden[batch.rows.last_token]).float()

    def decode(self, rows: DecodeRows, sampling: list[SamplingParams] | None = None) -> list[int]:
        """Next token of each row (greedy, or drawn by `sampling`, one entry per row with its
        seed set)."""
        size = self.size_for(len(rows.tokens))
        self.inputs.set(rows, size)
        if sampling is not None:
            self.inputs.set_sampling(sampling, size)
        self.step(size, sampled=sampling is not None)
        return self.next_tokens[: len(rows.tokens)].tolist()

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
        hidden = self.model.forward(self.inputs.batch(size), self.cache)
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
