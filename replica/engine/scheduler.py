"""Which sequences run next, and the KV blocks and decode rows they hold.

Admission comes in fills: one starts once `min_refill` decode rows are free (static batching:
once nothing runs) and goes on, one prefill a step, until the rows, the blocks or the queue run
out. Waiting for several free rows keeps prefills large enough to run at full speed; refilling
between decode steps keeps the decode batch full. A scoring sequence needs no decode row: it is
admitted whenever blocks allow, and its blocks go back (to the prefix cache) after its prefill.

A prefill step computes at most `prefill_tokens` tokens: a longer prompt is prefilled in chunks,
one chunk a step, alternating with decode steps while other rows run. A prompt's leading full
blocks that are already cached are shared, not computed. When a decode step needs a block and
none is free, the newest sequence gives its blocks back and waits again at the head of the
queue; it is computed anew (prompt and output so far) when it is readmitted.

A request for n samples is admitted once, with rows for all n and a block for each fork's copy
of its last, partly filled block; when its prefill ends, the n - 1 forks share its full blocks
(by reference count), take their copies, and decode on their own from then on.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from replica.engine.blocks import BlockPool
from replica.engine.rows import RowPool
from replica.engine.sequence import SampleKey, Sequence


@dataclass(frozen=True)
class Chunk:
    """Tokens start..end of a sequence to compute in this prefill (0..start are in its blocks)."""

    sequence: Sequence
    start: int
    end: int

    @property
    def completes(self) -> bool:
        """The chunk ends the sequence's tokens: its last logits give the next token."""
        return self.end == len(self.sequence.tokens)


