"""Which sequences run next: the waiting queue, the running set, admission, refill and their KV.

Admission comes in fills: one starts once `min_refill` rows are free (static batching: once
nothing runs) and goes on, one prefill a step, until the rows or the queue run out. Waiting for
several free rows keeps prefills large enough to run at full speed; refilling between decode
steps keeps the decode batch full. The scheduler hands each admitted sequence its KV slot and
takes it back when the sequence finishes or is cancelled: nothing else allocates KV.
"""

from __future__ import annotations

import itertools
from collections import deque

from replica.engine.sequence import Sequence
from replica.engine.slots import SlotPool


class Scheduler:
    def __init__(self, max_rows: int, prefill_tokens: int, min_refill: int, refill: bool) -> None:
        self.max_rows = max_rows
        self.prefill_tokens = prefill_tokens
        self.min_refill = min_refill
        self.refill = refill  # False is the static-batching ablation
        self.slots = SlotPool(max_rows)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self._filling = False

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def cancel(self, request_id: int) -> Sequence | None:
        """Drop a request and free its slot; the sequence it was, if it was here."""
        sequence = self.running.get(request_id)
        if sequence is not None:
            self.finish(sequence)
            return sequence
        for waiting in self.waiting:
            if waiting.id == request_id:
                self.waiting.remove(waiting)
                return waiting
        return None

    def next_prefill(self) -> list[Sequence]:
        """The sequences to prefill in this step, each holding its slot (none: decode instead)."""
        room = min(self.slots.num_free, self.max_rows - len(self.running))
        if not self.waiting or room == 0:
            self._filling = False
        elif not self._filling:
            ready = self.refill and room >= min(self.min_refill, len(self.waiting))
            self._filling = ready or not self.running
        group = self._take_group(room) if self._filling else []
        for sequence in group:
            sequence.slot = self.slots.allocate()
        return group

    def decode_batch(self) -> list[Sequence]:
        """The running sequences, each fed its newest token in the next decode step."""
        return list(self.running.values())

    def _take_group(self, room: int) -> list[Sequence]:
        """The longest prompts among the next `room` waiting, up to `prefill_tokens` tokens in
        all (at least one). Prefill packs its prompts, so the projections do no padding work;
        grouping by length still keeps the padded attention of non-varlen backends small."""
        window = sorted(
            itertools.islice(self.waiting, room), key=lambda s: s.prompt_len, reverse=True
        )
        budget, count = self.prefill_tokens, 0
        while count < len(window) and (count == 0 or window[count].prompt_len <= budget):
            budget -= window[count].prompt_len
            count += 1
        taken = {id(s) for s in window[:count]}
        self.waiting = deque(s for s in self.waiting if id(s) not in taken)
        return window[:count]

    def start(self, sequence: Sequence) -> None:
        """A prefilled sequence that decodes from the next step on."""
        self.running[sequence.id] = sequence

    def finish(self, sequence: Sequence) -> None:
        """A prefilled sequence is done (a scoring one right after its prefill): free its slot."""
        self.running.pop(sequence.id, None)
        self.slots.release(sequence.slot)
        sequence.slot = -1
