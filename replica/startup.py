"""A replica's start: the model's weights onto the device with the ops chosen for it, then the
engine over them. The worker calls it, and so do the tests and the benchmarks; the engine itself
never loads anything."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from replica.engine.engine import DEFAULT_CONFIG, Engine, StartupClock
from replica.loading.model import load_model
from replica.loading.source import ModelSource
from replica.ops import select_ops
from replica.wire.spec import EngineConfig


def load_engine(
    source: ModelSource,
    config: EngineConfig = DEFAULT_CONFIG,
    device: str = "cpu",
    eos_ids: Iterable[int] | None = None,
) -> Engine:
    """An engine serving `source` on `device`: bf16 on CUDA, fp32 on the CPU. `eos_ids` default
    to the tokenizer's end-of-turn and end-of-text tokens."""
    where = torch.device(device)
    dtype = torch.bfloat16 if where.type == "cuda" else torch.float32
    clock = StartupClock(where)
    with clock.phase("weights"):
        ops = select_ops(where, config.attention)
        model = load_model(source, str(where), dtype, config.seed, ops, config.quantize)
    if eos_ids is None:
        eos_ids = source.codec().eos_ids
    return Engine(model, eos_ids, config, clock)
