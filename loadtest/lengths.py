"""How many tokens each request may generate.

A server with random weights almost never emits EOS, so every request runs to its `max_tokens`:
the cap *is* the answer length. "fixed" sends the course's 2048 for every request; "realistic"
draws a length per prompt from a log-normal fitted to real answer lengths of its task, so the
load resembles what a trained model would produce.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

COURSE_MAX_TOKENS = 2048

# (median, 90th percentile) of answer lengths in tokens, per task. InfoBench from the issue's
# measurements; a graph answer is one submit_paths(...) call; an MCQ answer with a short
# explanation ends in "The answer is (X)."
REALISTIC_LENGTHS: dict[str, tuple[float, float]] = {
    "infobench": (130.0, 400.0),
    "mmlu_med": (60.0, 200.0),
    "graph": (30.0, 60.0),
}
_Z90 = 1.2815515655446004  # standard normal 90th percentile


class LengthSampler:
    """Chooses `max_tokens` for a request; owns its random generator so runs are reproducible."""

    def __init__(self, mode: str, seed: int = 0, cap: int = COURSE_MAX_TOKENS) -> None:
        if mode not in ("fixed", "realistic"):
            raise ValueError(f"unknown lengths mode {mode!r}")
        self.mode = mode
        self.cap = cap
        self._rng = random.Random(seed)

    def draw(self, task: str) -> int:
        """One answer length for a prompt of `task`, clipped to [1, cap]."""
        if self.mode == "fixed":
            return self.cap
        median, p90 = REALISTIC_LENGTHS[task]
        sigma = math.log(p90 / median) / _Z90
        length = round(self._rng.lognormvariate(math.log(median), sigma))
        return max(1, min(self.cap, length))

    def for_batch(self, tasks: Sequence[str]) -> int:
        """A request carries one cap for all its prompts: the longest answer among them."""
        return max(self.draw(task) for task in tasks)
