"""A replica's start: the model's weights onto the device with the ops chosen for it, then the
engine over them. The worker calls it, and so do the tests and the benchmarks; the engine itself
never loads anything."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from replica.engine.engine import DEFAULT_CONFIG, Engine, StartupClock
from replica.loading.model import load_stages
from replica.loading.source import ModelSource
from replica.ops import select_ops
from replica.wire.spec import EngineConfig


def load_engine(
    source: ModelSource,
    config: EngineConfig = DEFAULT_CONFIG,
    device: str | list[str] = "cpu",
    eos_ids: Iterable[int] | None = None,
) -> Engine:
    """An engine serving `source` on `device`: bf16 on CUDA, fp32 on the CPU. With
    `config.pipeline_parallel_size` P > 1, one stage a device of the list `device` (a device
    may repeat), or all P on the one `device`. `eos_ids` default to the tokenizer's end-of-turn
    and end-of-text tokens."""
    stages = config.pipeline_parallel_size
    devices = [device] * stages if isinstance(device, str) else device
    if len(devices) != stages:
        raise ValueError(f"{len(devices)} devices for {stages} pipeline stages")
    where = [torch.device(d) for d in devices]
    dtype = torch.bfloat16 if where[0].type == "cuda" else torch.float32
    clock = StartupClock(where[0])
    with clock.phase("weights"):
        ops = [select_ops(d, config.attention) for d in where]
        models = load_stages(
            source, [str(d) for d in where], dtype, config.seed, ops, config.quantize
        )
    if eos_ids is None:
        eos_ids = source.codec().eos_ids
    return Engine(models, eos_ids, config, clock)
