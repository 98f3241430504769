"""The model on its device: the KV cache, every tensor a forward reads, and the CUDA graphs.

The engine and the scheduler hand the runner sequences and host ints; the runner turns them
into device tensors (`replica.engine.batch_inputs`), runs the forward, and hands back host ints:
next tokens, or a scoring request's choice. It alone keeps the device block tables current,
writing only the entries a decode row's table lacks.

Decode always runs at one of a few fixed batch sizes (1, 2, 4, ..., max), so that on CUDA each
step replays a graph captured at start-up: two per size, greedy and sampling, so all-greedy
steps pay nothing for sampling. A pipeline (`--pipeline-parallel-size`) runs its stages
(replica.engine.stage) one after the other, with micro-batches in flight between them.
"""

from __future__ import annotations

from itertools import accumulate

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
from replica.engine.stage import Pair, Stage
from replica.model.qwen3 import Qwen3
from replica.wire.messages import SamplingParams


def batch_sizes(max_rows: int) -> list[int]:
    """1, 2, 4, ... below `max_rows`, then `max_rows` itself."""
    sizes = [1 << i for i in range(max_rows.bit_length()) if 1 << i < max_rows]
    return [*sizes, max_rows]


class ModelRunner:
    """Runs forwards of the model's stages (one: the whole model), each over its own cache.
    `max_rows`: the largest decode batch; `max_blocks`: the most blocks one sequence holds (the
    block tables' width); `micro_batches`: how many a pipeline keeps in flight (1 or 2; one
    stage runs one); `enforce_eager` skips graph capture (CPU, tests).

    The pipeline's schedule (P stages, M micro-batches): a decode step splits its rows (a
    prefill its chunks) into M consecutive parts, and issues them as a wavefront: at tick t,
    stage s works on part t - s. With P = M = 2: stage 0 runs part 0; then stage 0 runs part 1
    while stage 1 runs part 0 (from stage 0's hand-off); then stage 1 runs part 1. On CUDA each
    stage issues to its own stream and waits on an event for the part it continues, so stages
    on two GPUs overlap; on the CPU the same schedule runs in order, with the same tokens. One
    stage keeps today's path: the caller's stream, no events, no hand-off copies.
    """

    def __init__(
        self,
        models: list[Qwen3],
        caches: list[KVCache],
        max_rows: int,
        max_blocks: int,
        enforce_eager: bool,
        micro_batches: int = 1,
    ) -> None:
        self.micro_batches = micro_batches if len(models) > 1 else 1
        rows = -(-max_rows // self.micro_batches)
        self.sizes = batch_sizes(rows)
        streamed = len(models) > 1 and models[0].device.type == "cuda"
        self.stages = [
            Stage(model, cache, rows, self.micro_batches, max_rows, max_blocks, streamed)
            for model, cache in zip(models, caches, strict=True)
        ]
        self.first, self.last = self.stages[0], self.stages[-1]
        self.sampler = self.last.model.ops.sampler
        # decode row -> (the admission of the sequence its table holds, entries written)
        self._tables: dict[int, tuple[int, int]] = {}
        if not enforce_eager:
            for stage in self.stages:
                stage.capture(self.sizes)

    @property
    def inputs(self) -> DecodeInputs:
        """The first stage's decode inputs (of its first micro-batch): the benchmarks'."""
        return self.first.inputs[0]

    @property
    def graphs(self) -> dict:
        return self.first.graphs

    # Prefill.

    def prefill(self, chunks: list[Chunk]) -> Tensor:
        """Fp32 logits [chunks, vocab] of each chunk's last token: a handle the engine passes
        back to `first_picks` once the scheduler has placed the finished sequences."""
        parts = self._parts([c.end - c.start for c in chunks])
        logits: list[Tensor] = []

        def run(stage: Stage, part: int, entering: Pair | None) -> Pair:
            start, count = parts[part]
            batch = pack_prefill(
                [
                    (c.sequence.tokens, c.start, c.end, c.sequence.kv.blocks)
                    for c in chunks[start : start + count]
                ],
                stage.cache.block_size,
                stage.device,
            )
            if entering is not None:
                entering = entering[0].to(stage.device), entering[1].to(stage.device)
            pair = stage.model.forward_stage(batch, stage.cache, entering)
            if stage is self.last:
                assert batch.rows is not None
                logits.append(stage.model.logits(pair[1][batch.rows.last_token]).float())
            return pair

        self._pipeline(len(parts), run)
        return logits[0] if len(logits) == 1 else torch.cat(logits)

    def _parts(self, sizes: list[int]) -> list[tuple[int, int]]:
        """(start, count) of each micro-batch over items of `sizes`: consecutive, the first
        holding about half of the total (a single item, or one micro-batch: all of it)."""
        if self.micro_batches == 1 or len(sizes) < 2:
            return [(0, len(sizes))]
        running = list(accumulate(sizes))
        split = next(i for i, done in enumerate(running, start=1) if 2 * done >= running[-1])
        split = min(split, len(sizes) - 1)
        return [(0, split), (split, len(sizes) - split)]

    def _pipeline(self, parts: int, run) -> None:
        """`run(stage, part, entering)` for every stage and part, in the wavefront order, each
        part handed from stage to stage; on CUDA streams, each waiting on its part's event.
        Every hand-off stays referenced until all is issued: the next stage's stream may still
        be reading it, so later work on its own stream must not reuse its memory."""
        stages = self.stages
        if len(stages) == 1:
            for part in range(parts):
                run(stages[0], part, None)
            return
        for stage in stages:  # after the inputs' copies, on each device's current stream
            if stage.stream is not None:
                stage.stream.wait_stream(torch.cuda.current_stream(stage.device))
        handed: dict[tuple[int, int], tuple[Pair, torch.cuda.Event | None]] = {}
        for tick in range(parts + len(stages) - 1):
            for index, stage in enumerate(stages):
                part = tick - index
                if not 0 <= part < parts:
                    continue
                with stage.active():
                    entering = None
                    if index:
                        entering, event = handed[index - 1, part]
                        if event is not None:
                            stage.stream.wait_event(event)
                    pair = run(stage, part, entering)
                    event = None
                    if stage.stream is not None:
                        event = torch.cuda.Event()
                        event.record(stage.stream)
                    handed[index, part] = pair, event
        if self.last.stream is not None:  # what reads the tokens or logits waits for them
            torch.cuda.current_stream(self.last.device).wait_stream(self.last.stream)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """A forked sample's own copy of its parent's partly filled last block, in every
        stage's cache (each holds the block for its own layers)."""
        if copies:
            for stage in self.stages:
                stage.cache.copy_blocks(copies)

    def first_picks(
        self, logits: Tensor, samples: list[tuple[int, Sequence]]
    ) -> tuple[list[int], list[list[float] | None]]:
        """For each (chunk index, sequence) whose prefill ended: a scoring sequence's best
        choice (an index into its choice ids) and the choices' probabilities (a softmax over
        them alone), else its first token, greedy or drawn as a decode step draws it, and None.
        One device sync for them all."""
        probs: list[list[float] | None] = [None] * len(samples)
        with self.last.on_device():
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
            if scoring:
                choices = [list(group[i].request.choice_ids or []) for i in scoring]
                choice_probs = _choice_probs(logits[scoring], choices)
                picks[scoring] = choice_probs.argmax(-1)
                for i, ids, row in zip(scoring, choices, choice_probs.tolist(), strict=True):
                    probs[i] = row[: len(ids)]
        return picks.tolist(), probs

    # Decode.

    def decode(self, running: list[Sequence]) -> list[int]:
        """Each running sequence's next token: its newest token fed at its position, its K/V
        written into the block that position falls in."""
        rows, size = DecodeRows(), self.first.cache.block_size
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
        count = len(rows.tokens)
        parts = self._parts([1] * count)
        pieces = rows.split([n for _, n in parts]) if len(parts) > 1 else [rows]
        for m, ((start, n), piece) in enumerate(zip(parts, pieces, strict=True)):
            size = self.size_for(n)
            for stage in self.stages:
                stage.inputs[m].set(piece, size)
            if sampling is not None:
                self.last.inputs[m].set_sampling(sampling[start : start + n], size)
        self.replay(count, sampled=sampling is not None)
        tokens = [self.last.next_tokens[m, :n] for m, (_, n) in enumerate(parts)]
        return (tokens[0] if len(tokens) == 1 else torch.cat(tokens)).tolist()

    def size_for(self, rows: int) -> int:
        return next(s for s in self.sizes if s >= rows)

    def replay(self, rows: int, sampled: bool = False) -> None:
        """One decode step over the first `rows` rows set by `decode_rows` (graph replays when
        captured): each micro-batch at its batch size, through every stage."""
        parts = self._parts([1] * rows)

        def run(stage: Stage, part: int, entering: Pair | None) -> Pair | None:
            return stage.decode(part, self.size_for(parts[part][1]), sampled, entering)

        self._pipeline(len(parts), run)


def _choice_probs(logits: Tensor, choice_ids: list[list[int]]) -> Tensor:
    """[rows, most choices] fp32: each row's softmax over its own choice tokens' logits (0 in
    the padding of a row with fewer choices)."""
    width = max(len(ids) for ids in choice_ids)
    index = torch.tensor([ids + ids[-1:] * (width - len(ids)) for ids in choice_ids])
    picked = logits.gather(1, index.to(logits.device)).float()
    widths = torch.tensor([len(ids) for ids in choice_ids], device=logits.device)
    padding = torch.arange(width, device=logits.device)[None, :] >= widths[:, None]
    return picked.masked_fill(padding, float("-inf")).softmax(-1)
