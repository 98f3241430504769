"""How the front end starts a replica: the arguments its spawned process receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a replica needs to start; picklable so a spawned process can receive it."""

    model: str
    gpu: int | None = None
    random_weights: bool = False
    cpu_threads: int = 1
    options: dict[str, Any] = field(default_factory=dict)
