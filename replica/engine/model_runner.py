"""The model on its device: the KV cache, every tensor a forward reads, and the CUDA graphs.

The engine and the scheduler hand the runner sequences and host ints; the runner turns them
into device tensors (`replica.engine.batch_inputs`), runs the forward, and hands back host ints:
next tokens, or a scoring request's choice. It alone keeps the device block tables current,
writing only the entries a decode row's table lacks.

Decode always runs at one of a few fixed batch sizes (1, 2, 4, ..., max), so that on CUDA each
step replays a graph captured at start-up: two per size, greedy and sampling, so all-greedy
steps pay nothing for sampling.
"""

from __future__ import annotations

import torch
from torch import Tensor

from replica.engine.batch_inputs import (
    DecodeInputs,
    DecodeRows,
    pack_prefill,
    sampling_tensors,
)
from replica.engine.kv_cache import KVCache
from replica.engine.scheduler import Chunk
from replica.engine.sequence import Sequence
from replica.model.qwen3 import Batch, Qwen3
from replica.wire.messages import SamplingParams


def batch_sizes(max_rows: int) -> list[int]:
    """1, 2, 4, ... below `max_rows`, then `max_rows` itself."""
    sizes = [1 << i for i in range(max_rows.bit_length()) if 1 << i < max_rows]
    return [*sizes, max_rows]


class ModelRunner:
    """Runs forwards of `model` over `cache`. `sizes`: the decode batch sizes (graphs on CUDA);
    `max_blocks`: the most blocks one sequence holds (the block tables' width);
    `enforce_eager` skips graph capture (CPU, tests)."""

    def __init__(
        self, model: Qwen3, cache: KVCache, sizes: list[int], max_blocks: int, enforce_eager: bool
    ) -> None:
        self.model, self.cache, self.sizes = model, cache, sizes
        self.sampler = model.ops.sampler
        self.inputs = DecodeInputs(
            sizes[-1], max_blocks, cache.scratch_block, cache.block_size, model.device
        )
        # decode row -> (the admission of the sequence its table holds, entries written)
        self._tables: dict[int, tuple[int, int]] = {}
        self.next_tokens = torch.zeros(sizes[-1], dtype=torch.int64, device=model.device)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # (size, sampled)
        if not enforce_eager:
            self._capture()

    # Prefill.

    def prefill(self, chunks: list[Chunk]) -> Tensor:
        """Fp32 logits [chunks, vocab] of each chunk's last token: a handle the engine passes
        back to `first_picks` once the scheduler has placed the finished sequences."""
        batch = pack_prefill(
            [(c.sequence.tokens, c.start, c.end, c.sequence.kv.blocks) for c in chunks],
            self.cache.block_size,
            self.model.device,
        )
        hidden = self.model.forward(batch, self.cache)
        assert batch.rows is not None
        return self.model.logits(hidden[batch.rows.last_token]).float()

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """A forked sample's own copy of its parent's partly filled last block."""
        if copies:
            self.cache.copy_blocks(copies)

    def first_picks(
        self, logits: Tensor, samples: list[tuple[int, Sequence]]
    ) -> tuple[list[int], list[list[float] | None]]:
        """For each (chunk index, sequence) whose prefill ended: a scoring sequence's best
        choice (an index into its choice ids) and the choices' probabilities (a softmax over
        them alone), else its first token, greedy or drawn as a decode step draws it, and None.
        One device sync for them all."""
        logits = logits[[index for index, _ in samples]]
        group = [sequence for _, sequence in samples]
        picks = logits.argmax(-1)
        sampled = [i for i, s in enumerate(group) if s.sampling is not None]
        if sampled:
            floats, ints = sampling_tensors([group[i].sampling for i in sampled])
            floats, ints = floats.to(logits.device), ints.to(logits.device)
            positions = torch.tensor([group[i].position for i in sampled], device=logits.device)
            picks[sampled] = self.sampler(
                logits[sampled], floats[0], ints[0], floats[1], ints[1], positions
            )
        scoring = [i for i, s in enumerate(group) if s.is_scoring]
        probs: list[list[float] | None] = [None] * len(group)
        if scoring:
            choice_probs = _choice_probs(
                logits[scoring], [list(group[i].request.choice_ids or []) for i in scoring]
            )
            picks[scoring] = choice_probs.argmax(-1)
            for i, row in zip(scoring, choice_probs.tolist(), strict=True):
                probs[i] = row[: len(group[i].request.choice_ids or [])]
        return picks.tolist(), probs

    # Decode.

    def decode(self, running: list[Sequence]) -> list[int]:
        """Each running sequence's next token: its newest token fed at its position, its K/V
        written into the block that position falls in."""
        rows, size = DecodeRows(), self.cache.block_size
        for sequence in running:
            position, blocks, row = sequence.position, sequence.kv.blocks, sequence.kv.row
            rows.tokens.append(sequence.output[-1])
            rows.positions.append(position)
            rows.row_ids.append(row)
            rows.kv_slots.append(blocks[position // size] * size + position % size)
            admission, written = self._tables.get(row, (-1, 0))
            if admission != sequence.kv.admission:  # a sequence new to this decode row
                written = 0
            rows.table_entries += [(row, j, blocks[j]) for j in range(written, len(blocks))]
            self._tables[row] = (sequence.kv.admission, len(blocks))
        sampled = any(s.sampling is not None for s in running)
        return self.decode_rows(rows, [s.sampling for s in running] if sampled else None)

    def decode_rows(
        self, rows: DecodeRows, sampling: list[SamplingParams | None] | None = None
    ) -> list[int]:
        """Next token of each of `rows` (greedy, or drawn by `sampling`, one entry per row with
        its seed set); the benchmarks' way in with rows of their own."""
        size = self.size_for(len(rows.tokens))
        self.inputs.set(rows, size)
        if sampling is not None:
            self.inputs.set_sampling(sampling, size)
        self.replay(size, sampled=sampling is not None)
        return self.next_tokens[: len(rows.tokens)].tolist()

    def size_for(self, rows: int) -> int:
        return next(s for s in self.sizes if s >= rows)

    def replay(self, size: int, sampled: bool = False) -> None:
        """One decode step over the first `size` rows of `inputs`: a replay when captured."""
        graph = self.graphs.get((size, sampled))
        if graph is not None:
            graph.replay()
        else:
            self._forward(size, sampled)

    def _forward(self, size: int, sampled: bool) -> None:
        batch: Batch = self.inputs.batch(size)
        logits = self.model.logits(self.model.forward(batch, self.cache))
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


def _choice_probs(logits: Tensor, choice_ids: list[list[int]]) -> Tensor:
    """[rows, most choices] fp32: each row's softmax over its own choice tokens' logits (0 in
    the padding of a row with fewer choices)."""
    width = max(len(ids) for ids in choice_ids)
    index = torch.tensor([ids + ids[-1:] * (width - len(ids)) for ids in choice_ids])
    picked = logits.gather(1, index.to(logits.device)).float()
    widths = torch.tensor([len(ids) for ids in choice_ids], device=logits.device)
    padding = torch.arange(width, device=logits.device)[None, :] >= widths[:, None]
    return picked.masked_fill(padding, float("-inf")).softmax(-1)
