"""What the load is made of: prompts labelled by task, and the course's arrival schedule."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import orjson

TASKS = ("graph", "mmlu_med", "infobench")

_GRAPH = re.compile(r"directed graph with \d+ nodes")
_MCQ = re.compile(r"multiple choice question|\n\s*(Options|Choices):\s*\n\s*A[.)]", re.IGNORECASE)


def classify(prompt: str) -> str:
    """The task of a prompt, from its content: the tool must label any schedule, gold or not."""
    if _GRAPH.search(prompt):
        return "graph"
    if _MCQ.search(prompt):
        return "mmlu_med"
    return "infobench"


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
