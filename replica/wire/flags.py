"""The command line of the replicas: which model, on which devices, and its EngineConfig.

server.py adds these flags to its own parser and turns the parsed arguments into ReplicaSpecs
here, so the flags sit beside the config they fill.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

from replica.wire.spec import (
    ATTENTION_CHOICES,
    DEFAULT_KV_FRACTION,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_PREFILL_TOKENS,
    QUANTIZE_CHOICES,
    EngineConfig,
    ReplicaSpec,
)
from replica.wire.stages import group_gpus

DEFAULT_MODEL = "Qwen/Qwen3-4B-Instruct-2507"


def positive_int(text: str) -> int:
    """An argparse type: sizes and counts of at least 1, refused in one line otherwise."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_replica_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", default=DEFAULT_MODEL, help="HF id, checkpoint dir or tiny-random")
    add(
        "--gpus",
        default="0",
        help="comma-separated GPU ids: one replica each, or each --pipeline-parallel-size in turn "
        "one replica of that many stages (an id may repeat: 0,0 puts two stages on GPU 0)",
    )
    add(
        "--pipeline-parallel-size",
        type=int,
        default=1,
        help="pipeline stages a replica's layers split into, one GPU (or CPU) each",
    )
    add("--cpu-replicas", type=int, default=1, help="replicas when there is no GPU")
    add("--random-weights", action="store_true", help="config only, random weights")
    add(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        help="make a 16-bit model's projections 4-bit at load (round-to-nearest, group 128)",
    )
    add("--attention", choices=ATTENTION_CHOICES, help="default: the best that imports")
    add(
        "--max-model-len",
        type=positive_int,
        default=DEFAULT_MAX_MODEL_LEN,
        help="longest context (prompt and answer); the model's own is the most",
    )
    add("--max-batch", type=positive_int, default=DEFAULT_MAX_BATCH, help="largest decode batch")
    add(
        "--prefill-tokens",
        type=positive_int,
        default=DEFAULT_PREFILL_TOKENS,
        help="tokens a prefill step computes; a longer prompt goes in chunks of this size "
        "(smaller: shorter decode pauses beside a long prompt, docs/PERF.md)",
    )
    add("--kv-fraction", type=float, default=DEFAULT_KV_FRACTION, help="of free GPU memory")
    add(
        "--gpu-memory-gb",
        type=float,
        help="plan memory as if each GPU had this many GiB (an A100-80GB shows about 79)",
    )
    add("--no-refill", dest="refill", action="store_false", help="static batching (ablation)")
    add(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="compute every prompt whole, sharing no cached prefix (ablation)",
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        max_model_len=args.max_model_len,
        max_batch=args.max_batch,
        prefill_tokens=args.prefill_tokens,
        kv_fraction=args.kv_fraction,
        gpu_memory_gb=args.gpu_memory_gb,
        refill=args.refill,
        prefix_caching=args.prefix_caching,
        attention=args.attention,
        quantize=args.quantize,
        pipeline_parallel_size=args.pipeline_parallel_size,
    )


def _overlap(config: EngineConfig, gpus: tuple[int, ...]) -> EngineConfig:
    """Micro-batches only where the stages have GPUs of their own to overlap on: stages that
    share one GPU run one after the other, and split batches there only cost (1.6-1.7x a step
    at 64 rows, docs/PERF.md 'Pipeline stages')."""
    return config if len(set(gpus)) > 1 else replace(config, micro_batches=1)


def replica_specs(args: argparse.Namespace, cuda: bool) -> list[ReplicaSpec]:
    """One spec a group of --pipeline-parallel-size GPUs of --gpus when `cuda`, else
    --cpu-replicas CPU replicas sharing the cores. A bad layout (fewer than one stage, a GPU
    count that is not a multiple of it) is a ValueError of one line."""
    gpus = [int(g) for g in args.gpus.split(",") if g.strip()] if args.gpus else []
    config = engine_config(args)  # refuses a stage count below 1
    if gpus and cuda:
        groups = group_gpus(gpus, config.pipeline_parallel_size)
        return [
            ReplicaSpec(args.model, group, args.random_weights, engine=_overlap(config, group))
            for group in groups
        ]
    threads = max(1, (os.cpu_count() or 1) // args.cpu_replicas)
    return [
        ReplicaSpec(args.model, (), args.random_weights, threads, config)
        for _ in range(args.cpu_replicas)
    ]
