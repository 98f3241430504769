"""The device tensors of one forward, built from host ints: the runner's alone.

A prefill packs its chunks' tokens without padding (`pack_prefill`). A decode step runs at one
of a few fixed batch sizes, its rows in `DecodeInputs`, static buffers a CUDA graph reads:
live rows first, then padding rows that point at the cache's scratch block. A row's sampling
settings become tensors in one place (`sampling_tensors`), for a decode step and for the first
token of a prefill alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from replica.model.qwen3 import Batch
from replica.ops.attention import BlockTables, CachedContext, PackedRows
from replica.wire.messages import SamplingParams

GREEDY = SamplingParams()


def pack_prefill(
    chunks: list[tuple[list[int], int, int, list[int]]], block_size: int, device: torch.device
) -> Batch:
    """One prefill's packed batch. `chunks`: (tokens, start, end, blocks) for each sequence:
    tokens start..end are computed, 0..start are already in `blocks`."""
    host = []
    for tokens, start, end, blocks in chunks:
        positions = torch.arange(start, end)
        table = torch.tensor(blocks, dtype=torch.int64)
        kv_slots = table[positions // block_size] * block_size + positions % block_size
        host.append(torch.stack((torch.tensor(tokens[start:end]), positions, kv_slots)))
    input_ids, positions, kv_slots = torch.cat(host, dim=1).to(device).unbind(0)
    context = None  # when no sequence has tokens cached before
    if any(start for _, start, _, _ in chunks):
        context = CachedContext.from_blocks(
            [blocks for *_, blocks in chunks], [start for _, start, _, _ in chunks], device
        )
    lengths = [end - start for _, start, end, _ in chunks]
    rows = PackedRows.from_lengths(lengths, device, context)
    return Batch(input_ids, positions, kv_slots, rows=rows)


def sampling_tensors(params: list[SamplingParams | None], pad: int = 0) -> tuple[Tensor, Tensor]:
    """Host tensors of each row's settings, then `pad` greedy rows: fp32 [2, rows]
    (temperature, top_p) and int64 [2, rows] (top_k, seed). None is greedy."""
    settings = [p or GREEDY for p in params] + [GREEDY] * pad
    floats = [[p.temperature for p in settings], [p.top_p for p in settings]]
    ints = [[p.top_k for p in settings], [p.seed or 0 for p in settings]]
    return torch.tensor(floats, dtype=torch.float32), torch.tensor(ints, dtype=torch.int64)


@dataclass
class DecodeRows:
    """One decode step's live rows, host side: each row's token, its position, its decode row
    (which block table it reads), the flat KV slot its K/V go to, and the table entries
    (decode row, index, block) to add first."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    row_ids: list[int] = field(default_factory=list)
    kv_slots: list[int] = field(default_factory=list)
    table_entries: list[tuple[int, int, int]] = field(default_factory=list)

    def split(self, counts: list[int]) -> list[DecodeRows]:
        """Consecutive parts of `counts` rows each (a pipeline's micro-batches), each with the
        table entries of its own rows."""
        parts, start = [], 0
        for count in counts:
            end = start + count
            ids = set(self.row_ids[start:end])
            entries = [entry for entry in self.table_entries if entry[0] in ids]
            parts.append(
                DecodeRows(
                    self.tokens[start:end],
                    self.positions[start:end],
                    self.row_ids[start:end],
                    self.kv_slots[start:end],
                    entries,
                )
            )
            start = end
        return parts


def block_tables(table_rows: int, max_blocks: int, scratch_block: int, device) -> Tensor:
    """The device block tables, one row per decode row and a last row for padding, every entry
    the scratch block until a sequence's blocks are written in."""
    return torch.full((table_rows + 1, max_blocks), scratch_block, dtype=torch.int32, device=device)


class DecodeInputs:
    """What a decode graph reads, one column per batch row: batch row i feeds `tokens[i]` at
    `positions[i]`, writes its K/V to flat KV slot `kv_slots[i]` and attends over `seq_lens[i]`
    tokens of the blocks in `tables[row_ids[i]]`; sampling graphs also read each row's
    temperature, top_p, top_k and seed. One int64 and one fp32 buffer underneath, so a step's
    inputs cross to the device in one copy (three when a row samples). The block tables live on
    the device (`block_tables`, shared by a stage's micro-batches), one row per decode row,
    grown entry by entry as sequences take blocks; batch rows past the live ones are padding,
    whose table row (the last) points at the scratch block."""

    def __init__(self, rows: int, tables: Tensor, scratch_block: int, block_size: int) -> None:
        device = tables.device
        self.scratch_row, self.scratch_slot = tables.shape[0] - 1, scratch_block * block_size
        self.packed = torch.zeros(7, rows, dtype=torch.int64, device=device)
        (
            self.tokens,
            self.positions,
            self.row_ids,
            self.kv_slots,
            self.seq_lens,
            self.top_k,
            self.seeds,
        ) = self.packed.unbind(0)
        self.floats = torch.zeros(2, rows, dtype=torch.float32, device=device)
        self.temperature, self.top_p = self.floats.unbind(0)
        self.tables = tables
        self.row_ids.fill_(self.scratch_row)
        self.kv_slots.fill_(self.scratch_slot)
        self.seq_lens.fill_(1)

    def set_sampling(self, sampling: list[SamplingParams | None], size: int) -> None:
        """Each live row's sampling settings (seeds already drawn); padding rows stay greedy."""
        floats, ints = sampling_tensors(sampling, size - len(sampling))
        self.floats[:, :size].copy_(floats)
        self.packed[5:, :size].copy_(ints)

    def set(self, rows: DecodeRows, size: int) -> None:
        """Live rows first, padding up to `size`; row i attends over positions[i] + 1 tokens."""
        pad = size - len(rows.tokens)
        host = torch.tensor(
            [
                rows.tokens + [0] * pad,
                rows.positions + [0] * pad,
                rows.row_ids + [self.scratch_row] * pad,
                rows.kv_slots + [self.scratch_slot] * pad,
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
            self.kv_slots[:size],
            paged=BlockTables(
                self.tables, self.row_ids[:size], self.seq_lens[:size].to(torch.int32)
            ),
        )
