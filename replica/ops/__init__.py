"""The ops layer: every kernel a forward runs, and the one place that chooses which.

TEMPORARY SHIM (engine branch only): replaced wholesale by the ops branch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

ATTENTION_BACKENDS = ("reference", "triton", "flash")


@dataclass(frozen=True)
class Ops:
    layer: Any
    attention: Any
    sampler: Any


def select_ops(device: torch.device, attention: str | None = None) -> Ops:
    from replica.ops import select

    return Ops(
        select.select_ops(device),
        select.select_attention(device, attention),
        select.select_sampler(device),
    )
