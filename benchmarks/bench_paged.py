"""The paged KV cache's own measurements in one GPU run, as ratios from that run.

    python -m benchmarks.bench_paged --config vendor/configs/qwen3-30b-a3b-instruct-2507 \
        --gpu-memory-gb 79 --out docs/perf/paged-extra-h200.json

1. The prefix cache on the dev set's distinct prompts, shaped as each profile sends them to the
   model (solved graphs send nothing): the share of prompt tokens found cached, all prompts at
   once and in requests of 4 prompts one after another (the course sends about 3 a request).
2. MCQ scoring prompts/s with the cache against without it, alternating in rounds, both ways.
3. A 32k-token prompt arriving while 200 short rows decode: the longest pause of their decode,
   with the default prefill budget (the chunk size) and a quarter of it.
4. n = 4 against n = 1: a 300-token prompt, 256 sampled tokens, nothing else running.
5. The decode-row cap: the mixed load of bench 1 with 256 rows at most, then 512.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

import shortcuts
from benchmarks.bench import measure, mixed_requests
from benchmarks.yardsticks import copy_bandwidth
from replica.engine.engine import Engine
from replica.engine.request import EngineRequest
from replica.loading.source import VENDORED_CONFIGS, resolve
from replica.startup import load_engine
from replica.tokenization import PromptCodec
from replica.wire.messages import SamplingParams
from replica.wire.spec import EngineConfig
from shortcuts.data import GOLD, read_jsonl

PROFILES = ("throughput", "accuracy")
REQUEST_PROMPTS = 4
ROUNDS = 5


def shaped_prompts(codec: PromptCodec, profile: str) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of what the model prefills for each distinct dev prompt: all of them, and
    the MCQ prompts the profile scores."""
    every, scored = [], []
    for row in read_jsonl(GOLD):
        plan = shortcuts.plan(row["prompt"], profile)
        if isinstance(plan, shortcuts.Score):
            scored.append(codec.encode_chat(plan.messages, plan.prefix))
            every.append(scored[-1])
        elif isinstance(plan, shortcuts.Generate):
            every.append(codec.encode_chat(plan.messages))
    return every, scored


def prefill_only(engine: Engine, prompts: list[list[int]], per_request: int | None) -> float:
    """Wall seconds to prefill `prompts` as scoring requests, all queued at once (None) or
    `per_request` at a time, each group done before the next arrives."""
    groups = [prompts] if per_request is None else _groups(prompts, per_request)
    start = time.perf_counter()
    for group in groups:
        for i, prompt in enumerate(group):
            engine.add(EngineRequest(i, prompt, choice_ids=[0]))
        while engine.has_work():
            engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _groups(prompts: list[list[int]], size: int) -> list[list[list[int]]]:
    return [prompts[i : i + size] for i in range(0, len(prompts), size)]


def hit_rate(engine: Engine, prompts: list[list[int]], per_request: int | None) -> float:
    engine.clear_prefix_cache()
    prefill_only(engine, prompts, per_request)
    usage = engine.kv_usage()
    return round(usage.prompt_tokens_cached / usage.prompt_tokens, 3)