class Scheduler:
    def __init__(
        self, blocks: BlockPool, max_rows: int, prefill_tokens: int, min_refill: int, refill: bool
    ) -> None:
        self.blocks = blocks
        self.max_rows = max_rows
        self.prefill_tokens = prefill_tokens
        self.min_refill = min_refill
        self.refill = refill  # False is the static-batching ablation
        self.rows = RowPool(max_rows)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[SampleKey, Sequence] = {}  # in admission order
        self.partial: Sequence | None = None  # a prompt between two of its chunks
        self.preemptions = 0
        self._arrivals = itertools.count()
        self._filling = False
        self._chunked_last = False

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.blocks.block_size)

    def fork_copies(self, tokens: int, forks: int) -> int:
        """Blocks `forks` forks of a `tokens`-token prefill copy: its last block, if partly
        filled (each sample writes its own next token there)."""
        return forks if tokens % self.blocks.block_size else 0

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.partial)

    def cancel(self, request_id: int, sample: int | None = None) -> list[Sequence]:
        """Drop a request's sequences (or one sample's) and free what they hold; those dropped."""

        def matches(sequence: Sequence) -> bool:
            return sequence.id == request_id and sample in (None, sequence.sample)

        dropped = [s for s in self.running.values() if matches(s)]
        if self.partial is not None and matches(self.partial):
            dropped.append(self.partial)
        for sequence in dropped:
            self.finish(sequence)
        waiting = [s for s in self.waiting if matches(s)]
        for sequence in waiting:
            self.waiting.remove(sequence)
        return dropped + waiting

    # Prefill.

    def next_prefill(self) -> list[Chunk]:
        """What to prefill in this step, each sequence holding the blocks its chunk writes
        (none: decode instead)."""
        if self.partial is not None:
            if self.running and self._chunked_last:
                self._chunked_last = False  # the other rows decode once between two chunks
                return []
            self._chunked_last = True
            return [self._chunk(self.partial, self.prefill_tokens)]
        self._update_filling()
        chunks: list[Chunk] = []
        budget = self.prefill_tokens
        for sequence in sorted(self._candidates(), key=lambda s: len(s.tokens), reverse=True):
            cached = self.blocks.cached_prefix(sequence.tokens)
            if len(sequence.tokens) - len(cached) * self.blocks.block_size > budget and chunks:
                break
            if not self._admit(sequence, cached):
                break
            chunk = self._chunk(sequence, budget)
            chunks.append(chunk)
            budget -= chunk.end - chunk.start
            if budget <= 0:
                break
        taken = {id(chunk.sequence) for chunk in chunks}
        if taken:
            self.waiting = deque(s for s in self.waiting if id(s) not in taken)
        self._chunked_last = bool(chunks) and not chunks[0].completes
        return chunks

    def _update_filling(self) -> None:
        room = self.rows.num_free
        if not self.waiting or room == 0:
            self._filling = False
        elif not self._filling:
            ready = self.refill and room >= min(self.min_refill, len(self.waiting))
            self._filling = ready or not self.running

    def _candidates(self) -> list[Sequence]:
        """Waiting sequences this prefill may take, in arrival order: scoring ones whenever
        (they need no decode row), generating ones while a fill is on and their rows are free
        (the first that does not fit ends them: no overtaking)."""
        room = self.rows.num_free if self._filling else 0
        picked = []
        for sequence in itertools.islice(self.waiting, 4 * self.max_rows):
            if sequence.is_scoring:
                picked.append(sequence)
            elif room >= sequence.rows_needed:
                picked.append(sequence)
                room -= sequence.rows_needed
            else:
                room = 0
        return picked

    def _admit(self, sequence: Sequence, cached: list[int]) -> bool:
        """Give a waiting sequence its cached prefix, fresh blocks for the rest of its tokens and
        for its forks' copies, if the pool can spare them and still leave a block for each
        running row."""
        idle = sum(self.blocks.refs[block] == 0 for block in cached)
        fresh = self.blocks_for(len(sequence.tokens)) - len(cached)
        copies = self.fork_copies(len(sequence.tokens), sequence.forks)
        if fresh + copies + idle > self.blocks.num_free - len(self.running):
            return False
        self.blocks.hold(cached)
        self.blocks.note_lookup(len(sequence.tokens), len(cached))
        sequence.blocks = cached + self.blocks.take(fresh)
        sequence.fork_blocks = self.blocks.take(copies)
        sequence.computed = len(cached) * self.blocks.block_size
        sequence.arrival = next(self._arrivals)
        return True

    def _chunk(self, sequence: Sequence, budget: int) -> Chunk:
        end = min(len(sequence.tokens), sequence.computed + budget)
        return Chunk(sequence, sequence.computed, end)

    def prefilled(self, chunks: list[Chunk]) -> list[tuple[int, int]]:
        """The chunks' K/V are in the cache: their full blocks join the prefix cache; a sequence
        whose tokens are all in starts decoding, with the samples it forks (a scoring one is
        done: its blocks go back). Returns the (source, destination) blocks the forks' K/V must
        be copied to before the next forward."""
        copies: list[tuple[int, int]] = []
        for chunk in chunks:
            sequence = chunk.sequence
            sequence.computed = chunk.end
            self.blocks.register(sequence.blocks, sequence.tokens, sequence.computed)
            if not chunk.completes:
                self.partial = sequence
                continue
            if sequence is self.partial:
                self.partial = None
            if sequence.is_scoring:
                self.blocks.release(sequence.blocks)
                sequence.blocks = []
                continue
            sequence.forked = self._fork(sequence, copies)
            for started in (sequence, *sequence.forked):
                started.row = self.rows.allocate()
                started.table_written = 0
                self.running[started.key] = started
        return copies

    def _fork(self, parent: Sequence, copies: list[tuple[int, int]]) -> list[Sequence]:
        """The parent's forks: each holds its full blocks and its own copy of the last one when
        that is partly filled (appended to `copies`)."""
        full = parent.computed // self.blocks.block_size
        shared, partial = parent.blocks[:full], parent.blocks[full:]
        forks = []
        for sample in range(1, parent.forks + 1):
            own = []
            if partial:
                own = [parent.fork_blocks.pop()]
                copies.append((partial[0], own[0]))
            self.blocks.hold(shared)
            fork = parent.fork(sample, shared + own)
            fork.arrival = next(self._arrivals)
            forks.append(fork)
        parent.forks = 0
        return forks

    # Decode.

    def decode_batch(self) -> list[Sequence]:
        """The running sequences, each holding a block for the token it is fed next; the newest
        are preempted while the pool has too few blocks for the rest."""
        for sequence in list(self.running.values()):
            while sequence.key in self.running and self._needs_block(sequence):
                if self.blocks.num_free == 0:
                    self._preempt(self._newest())
                else:
                    sequence.blocks += self.blocks.take(1)
        return list(self.running.values())

    def _needs_block(self, sequence: Sequence) -> bool:
        return sequence.position // self.blocks.block_size >= len(sequence.blocks)

    def _newest(self) -> Sequence:
        if self.partial is not None:
            return self.partial
        return next(reversed(self.running.values()))

    def _preempt(self, sequence: Sequence) -> None:
        """Give back its blocks and row; it waits first in line, to be computed anew."""
        if sequence is self.partial:
            self.partial = None
        else:
            del self.running[sequence.key]
            self.rows.release(sequence.row)
            sequence.row = -1
        self._release_blocks(sequence)
        sequence.computed = 0
        self.waiting.appendleft(sequence)
        self.preemptions += 1

    def finish(self, sequence: Sequence) -> None:
        """A running (or partly prefilled) sequence is done: its row and blocks go back."""
        if self.running.pop(sequence.key, None) is not None:
            self.rows.release(sequence.row)
            sequence.row = -1
        self._release_blocks(sequence)

    def _release_blocks(self, sequence: Sequence) -> None:
        self.blocks.release(sequence.blocks + sequence.fork_blocks)
        sequence.blocks, sequence.fork_blocks = [], []
