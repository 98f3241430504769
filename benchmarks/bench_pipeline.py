"""Two pipeline stages on one GPU against one stage: the same tokens, and what the split costs.

    python -m benchmarks.bench_pipeline --out $OUT --gpu-memory-gb 79   # one H100/H200, < 6 min
    python -m benchmarks.bench_pipeline --smoke --out /tmp/pipeline.json  # tiny models, CPU
    python -m benchmarks.bench_pipeline --out $OUT --with-235b   # on an H200: the 4-bit 235B too

Random weights of the real shapes (Qwen3-4B dense, Qwen3-30B-A3B MoE), each built three times in
turn: one stage, two stages on GPU 0 without micro-batches, and two stages with two micro-batches.
For each: greedy tokens of the same prompts (equal to one stage's?), and the graph-replayed decode
step at 1 and 64 rows of 500 live tokens (bench_moe.step_ms). Two stages on one GPU run one after
the other, so their step over one stage's is the hand-off's cost alone (the issue's bound: 1.15);
micro-batches there cost the smaller batches' efficiency (their gain needs two GPUs). Writes
`pipeline-<device>.json` under --out (a directory) or to --out (a .json path). `--with-235b`
adds Qwen3-235B-A22B with random 4-bit weights as two stages on the one GPU (141 GB: an H200);
`--half-235b` measures one stage's share of it alone on an 80 GB card (an H100: no H200 lent);
`--spread-routing` routes the 235B's tokens as a trained model would, about (its random router
sends a batch to a few experts: benchmarks.bench_moe.spread_routing);
`--models ""` skips the 4B and the 30B.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import random
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.bench_moe import spread_routing, step_floor_bytes, step_ms
from benchmarks.yardsticks import copy_bandwidth
from replica.engine.engine import Engine
from replica.engine.request import EngineRequest
from replica.loading.source import VENDORED_CONFIGS, ModelSource, resolve
from replica.startup import load_engine
from replica.wire.spec import EngineConfig

VARIANTS = {  # name -> (stages, micro-batches)
    "one_stage": (1, 1),
    "two_stages": (2, 1),
    "two_stages_micro_batched": (2, 2),
}
MODELS = {
    "dense": VENDORED_CONFIGS / "qwen3-4b",
    "moe": VENDORED_CONFIGS / "qwen3-30b-a3b-instruct-2507",
}
BIG = VENDORED_CONFIGS / "qwen3-235b-a22b-instruct-2507"
BIG_ROWS = (1, 8, 64)


def smoke_source(kind: str) -> ModelSource:
    """A tiny model of the kind, for the CPU smoke run: tiny-random, or the 30B's config shrunk."""
    if kind == "dense":
        return resolve("tiny-random")
    source = resolve(str(MODELS["moe"]), random_weights=True)
    config = source.config.__class__(**source.config.to_dict())
    small = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8, "head_dim": 16}
    small |= {"num_key_value_heads": 2, "num_experts": 8, "moe_intermediate_size": 128}
    for name, value in small.items():
        setattr(config, name, value)
    return replace(source, config=config)


def generate(engine: Engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations of `prompts`, all queued at once."""
    for i, prompt in enumerate(prompts):
        engine.add(EngineRequest(i, prompt, new_tokens))
    outputs: dict[int, list[int]] = {}
    while engine.has_work():
        for result in engine.step():
            outputs[result.id] = result.output_ids
    return [outputs[i] for i in range(len(prompts))]


def measure(source: ModelSource, args: argparse.Namespace) -> dict:
    """Each variant's tokens and decode steps, one engine at a time (a 30B fits once)."""
    rng = random.Random(1)
    vocab = source.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(20, 300))] for _ in range(8)]
    device = "cpu" if args.smoke else "cuda"
    result: dict = {}
    for name, (stages, micro_batches) in VARIANTS.items():
        config = EngineConfig(
            max_batch=max(args.rows),
            max_model_len=1024,
            gpu_memory_gb=args.gpu_memory_gb,
            pipeline_parallel_size=stages,
            micro_batches=micro_batches,
        )
        engine = load_engine(source, config, device, eos_ids=())
        tokens = generate(engine, prompts, args.new_tokens)
        result[name] = {
            "tokens": tokens,
            "step_ms": {str(n): round(step_ms(engine, n, seed=n), 3) for n in args.rows},
            "startup_s": engine.info["startup_s"],
            "stages": engine.info["stages"],
        }
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def big_steps(engine: Engine, device: str) -> dict:
    """Decode steps at BIG_ROWS: ms, the experts a layer they touched (random routers spread
    pairs less evenly than trained ones) and the bytes floor's fraction (benchmarks.bench_moe:
    the experts touched, as counted by the step's last replay, over the measured copy
    bandwidth). The CPU's expert loop counts no experts: ms alone there."""
    bandwidth = copy_bandwidth(torch.device(device), gib=0.5) if device == "cuda" else None
    result: dict = {"step_ms": {}, "experts_touched": {}, "floor_fraction": {}}
    for n in BIG_ROWS:
        ms = step_ms(engine, n, seed=n)
        result["step_ms"][str(n)] = round(ms, 3)
        if bandwidth is not None:
            floor_bytes, touched = step_floor_bytes(engine, n)
            result["experts_touched"][str(n)] = round(touched, 1)
            result["floor_fraction"][str(n)] = round(1e3 * floor_bytes / bandwidth / ms, 3)
        print(f"rows {n}: {ms:.3f} ms a step", flush=True)  # a run cut short still tells
    return result


