"""Where a prefill and a decode step spend their GPU time, kernel by kernel (torch.profiler).

    python -m benchmarks.profile [--tokens 16384] [--rows 64] [--quantize int4] [--config C]

Random Qwen3-4B weights (or `--config`'s; `--quantize int4`: 4-bit). Prints the kernels that
take the most GPU time in one packed prefill of `--tokens` prompt tokens (prompts of 100 to 600
tokens, the scoring path; 0: none) and in one eager decode step at `--rows` rows (the same
kernels a CUDA graph replays, plus their launch gaps). An MoE routes as its random router does
(benchmarks.bench_moe.spread_routing spreads it with `--spread-routing`).
"""

from __future__ import annotations

import argparse
import random

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_moe import spread_routing
from benchmarks.decode_parts import synthetic_rows
from replica.engine.request import EngineRequest
from replica.loading.source import VENDORED_CONFIGS, resolve
from replica.startup import load_engine
from replica.wire.spec import EngineConfig


def scoring_requests(tokens: int, vocab: int) -> list[EngineRequest]:
    rng = random.Random(0)
    requests, total = [], 0
    while total < tokens:
        n = min(rng.randint(100, 600), tokens - total)
        requests.append(EngineRequest(len(requests), [rng.randrange(vocab)] * n, 1, [32, 33]))
        total += n
    return requests


def top_kernels(run, label: str, rows: int = 15) -> None:
    run()  # warm-up: Triton compiles, cuBLAS picks algorithms
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        run()
        torch.cuda.synchronize()
    print(f"== {label}")
    print(
        prof.key_averages().table(
            sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(VENDORED_CONFIGS / "qwen3-4b-instruct-2507"))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--quantize", choices=["int4"], help="random weights packed to 4 bits")
    parser.add_argument("--spread-routing", action="store_true", help="an MoE's, spread")
    args = parser.parse_args()
    with spread_routing(args.spread_routing):
        profile_engine(args)


def profile_engine(args: argparse.Namespace) -> None:
    source = resolve(args.config, random_weights=True)
    config = EngineConfig(
        max_batch=256, max_model_len=2048, cuda_graphs=False, quantize=args.quantize
    )
    engine = load_engine(source, config, "cuda", ())
    requests = scoring_requests(args.tokens, source.config.vocab_size)

    def prefill() -> None:
        for request in requests:
            engine.add(request)
        while engine.has_work():
            engine.step()

    if requests:
        top_kernels(prefill, f"prefill of {args.tokens} tokens in {len(requests)} prompts")
    rows = args.rows
    decode, _ = synthetic_rows(engine, rows, 428)
    # eager (cuda_graphs off): the profiler sees each kernel
    top_kernels(lambda: engine.runner.decode_rows(decode), f"decode step, {rows} rows", 25)


if __name__ == "__main__":
    main()
