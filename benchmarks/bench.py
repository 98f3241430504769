"""The dense engine's measurements in one GPU run, reported as ratios from that run.

    python -m benchmarks.bench --out docs/perf/engine-h200.json

1. 1024 requests, at most 256 in flight, input and output lengths uniform in [100, 1024],
   forced lengths: output tokens/s and the fraction of the memory-bandwidth floor.
2. 64 requests, 300-token prompts, 256 new tokens: our engine against transformers `generate`.
3. Benchmark 1 with refill off (static batching): the refill/static ratio.
4. Start-up: weights, KV allocation, graph capture and the prefill warm-up.
5. Scoring (the MCQ path): 1024 prefill-only requests of 100 to 600 tokens, against a compute
   floor at the matmul rate measured in this run.
6. Sampling: the decode step with every row sampling against the same step all greedy
   (`--sampling-only` measures just this).

The floor is the bytes each decode step must read (every weight once, plus the live K/V of its
rows), summed over the run, over a device-to-device copy bandwidth measured in this run.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.decode_parts import attention_sweep, decode_profile, sampling_cost
from benchmarks.yardsticks import copy_bandwidth, matmul_flops
from replica.engine.engine import Engine
from replica.engine.kv_cache import bytes_per_token
from replica.engine.request import EngineRequest
from replica.loading.source import VENDORED_CONFIGS, resolve
from replica.startup import load_engine
from replica.wire.spec import EngineConfig


def transformers_tok_s(source, prompts: list[list[int]], new_tokens: int) -> float:
    """The course starter's approach: transformers `generate`, bf16, one static batch."""
    from transformers import Qwen3ForCausalLM

    with torch.device("cuda"):
        model = Qwen3ForCausalLM._from_config(source.config, dtype=torch.bfloat16).eval()
    ids = torch.tensor(prompts, device="cuda")

    with torch.no_grad():
        for new in (4, new_tokens):  # the first is a warm-up: kernels load, cuBLAS tunes
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(
                ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
            )
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return len(prompts) * new_tokens / elapsed


def run_requests(engine: Engine, requests: list[EngineRequest]) -> tuple[float, int]:
    """Wall seconds to finish every request (all queued at once) and the tokens generated."""
    engine.reset_stats()
    for request in requests:
        engine.add(request)
    generated = 0
    start = time.perf_counter()
    while engine.has_work():
        for result in engine.step():
            generated += len(result.output_ids)
    return time.perf_counter() - start, generated


def measure(engine: Engine, requests: list[EngineRequest], bandwidth: float) -> dict:
    """Throughput, and the bandwidth floor over decode time (the floor's own steps) and wall."""
    wall, generated = run_requests(engine, requests)
    stats = engine.stats
    floor_bytes = (
        stats.decode_steps * engine.model.weight_bytes()
        + stats.decode_kv_tokens * bytes_per_token(engine.model.config, engine.model.dtype)
    )
    floor_s = floor_bytes / bandwidth
    return {
        "requests": len(requests),
        "output_tokens": generated,
        "wall_s": round(wall, 2),
        "output_tok_s": round(generated / wall, 1),
        "prefill_s": round(stats.prefill_s, 2),
        "prefill_calls": stats.prefill_calls,
        "prefill_tok_s": round(stats.prefill_tokens / max(stats.prefill_s, 1e-9)),
        "decode_s": round(stats.decode_s, 2),
        "decode_steps": stats.decode_steps,
        "mean_decode_rows": round(stats.decode_rows / max(stats.decode_steps, 1), 1),
        "ms_per_decode_step": round(1e3 * stats.decode_s / max(stats.decode_steps, 1), 2),
        "floor_s": round(floor_s, 2),
        "bandwidth_floor_fraction": round(floor_s / stats.decode_s, 3),
        "bandwidth_floor_fraction_wall": round(floor_s / wall, 3),
    }


def scoring(engine: Engine, count: int, vocab: int, flops: float, seed: int = 3) -> dict:
    """MCQ-like load: scoring requests only (prefill, no decode step), prompts of 100 to 600
    tokens. Compute floor: 2 FLOPs per weight a token multiplies in the layers (an MoE's routed
    experts only) per prompt token, plus the LM head once per prompt, at the measured matmul
    rate. Another `seed` draws other prompts (a warm-up that leaves nothing in the prefix cache)."""
    rng = random.Random(seed)
    requests = [
        EngineRequest(i, [rng.randrange(vocab) for _ in range(rng.randint(100, 600))], 1, [32, 33])
        for i in range(count)
    ]
    wall, _ = run_requests(engine, requests)  # resets the engine's counts first
    model, tokens = engine.model, engine.stats.prefill_tokens
    floor_s = 2 * (model.active_params() * tokens + model.lm_head.numel() * count) / flops
    return {
        "requests": count,
        "prompt_tokens": tokens,
        "wall_s": round(wall, 2),
        "prompts_per_s": round(count / wall, 1),
        "prefill_tok_s": round(tokens / wall),
        "prefill_calls": engine.stats.prefill_calls,
        "compute_floor_fraction": round(floor_s / wall, 3),
    }


