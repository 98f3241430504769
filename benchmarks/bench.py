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
from functools import partial
from pathlib import Path

import torch

from replica.engine.engine import Engine, EngineStats
from replica.engine.kv_cache import bytes_per_token
from replica.engine.model_runner import DecodeRows
from replica.engine.request import EngineRequest
from replica.kernels.decode_attention import WAVES, decode_attention
from replica.loading.source import VENDORED_CONFIGS, resolve
from replica.wire.messages import SamplingParams


def copy_bandwidth(device: torch.device, gib: float = 2.0) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(23):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    median = sorted(times[3:])[len(times[3:]) // 2]
    return 2 * src.numel() * src.element_size() / median


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
    engine.stats = EngineStats()
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


def matmul_flops(device: torch.device, n: int = 8192) -> float:
    """FLOP/s of a large bf16 matrix multiply: the compute yardstick for prefill."""
    a, b = torch.randn(2, n, n, dtype=torch.bfloat16, device=device)
    return 2 * n**3 / (_time_ms(lambda: a @ b, repeats=20) / 1e3)


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
    tokens_before, calls_before = engine.stats.prefill_tokens, engine.stats.prefill_calls
    wall, _ = run_requests(engine, requests)
    model, tokens = engine.model, engine.stats.prefill_tokens - tokens_before
    floor_s = 2 * (model.active_params() * tokens + model.lm_head.numel() * count) / flops
    return {
        "requests": count,
        "prompt_tokens": tokens,
        "wall_s": round(wall, 2),
        "prompts_per_s": round(count / wall, 1),
        "prefill_tok_s": round(tokens / wall),
        "prefill_calls": engine.stats.prefill_calls - calls_before,
        "compute_floor_fraction": round(floor_s / wall, 3),
    }


def _time_ms(fn, repeats: int = 10) -> float:
    fn()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / repeats


def synthetic_rows(engine: Engine, rows: int, live: int) -> tuple[DecodeRows, list[int]]:
    """`rows` decode rows of `live` tokens each, in blocks taken from the engine's pool (the
    caller gives them back), as a decode step reads them."""
    size = engine.blocks.block_size
    per_row = -(-live // size)
    held = engine.blocks.take(rows * per_row)
    decode = DecodeRows()
    for row in range(rows):
        blocks = held[row * per_row : (row + 1) * per_row]
        decode.tokens.append(1)
        decode.positions.append(live - 1)
        decode.row_ids.append(row)
        decode.slots.append(blocks[(live - 1) // size] * size + (live - 1) % size)
        decode.table_entries += [(row, j, block) for j, block in enumerate(blocks)]
    return decode, held


def _attention_ms(engine: Engine, rows: int, live: int, waves: int) -> float:
    """The decode attention of every layer, captured as one CUDA graph (no launch gaps)."""
    model, cache, inputs = engine.model, engine.cache, engine.runner.inputs
    decode, held = synthetic_rows(engine, rows, live)
    inputs.set(decode, rows)
    row_ids = torch.arange(rows, device="cuda")
    lens = torch.full((rows,), live, dtype=torch.int32, device="cuda")
    q = torch.randn(rows, model.num_heads, model.head_dim, device="cuda").to(model.dtype)
    paged = (inputs.tables, row_ids, lens)
    for layer in range(len(model.layers)):  # warm-up: compiles for this split count
        decode_attention(q, cache.layer(layer), *paged, waves)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(len(model.layers)):
            decode_attention(q, cache.layer(layer), *paged, waves)
    ms = _time_ms(graph.replay)
    engine.blocks.release(held)
    return ms


def attention_sweep(engine: Engine, bandwidth: float) -> list[dict]:
    """Decode attention at several split counts (programs per multiprocessor)."""
    results = []
    for rows, live in ((64, 428), (min(256, engine.max_rows), 843)):
        kv_bytes = rows * live * bytes_per_token(engine.model.config, engine.model.dtype)
        for waves in (2, 4, 8, 16):
            ms = _attention_ms(engine, rows, live, waves)
            floor = round(1e3 * kv_bytes / bandwidth / ms, 3)
            results.append({"rows": rows, "waves": waves, "ms": round(ms, 3), "floor": floor})
    return results


def decode_profile(engine: Engine, rows: int, live: int, bandwidth: float) -> dict:
    """Where one decode step's time goes: the whole step's graph against its attention alone,
    at `rows` rows of `live` tokens each, each part against its byte floor."""
    runner = engine.runner
    decode, held = synthetic_rows(engine, rows, live)
    runner.decode(decode)
    step_ms = _time_ms(lambda: runner.step(rows))
    engine.blocks.release(held)
    attention_ms = _attention_ms(engine, rows, live, WAVES)
    kv_ms = 1e3 * rows * live * bytes_per_token(engine.model.config, engine.model.dtype) / bandwidth
    weights_ms = 1e3 * engine.model.weight_bytes() / bandwidth
    return {
        "rows": rows,
        "live_tokens": live,
        "step_ms": round(step_ms, 2),
        "floor_ms": round(weights_ms + kv_ms, 2),
        "attention_ms": round(attention_ms, 2),
        "attention_floor_fraction": round(kv_ms / attention_ms, 3),
        "rest_ms": round(step_ms - attention_ms, 2),
        "rest_floor_fraction": round(weights_ms / (step_ms - attention_ms), 3),
    }


SAMPLING_SETTINGS = {
    "top_k 50, top_p 0.95": SamplingParams(1.0, 0.95, 50),
    "top_p 0.9": SamplingParams(1.0, 0.9),
    "temperature only": SamplingParams(0.7),
}


def sampling_cost(engine: Engine, live: int = 500, rounds: int = 3) -> list[dict]:
    """The decode step at 64 and 256 rows (or as many as the card holds) with every row sampling
    (each setting of SAMPLING_SETTINGS, every row its own seed) against the same step all greedy:
    graph replays of the same inputs, the variants alternating over `rounds`, median of each."""
    runner, results = engine.runner, []
    for rows in sorted({min(64, engine.max_rows), min(256, engine.max_rows)}):
        decode, held = synthetic_rows(engine, rows, live)
        times: dict[str, list[float]] = {"greedy": []}
        for _ in range(rounds):
            runner.decode(decode)
            times["greedy"].append(_time_ms(partial(runner.step, rows), repeats=50))
            for name, params in SAMPLING_SETTINGS.items():
                runner.decode(decode, [replace(params, seed=i) for i in range(rows)])
                sampled_ms = _time_ms(partial(runner.step, rows, True), repeats=50)
                times.setdefault(name, []).append(sampled_ms)
        engine.blocks.release(held)
        median = {name: sorted(ms)[len(ms) // 2] for name, ms in times.items()}
        greedy_ms = median.pop("greedy")
        for name, sampled_ms in median.items():
            results.append(
                {
                    "rows": rows,
                    "setting": name,
                    "greedy_ms": round(greedy_ms, 3),
                    "sampled_ms": round(sampled_ms, 3),
                    "overhead": round(sampled_ms / greedy_ms - 1, 4),
                }
            )
    return results


def mixed_requests(count: int, vocab: int, seed: int) -> list[EngineRequest]:
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(100, 1024))]
        requests.append(EngineRequest(i, prompt, rng.randint(100, 1024)))
    return requests


def main() -> None:
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
    args = parser.parse_args()

    device = torch.device("cuda")
    source = resolve(args.config, random_weights=True)
    vocab = source.config.vocab_size
    report: dict = {"device": torch.cuda.get_device_name(device), "config": args.config}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report), flush=True)

    bandwidth = copy_bandwidth(device)
    report["copy_bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
    flops = matmul_flops(device)
    report["matmul_tflops"] = round(flops / 1e12, 1)

    rng = random.Random(1)
    short = [[rng.randrange(vocab) for _ in range(300)] for _ in range(64)]
    if not args.skip_transformers:
        report["transformers_tok_s"] = round(transformers_tok_s(source, short, 256), 1)
        save()

    torch.cuda.synchronize()
    engine = Engine(
        source,
        "cuda",
        eos_ids=(),  # forced lengths: every request runs to its cap
        kv_fraction=args.kv_fraction,
        max_batch=args.max_batch,
        max_model_len=args.max_model_len,
    )
    report["engine"] = engine.info
    report["startup_s"] = engine.info["startup_s"]
    if args.sampling_only:
        report["sampling_cost"] = sampling_cost(engine)
        save()
        return

    batch64 = measure(engine, [EngineRequest(i, p, 256) for i, p in enumerate(short)], bandwidth)
    report["bench2_64x300x256"] = batch64
    if "transformers_tok_s" in report:
        report["speedup_vs_transformers"] = round(
            batch64["output_tok_s"] / report["transformers_tok_s"], 2
        )
    save()

    mixed = mixed_requests(args.requests, vocab, seed=2)
    refill = measure(engine, mixed, bandwidth)
    report["bench1_refill"] = refill
    report["output_tok_s"] = refill["output_tok_s"]
    report["bandwidth_floor_fraction"] = refill["bandwidth_floor_fraction"]
    save()

    report["bench5_scoring"] = scoring(engine, args.requests, vocab, flops)
    save()

    report["sampling_cost"] = sampling_cost(engine)
    save()

    report["attention_sweep"] = attention_sweep(engine, bandwidth)
    report["decode_profile"] = [
        decode_profile(engine, min(rows, engine.max_rows), live, bandwidth)
        for rows, live in ((64, 428), (256, 843))
    ]
    save()

    engine.refill = False
    static = measure(engine, mixed, bandwidth)
    report["bench3_static"] = static
    report["refill_vs_static"] = round(refill["output_tok_s"] / static["output_tok_s"], 2)
    save()

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
