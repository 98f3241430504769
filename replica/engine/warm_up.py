"""The start-up warm-up: every prefill kernel variant a prompt can meet is compiled before the
replica reports ready, not on the first requests.

Triton compiles a kernel anew for each set of constexprs and for each size argument's class
(divisible by 16 or not), and the ops tables pick different kernels by token count (and, for the
experts, by pairs an expert: tokens x top-k / experts). With a cold Triton cache (a fresh
container) the first batches of a served schedule waited 30 s while kernels compiled
(docs/PERF.md, "Reasoning models", the realistic run). So the warm-up prefills a ladder of
sizes: each power of two from 16 to 512 and 8 past it (the two classes at every table
boundary), plus 1, 2 and 8 (a prompt whose prefix is cached computes only its last few tokens),
each alone; then 512 and 520 packed tokens again, the second over the first's cached blocks (a
chunk that starts inside a sequence).
"""

from __future__ import annotations

from typing import Protocol

from replica.engine.request import EngineRequest

LADDER = (1, 2, 8, *(size for power in (16, 32, 64, 128, 256, 512) for size in (power, power + 8)))


class Warmable(Protocol):
    max_context: int
    max_rows: int

    def add(self, request: EngineRequest) -> None: ...
    def has_work(self) -> bool: ...
    def step(self) -> list: ...
    def clear_prefix_cache(self) -> None: ...


def warm_up_sizes(longest: int) -> list[int]:
    """The ladder's prefill sizes a context of `longest` prompt tokens takes."""
    return [size for size in LADDER if size <= longest]


def warm_up_prefill(engine: Warmable) -> None:
    """Scoring prefills of every ladder size, the prefix cache cleared after each (so each
    computes all its tokens), then 512 and 520 packed tokens made of as many prompts as the
    context needs, the 520 reusing the 512's cached blocks."""
    longest = engine.max_context - 1
    for size in warm_up_sizes(longest):
        _run(engine, [EngineRequest(-1, [0] * size, choice_ids=[0])])
        engine.clear_prefix_cache()
    length = min(512, longest)
    for total in (512, 520):
        count = min(engine.max_rows, -(-total // length))
        sizes = [min(length, total - i * length) for i in range(count)]
        _run(engine, [EngineRequest(-1 - i, [0] * n, choice_ids=[0]) for i, n in enumerate(sizes)])


def _run(engine: Warmable, requests: list[EngineRequest]) -> None:
    for request in requests:
        engine.add(request)
    while engine.has_work():
        engine.step()
