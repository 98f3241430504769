"""The three submitted systems differ only in these knobs (DESIGN.md, Profiles)."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Profile:
    """Per-system caps. `mcq_reasoning_cap` None means MCQ is answered by letter scoring.
    `reasoning_budget`: the most thought tokens of a model that thinks (a Thinking model, or
    hybrid Qwen3 asked to); half the open-answer cap, which counts thought and answer together,
    so an answer keeps room after a thought at its budget. `mcq_votes`: the thoughts a model
    that thinks samples for one MCQ before its letters are scored (self-consistency)."""

    name: str
    open_cap: int
    reasoning_budget: int
    mcq_reasoning_cap: int | None = None
    mcq_votes: int = 1


PROFILES = MappingProxyType(
    {
        "throughput": Profile("throughput", open_cap=512, reasoning_budget=256),
        "balanced": Profile("balanced", open_cap=1024, reasoning_budget=512),
        "accuracy": Profile(
            "accuracy",
            open_cap=2048,
            reasoning_budget=1024,
            mcq_reasoning_cap=1024,
            mcq_votes=3,
        ),
    }
)


def get_profile(name: str) -> Profile:
    """Look a profile up by name; unknown names are a configuration error."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; expected one of {sorted(PROFILES)}") from None