def measure_big(source: ModelSource, device: str) -> dict:
    """The 235B, random 4-bit weights, as two stages on one GPU (an H200 holds it): start-up,
    decode steps, and the rows of 1,000 tokens its KV holds (the A100 pair's plan:
    `DEPLOY_QUANTIZE=int4 ./deploy.sh 3 --model Qwen/Qwen3-235B-A22B-Instruct-2507 --dry-run`)."""
    config = EngineConfig(
        max_batch=max(BIG_ROWS),
        max_model_len=1024,
        kv_fraction=0.75,  # the card is full: leave the warm-up's prefill room beside the pool
        quantize="int4",
        pipeline_parallel_size=2,
    )
    engine = load_engine(source, config, device, eos_ids=())
    print(f"235B as two stages: started in {engine.info['startup_s']} s", flush=True)
    return {
        "startup_s_235b": engine.info["startup_s"],
        **{f"{key}_235b": value for key, value in big_steps(engine, device).items()},
        "rows_of_1000_tokens_235b": engine.info["kv_tokens"] // 1000,
        "engine_235b": engine.info,
    }


def measure_half_big(source: ModelSource, device: str, gpu_memory_gb: float | None) -> dict:
    """Where no H200 is lent: one stage's share of the 235B on one 80 GB card, as a model of its
    first 47 layers with the embedding and the LM head (a real stage has one of the two, 1.2 GiB
    less). Two stages without micro-batches take about twice its step."""
    config = source.config.__class__(**source.config.to_dict())
    config.num_hidden_layers = (config.num_hidden_layers + 1) // 2
    engine_config = EngineConfig(
        max_batch=max(BIG_ROWS), max_model_len=1024, gpu_memory_gb=gpu_memory_gb, quantize="int4"
    )
    engine = load_engine(replace(source, config=config), engine_config, device, eos_ids=())
    return {
        "layers_235b_half": config.num_hidden_layers,
        "weights_gib_235b_half": engine.info["weights_gib"],
        "startup_s_235b_half": engine.info["startup_s"],
        **{f"{key}_235b_half": value for key, value in big_steps(engine, device).items()},
        "rows_of_1000_tokens_235b_half": engine.info["kv_tokens"] // 1000,
    }


def measure_235b(args: argparse.Namespace) -> dict:
    """--with-235b and --half-235b (a tiny MoE on the CPU smoke run)."""
    big = smoke_source("moe") if args.smoke else resolve(str(BIG), random_weights=True)
    where = "cpu" if args.smoke else "cuda"
    with spread_routing(args.spread_routing) as routing:
        report = {"routing_235b": routing}
        if args.with_235b:
            report |= measure_big(big, where)
        if args.half_235b:
            report |= measure_half_big(big, where, args.gpu_memory_gb)
    return report


def summarize(runs: dict[str, dict], device: str, rows: list[int]) -> dict:
    """The JSON's headline keys (the dense model's ratios, the MoE's beside them)."""

    def ratio(kind: str, variant: str, rows: int) -> float:
        step = runs[kind][variant]["step_ms"][str(rows)]
        return round(step / runs[kind]["one_stage"]["step_ms"][str(rows)], 3)

    def equal(kind: str, variant: str) -> bool:
        return runs[kind][variant]["tokens"] == runs[kind]["one_stage"]["tokens"]

    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device,
        "tokens_equal": {kind: equal(kind, "two_stages") for kind in runs},
        "tokens_equal_micro_batched": {
            kind: equal(kind, "two_stages_micro_batched") for kind in runs
        },
    }
    for kind in runs:
        suffix = "" if kind == "dense" else f"_{kind}"
        for variant, key in (("two_stages", ""), ("two_stages_micro_batched", "_micro_batched")):
            report[f"step_ratio_two_stages_one_gpu{key}{suffix}"] = {
                str(n): ratio(kind, variant, n) for n in rows
            }
    for run in runs.values():
        for variant in run.values():
            variant.pop("tokens")
    return {**report, "runs": runs}


def out_path(out: Path, device: str) -> Path:
    if out.suffix == ".json":
        return out
    return out / f"pipeline-{device.lower().replace(' ', '-')}.json"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/perf"))
    parser.add_argument("--gpu-memory-gb", type=float, help="plan KV as if the card had this much")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--rows", type=lambda text: [int(n) for n in text.split(",")], default=[1, 64]
    )
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU")
    parser.add_argument(
        "--models",
        type=lambda text: text.split(","),
        default=list(MODELS),
        help="which of dense,moe to measure",
    )
    parser.add_argument(
        "--with-235b", action="store_true", help="then the 4-bit 235B as two stages (an H200)"
    )
    parser.add_argument(
        "--half-235b", action="store_true", help="then one stage's share of it (an 80 GB card)"
    )
    parser.add_argument(
        "--spread-routing",
        action="store_true",
        help="the 235B routes as a trained model would, about (bench_moe.spread_routing)",
    )
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else torch.cuda.get_device_name()
    sources = {
        kind: smoke_source(kind) if args.smoke else resolve(str(path), random_weights=True)
        for kind, path in MODELS.items()
        if kind in args.models
    }
    runs = {kind: measure(source, args) for kind, source in sources.items()}
    report = summarize(runs, device, args.rows)
    if args.with_235b or args.half_235b:
        report |= measure_235b(args)
    path = out_path(args.out, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    for key, value in report.items():
        if key not in ("runs", "engine_235b"):
            print(f"{key:48} {value}")
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