def mixed_requests(count: int, vocab: int, seed: int) -> list[EngineRequest]:
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(100, 1024))]
        requests.append(EngineRequest(i, prompt, rng.randint(100, 1024)))
    return requests


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(VENDORED_CONFIGS / "qwen3-4b-instruct-2507"))
    parser.add_argument("--out", type=Path, default=Path("docs/perf/engine.json"))
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=32768)
    parser.add_argument("--kv-fraction", type=float, default=0.9)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument(
        "--sampling-only", action="store_true", help="build the engine, then only sampling_cost"
    )
    return parser.parse_args()


class Report(dict):
    """The run's results, written whole to `path` (and printed) after each part."""

    def __init__(self, path: Path, **fields) -> None:
        super().__init__(fields)
        self.path = path

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self, indent=2) + "\n")
        print(json.dumps(self), flush=True)


def main() -> None:
    args = parse_args()
    device = torch.device("cuda")
    source = resolve(args.config, random_weights=True)
    vocab = source.config.vocab_size
    report = Report(args.out, device=torch.cuda.get_device_name(device), config=args.config)
    bandwidth = copy_bandwidth(device)
    report["copy_bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
    flops = matmul_flops(device)
    report["matmul_tflops"] = round(flops / 1e12, 1)

    rng = random.Random(1)
    short = [[rng.randrange(vocab) for _ in range(300)] for _ in range(64)]
    if not args.skip_transformers:
        report["transformers_tok_s"] = round(transformers_tok_s(source, short, 256), 1)
        report.save()

    torch.cuda.synchronize()
    config = EngineConfig(
        kv_fraction=args.kv_fraction, max_batch=args.max_batch, max_model_len=args.max_model_len
    )
    engine = load_engine(source, config, "cuda", eos_ids=())  # forced lengths: runs to its cap
    report["engine"] = engine.info
    report["startup_s"] = engine.info["startup_s"]
    if args.sampling_only:
        report["sampling_cost"] = sampling_cost(engine)
        report.save()
        return
    throughput_runs(engine, report, short, mixed_requests(args.requests, vocab, seed=2), bandwidth)
    report["bench5_scoring"] = scoring(engine, args.requests, vocab, flops)
    report.save()
    report["sampling_cost"] = sampling_cost(engine)
    report.save()
    report["attention_sweep"] = attention_sweep(engine, bandwidth)
    report["decode_profile"] = [
        decode_profile(engine, min(rows, engine.max_rows), live, bandwidth)
        for rows, live in ((64, 428), (256, 843))
    ]
    report.save()
    engine.set_policy(replace(engine.config, refill=False))
    static = measure(engine, mixed_requests(args.requests, vocab, seed=2), bandwidth)
    report["bench3_static"] = static
    report["refill_vs_static"] = round(
        report["bench1_refill"]["output_tok_s"] / static["output_tok_s"], 2
    )
    report.save()
    print_summary(report)


def throughput_runs(
    engine: Engine,
    report: Report,
    short: list[list[int]],
    mixed: list[EngineRequest],
    bandwidth: float,
) -> None:
    """Bench 2 (64 short prompts, 256 tokens each), then bench 1 (the mixed requests)."""
    batch64 = measure(engine, [EngineRequest(i, p, 256) for i, p in enumerate(short)], bandwidth)
    report["bench2_64x300x256"] = batch64
    if "transformers_tok_s" in report:
        report["speedup_vs_transformers"] = round(
            batch64["output_tok_s"] / report["transformers_tok_s"], 2
        )
    report.save()
    refill = measure(engine, mixed, bandwidth)
    report["bench1_refill"] = refill
    report["output_tok_s"] = refill["output_tok_s"]
    report["bandwidth_floor_fraction"] = refill["bandwidth_floor_fraction"]
    report.save()


def print_summary(report: Report) -> None:
    print(f"{'measure':34} value")
    for key in (
        "device",
        "startup_s",
        "transformers_tok_s",
        "speedup_vs_transformers",
        "output_tok_s",
        "bandwidth_floor_fraction",
        "refill_vs_static",
    ):
        print(f"{key:34} {report.get(key)}")
    for name in ("bench2_64x300x256", "bench1_refill", "bench3_static"):
        run = report[name]
        print(
            f"{name:20} tok/s {run['output_tok_s']:>9} ms/step {run['ms_per_decode_step']:>6}"
            f" rows {run['mean_decode_rows']:>6} floor(decode) {run['bandwidth_floor_fraction']}"
            f" floor(wall) {run['bandwidth_floor_fraction_wall']} prefill_s {run['prefill_s']}"
            f" prefill tok/s {run['prefill_tok_s']}"
        )
    print("bench5_scoring", report["bench5_scoring"])
    print("sampling_cost", report["sampling_cost"])
    for entry in report["attention_sweep"] + report["decode_profile"]:
        print(entry)


if __name__ == "__main__":
    main()
