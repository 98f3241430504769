"""The MoE (Qwen3-30B-A3B) engine against its byte floor and the dense 4B, in one GPU run.

    python -m benchmarks.bench_moe --out docs/perf/moe-h100.json

Random weights of the real shapes. For each model: start-up, the graph-replayed decode step at
1, 8, 64 and 256 rows of about 500 live tokens, and MCQ scoring (bench 5's workload: prefill-only
requests of 100 to 600 tokens). The MoE step's floor is the bytes it must read (every non-expert
weight, the experts its routing touched in that very step, the rows' live K/V) over a copy
bandwidth measured in this run.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch

from benchmarks.bench import scoring
from benchmarks.decode_parts import synthetic_rows
from benchmarks.yardsticks import copy_bandwidth, matmul_flops, time_ms
from replica.engine.engine import Engine
from replica.engine.kv_cache import bytes_per_token
from replica.loading.source import VENDORED_CONFIGS, resolve
from replica.ops.mlp import SparseMoE
from replica.startup import load_engine
from replica.wire.spec import EngineConfig

ROWS = (1, 8, 64, 256)
LIVE = 500


def routing_rows(x: torch.Tensor) -> torch.Tensor:
    """[T, hidden] in x's dtype: a fixed pseudo-random vector for each batch position, the same
    every step (arithmetic on the positions: no generator, so a CUDA graph captures it)."""
    rows = torch.arange(1, x.shape[0] + 1, device=x.device, dtype=torch.float32)[:, None]
    cols = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=torch.float32)[None, :]
    hashed = torch.sin(rows * 12.9898 + cols * 78.233) * 43758.5453
    return (torch.remainder(hashed, 1.0) - 0.5).to(x.dtype)


@contextmanager
def spread_routing(wanted: bool = True) -> Iterator[str]:
    """Where `wanted`, MoE layers run inside route each token by `routing_rows` instead of its
    hidden state (its experts still compute on the state itself), so a batch spreads over the
    experts about uniformly, as a trained model's many distinct tokens do, about. With random
    weights the router sends a whole batch to a few experts: 18.7 of 128 a layer at 64 rows in
    the 235B (PERF.md, "Pipeline stages"), where a uniform router would touch about 126, and the
    random int4 30B touched 19.6 even with the batch's mean taken out of the states first (this
    context's first design; PERF.md, issue 36, fourth session). For benchmarks only; the step's
    `experts_touched` shows what it did. Yields how tokens are routed, for the report."""
    if not wanted:
        yield "the random router's"
        return
    from replica.ops import feed_forward

    route = feed_forward.route_pairs
    # Made once for the widest batch so far (a power of two) and sliced, so a step adds no
    # kernels a layer; every table is kept, as CUDA graphs captured earlier read theirs.
    tables: list[torch.Tensor] = []

    def fits(table: torch.Tensor, x: torch.Tensor) -> bool:
        wide_enough = table.shape[0] >= x.shape[0] and table.shape[1:] == x.shape[1:]
        return wide_enough and table.dtype == x.dtype and table.device == x.device

    def spread(x: torch.Tensor, *args, **kwargs):
        rows = x.shape[0]
        if not tables or not fits(tables[-1], x):
            tables.append(routing_rows(x.new_empty(1 << (rows - 1).bit_length(), x.shape[1])))
        return route(tables[-1][:rows], *args, **kwargs)

    with mock.patch.object(feed_forward, "route_pairs", spread):
        yield "spread"


def step_ms(engine: Engine, rows: int, seed: int) -> float:
    """One replay of the decode graph at `rows` rows, each at position LIVE - 1 of its blocks."""
    decode, held = synthetic_rows(engine, rows, LIVE)
    gen = torch.Generator().manual_seed(seed)
    decode.tokens = torch.randint(
        0, engine.model.config.vocab_size, (rows,), generator=gen
    ).tolist()
    engine.runner.decode_rows(decode)
    ms = time_ms(lambda: engine.runner.replay(rows), repeats=20)
    engine.blocks.release(held)
    return ms


def step_floor_bytes(engine: Engine, rows: int) -> tuple[int, float]:
    """Bytes the step just replayed had to read (every stage's), and the mean experts it
    touched per layer. The embedding table is left out: a step reads only its rows' embeddings."""
    total, touched = 0, []
    for model in engine.stages:
        total += model.weight_bytes()
        if model.embed is not None:
            total -= model.embed.numel() * model.embed.element_size()
            if model.lm_head is model.embed:
                total += model.lm_head.numel() * model.lm_head.element_size()
        for layer in model.layers:
            moe = layer.mlp
            if isinstance(moe, SparseMoE):
                used = int((model.ops.moe.expert_counts(moe) > 0).sum())
                per_expert = sum(t.numel() * t.element_size() for t in moe.tensors()[1:])
                total -= (moe.num_experts - used) * per_expert // moe.num_experts
                touched.append(used)
    total += rows * LIVE * bytes_per_token(engine.model.config, engine.model.dtype)
    return total, sum(touched) / max(len(touched), 1)


def measure(config: str, bandwidth: float, flops: float, args: argparse.Namespace) -> dict:
    source = resolve(config, random_weights=True)
    config = EngineConfig(
        max_batch=256, max_model_len=args.max_model_len, gpu_memory_gb=args.gpu_memory_gb
    )
    engine = load_engine(source, config, "cuda", eos_ids=())
    result: dict = {"engine": engine.info, "startup_s": engine.info["startup_s"]}
    result["decode_step_ms"], result["bytes_floor_fraction"], result["experts_touched"] = {}, {}, {}
    for rows in ROWS:
        ms = step_ms(engine, rows, seed=rows)
        floor_bytes, touched = step_floor_bytes(engine, rows)
        result["decode_step_ms"][str(rows)] = round(ms, 3)
        result["bytes_floor_fraction"][str(rows)] = round(1e3 * floor_bytes / bandwidth / ms, 3)
        result["experts_touched"][str(rows)] = round(touched, 1)
    result["scoring"] = scoring(engine, args.requests, source.config.vocab_size, flops)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moe", default=str(VENDORED_CONFIGS / "qwen3-30b-a3b-instruct-2507"))
    parser.add_argument("--dense", default=str(VENDORED_CONFIGS / "qwen3-4b-instruct-2507"))
    parser.add_argument("--out", type=Path, default=Path("docs/perf/moe.json"))
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--max-model-len", type=int, default=32768)
    parser.add_argument("--gpu-memory-gb", type=float, help="plan KV as if the card had this much")
    args = parser.parse_args()
    random.seed(0)
    bandwidth, flops = copy_bandwidth(torch.device("cuda")), matmul_flops(torch.device("cuda"))
    dense = measure(args.dense, bandwidth, flops, args)
    moe = measure(args.moe, bandwidth, flops, args)
    report = {
        "model_type": "qwen3_moe",
        "device": torch.cuda.get_device_name(),
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "matmul_tflops": round(flops / 1e12, 1),
        "decode_step_ms": moe["decode_step_ms"],
        "bytes_floor_fraction": moe["bytes_floor_fraction"],
        "experts_touched_per_layer": moe["experts_touched"],
        "dense_decode_step_ms_batch1": dense["decode_step_ms"]["1"],
        "batch1_step_vs_dense": round(moe["decode_step_ms"]["1"] / dense["decode_step_ms"]["1"], 2),
        "scoring_prompts_per_s": moe["scoring"]["prompts_per_s"],
        "dense_scoring_prompts_per_s": dense["scoring"]["prompts_per_s"],
        "scoring_vs_dense": round(
            moe["scoring"]["prompts_per_s"] / dense["scoring"]["prompts_per_s"], 2
        ),
        "startup_s": moe["startup_s"],
        "moe": moe,
        "dense": dense,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for key, value in report.items():
        if key not in ("moe", "dense"):
            print(f"{key:30} {value}")


if __name__ == "__main__":
    main()
