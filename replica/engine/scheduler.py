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
from replica.engine.sequence import Placement, SampleKey, Sequence


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


@dataclass(frozen=True)
class Prefilled:
    """What the end of a prefill step started: each sequence whose tokens are now all computed
    (scoring ones included), after its parent when forked, with the index of the chunk whose
    last logits give its next token or choice; and the (source, destination) blocks the forks'
    K/V must be copied to before the next forward."""

    samples: list[tuple[int, Sequence]]
    copies: list[tuple[int, int]]


class Scheduler:
    def __init__(
        self, blocks: BlockPool, max_rows: int, refill: bool, prefill_tokens: int, min_refill: int
    ) -> None:
        self.blocks = blocks
        self.max_rows = max_rows
        self.set_policy(refill, prefill_tokens, min_refill)
        self.rows = RowPool(max_rows)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[SampleKey, Sequence] = {}  # in admission order
        self.partial: Sequence | None = None  # a prompt between two of its chunks
        self.preemptions = 0
        self._admissions = itertools.count()
        self._filling = False
        self._chunked_last = False

    def set_policy(self, refill: bool, prefill_tokens: int, min_refill: int) -> None:
        """`refill` False is static batching (the ablation); `prefill_tokens` a prefill
        step's most tokens; `min_refill` the free decode rows that start a fill."""
        self.refill, self.prefill_tokens, self.min_refill = refill, prefill_tokens, min_refill

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.blocks.block_size)

    def fork_copies(self, tokens: int, forks: int) -> int:
        """Blocks `forks` forks of a `tokens`-token prefill copy: its last block, if partly
        filled (each sample writes its own next token there)."""
        return forks if tokens % self.blocks.block_size else 0

    def add(self, sequence: Sequence, first: bool = False) -> None:
        """Queue a sequence: last, or `first` (the rest of a request already under way)."""
        sequence.kv.forks = sequence.request.n - 1
        if first:
            self.waiting.appendleft(sequence)
        else:
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
        copies = self.fork_copies(len(sequence.tokens), sequence.kv.forks)
        if fresh + copies + idle > self.blocks.num_free - len(self.running):
            return False
        self.blocks.hold(cached)
        self.blocks.note_lookup(len(sequence.tokens), len(cached))
        sequence.kv.blocks = cached + self.blocks.take(fresh)
        sequence.kv.fork_blocks = self.blocks.take(copies)
        sequence.kv.computed = len(cached) * self.blocks.block_size
        sequence.kv.admission = next(self._admissions)
        return True

    def _chunk(self, sequence: Sequence, budget: int) -> Chunk:
        end = min(len(sequence.tokens), sequence.kv.computed + budget)
        return Chunk(sequence, sequence.kv.computed, end)

    def prefilled(self, chunks: list[Chunk]) -> Prefilled:
        """The chunks' K/V are in the cache: their full blocks join the prefix cache; a sequence
        whose tokens are all in starts decoding, with the samples it forks (a scoring one is
        done: its blocks go back)."""
        done = Prefilled([], [])
        for index, chunk in enumerate(chunks):
            sequence = chunk.sequence
            sequence.kv.computed = chunk.end
            self.blocks.register(sequence.kv.blocks, sequence.tokens, sequence.kv.computed)
            if not chunk.completes:
                self.partial = sequence
                continue
            if sequence is self.partial:
                self.partial = None
            if sequence.is_scoring:
                self.blocks.release(sequence.kv.blocks)
                sequence.kv.blocks = []
                done.samples.append((index, sequence))
                continue
            for started in (sequence, *self._fork(sequence, done.copies)):
                started.kv.row = self.rows.allocate()
                self.running[started.key] = started
                done.samples.append((index, started))
        return done

    def _fork(self, parent: Sequence, copies: list[tuple[int, int]]) -> list[Sequence]:
        """The parent's forks: each holds its full blocks and its own copy of the last one when
        that is partly filled (appended to `copies`)."""
        full = parent.kv.computed // self.blocks.block_size
        shared, partial = parent.kv.blocks[:full], parent.kv.blocks[full:]
        forks = []
        for sample in range(1, parent.kv.forks + 1):
            own = []
            if partial:
                own = [parent.kv.fork_blocks.pop()]
                copies.append((partial[0], own[0]))
            self.blocks.hold(shared)
            fork = parent.fork(sample, Placement(shared + own, parent.kv.computed))
            fork.kv.admission = next(self._admissions)
            forks.append(fork)
        parent.kv.forks = 0
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
                    sequence.kv.blocks += self.blocks.take(1)
        return list(self.running.values())

    def _needs_block(self, sequence: Sequence) -> bool:
        return sequence.position // self.blocks.block_size >= len(sequence.kv.blocks)

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
            self.rows.release(sequence.kv.row)
            sequence.kv.row = -1
        self._release_blocks(sequence)
        sequence.kv.computed = 0
        self.waiting.appendleft(sequence)
        self.preemptions += 1

    def finish(self, sequence: Sequence) -> None:
        """A running (or partly prefilled) sequence is done: its row and blocks go back, and
        the full blocks it decoded join the prefix cache (a later turn, or the scoring of its
        thought, finds them)."""
        if self.running.pop(sequence.key, None) is not None:
            self.rows.release(sequence.kv.row)
            sequence.kv.row = -1
            # K/V are written for every token before its newest (fed at `position`)
            self.blocks.register(sequence.kv.blocks, sequence.tokens, sequence.position)
        self._release_blocks(sequence)

    def _release_blocks(self, sequence: Sequence) -> None:
        self.blocks.release(sequence.kv.blocks + sequence.kv.fork_blocks)
        sequence.kv.blocks, sequence.kv.fork_blocks = [], []
