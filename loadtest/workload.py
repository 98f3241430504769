"""What the load is made of: prompts labelled by task, and the course's arrival schedule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import orjson

from shortcuts.data import ROUTE_OF_TASK
from shortcuts.router import route

TASKS = tuple(ROUTE_OF_TASK)
_TASK_OF_ROUTE = {r: task for task, r in ROUTE_OF_TASK.items()}


def classify(prompt: str) -> str:
    """The course task of a prompt, as the server routes it: the tool must label any schedule,
    gold or not, and its per-task numbers should be the server's."""
    return _TASK_OF_ROUTE[route(prompt)]


@dataclass(frozen=True)
class Prompt:
    """One prompt as sent; `task` labels latency and throughput per task in the report."""

    text: str
    task: str

    @classmethod
    def of(cls, text: str) -> Prompt:
        return cls(text, classify(text))


@dataclass(frozen=True)
class ScheduledBatch:
    """One POST of the course schedule: its prompts leave together at `arrival_s`."""

    batch_id: int
    arrival_s: float
    prompts: tuple[Prompt, ...]


def load_schedule(path: Path) -> list[ScheduledBatch]:
    """Read a batch_arrivals.json (the course format), in arrival order."""
    rows = orjson.loads(path.read_bytes())
    batches = [
        ScheduledBatch(
            batch_id=int(row["batch_id"]),
            arrival_s=float(row["arrival_time"]),
            prompts=tuple(Prompt.of(text) for text in row["prompts"]),
        )
        for row in rows
    ]
    return sorted(batches, key=lambda b: b.arrival_s)


def load_prompts(path: Path) -> list[Prompt]:
    """Read the prompt pool of the closed loop from any JSONL with a "prompt" field."""
    with path.open("rb") as f:
        return [Prompt.of(orjson.loads(line)["prompt"]) for line in f if line.strip()]