def scoring_with_and_without_cache(
    engine: Engine, prompts: list[list[int]], per_request: int | None
) -> dict:
    """Prompts/s, cached against uncached, alternating so drift hits both alike; each round
    starts from an empty cache, so only what the round itself computed is shared."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(ROUNDS):
        for caching in (True, False):
            engine.set_policy(replace(engine.config, prefix_caching=caching))
            engine.clear_prefix_cache()
            rates[caching].append(len(prompts) / prefill_only(engine, prompts, per_request))
    engine.set_policy(replace(engine.config, prefix_caching=True))
    engine.clear_prefix_cache()
    cached, uncached = (statistics.median(rates[c]) for c in (True, False))
    return {
        "prompts": len(prompts),
        "cached_prompts_per_s": round(cached, 1),
        "uncached_prompts_per_s": round(uncached, 1),
        "ratio": round(cached / uncached, 3),
    }


def long_prompt_among_rows(engine: Engine, rows: int, long_tokens: int) -> dict:
    """`rows` short requests decode; a `long_tokens` prompt arrives; every gap between two of
    their decode steps is timed until the long one has its answer. From an empty cache, so a
    rerun computes its prompts again."""
    engine.clear_prefix_cache()
    vocab = engine.model.config.vocab_size
    gen = torch.Generator().manual_seed(7)
    for i in range(rows):
        engine.add(EngineRequest(i, torch.randint(0, vocab, (100,), generator=gen).tolist(), 8192))
    while len(engine.scheduler.running) < rows or engine.stats.decode_steps < 10:
        engine.step()
    long_id = rows
    prompt = torch.randint(0, vocab, (long_tokens,), generator=gen).tolist()
    steps, last_decode, gaps = engine.stats.decode_steps, time.perf_counter(), []
    arrived = last_decode
    engine.add(EngineRequest(long_id, prompt, 16))
    answer = None
    while answer is None:
        results = engine.step()
        answer = next((r for r in results if r.id == long_id), None)
        if engine.stats.decode_steps > steps:  # a decode step of the short rows
            now = time.perf_counter()
            gaps.append(now - last_decode)
            steps, last_decode = engine.stats.decode_steps, now
    served_s = time.perf_counter() - arrived
    for i in range(rows):
        engine.cancel(i)
    return {
        "rows": rows,
        "long_prompt_tokens": long_tokens if len(answer.output_ids) == 16 else 0,
        "prefill_chunk_tokens": engine.config.prefill_tokens,
        "max_decode_gap_ms": round(1e3 * max(gaps), 1),
        "median_decode_gap_ms": round(1e3 * statistics.median(gaps), 1),
        "long_prompt_answered_s": round(served_s, 2),
    }


def samples_wall(engine: Engine, n: int, prompt: list[int]) -> float:
    sampling = SamplingParams(temperature=1.0, seed=1)
    engine.add(EngineRequest(0, prompt, 256, sampling=sampling, n=n))
    start = time.perf_counter()
    while engine.has_work():
        engine.step()
    return time.perf_counter() - start


def n4_against_n1(engine: Engine) -> dict:
    prompt = list(range(1000, 1300))
    walls: dict[int, list[float]] = {1: [], 4: []}
    for _ in range(ROUNDS):
        for n in (1, 4):
            walls[n].append(samples_wall(engine, n, prompt))
    one, four = (statistics.median(walls[n]) for n in (1, 4))
    return {"n1_s": round(one, 3), "n4_s": round(four, 3), "n4_vs_n1": round(four / one, 3)}


def row_cap(make_engine: Callable[[int], Engine], bandwidth: float, requests: int) -> dict:
    """Bench 1's mixed load at each cap, and the preemptions the pool forced."""
    report = {}
    for cap in (256, 512):
        engine = make_engine(cap)
        vocab = engine.model.config.vocab_size
        run = measure(engine, mixed_requests(requests, vocab, seed=2), bandwidth)
        run["preemptions"] = engine.scheduler.preemptions
        run["kv_tokens"] = engine.cache.shape.tokens
        report[str(cap)] = run
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(VENDORED_CONFIGS / "qwen3-30b-a3b-instruct-2507"))
    parser.add_argument("--out", type=Path, default=Path("docs/perf/paged-extra.json"))
    parser.add_argument("--gpu-memory-gb", type=float)
    parser.add_argument("--long-tokens", type=int, default=32000)
    parser.add_argument("--mixed-requests", type=int, default=384)
    args = parser.parse_args()

    source = resolve(args.config, random_weights=True)
    codec = PromptCodec(source.tokenizer_dir)
    report: dict = {"device": torch.cuda.get_device_name(), "config": args.config}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report), flush=True)

    def make_engine(max_batch: int) -> Engine:
        config = EngineConfig(gpu_memory_gb=args.gpu_memory_gb, max_batch=max_batch)
        return load_engine(source, config, "cuda", eos_ids=())

    engine = make_engine(256)
    report["engine"] = engine.info
    shaped = {profile: shaped_prompts(codec, profile) for profile in PROFILES}
    report["prefix_hit_rate"] = {
        profile: {
            "prompts": len(every),
            "all_at_once": hit_rate(engine, every, None),
            f"requests_of_{REQUEST_PROMPTS}": hit_rate(engine, every, REQUEST_PROMPTS),
        }
        for profile, (every, _) in shaped.items()
    }
    save()
    scored = shaped["throughput"][1]
    report["scoring_cached_vs_uncached"] = {
        "all_at_once": scoring_with_and_without_cache(engine, scored, None),
        f"requests_of_{REQUEST_PROMPTS}": scoring_with_and_without_cache(
            engine, scored, REQUEST_PROMPTS
        ),
    }
    save()
    default = engine.config
    report["long_prompt"] = []
    for budget in (default.prefill_tokens, default.prefill_tokens // 4):
        engine.set_policy(replace(default, prefill_tokens=budget))
        report["long_prompt"].append(long_prompt_among_rows(engine, 200, args.long_tokens))
        save()
    engine.set_policy(default)
    report["n_samples"] = n4_against_n1(engine)
    save()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    report["row_cap"] = row_cap(
        make_engine, copy_bandwidth(torch.device("cuda")), args.mixed_requests
    )
    save()


if __name__ == "__main__":
    main()
