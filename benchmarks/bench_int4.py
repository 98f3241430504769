"""4-bit weights (w4a16) against bf16, side by side in one GPU run, random weights of the real
shapes.

    python -m benchmarks.bench_int4 --out $OUT/int4-h200.json [--skip-235b]

For Qwen3-4B and Qwen3-30B-A3B, bf16 then `--quantize int4`: the graph-replayed decode step at
1, 8 and 64 rows of 500 live tokens, its bytes floor (the bytes the step must read, packed words,
scales and zeros included, over a copy bandwidth measured in this run; bench_moe's count of the
experts the step touched), and MCQ scoring prompts/s. Then Qwen3-235B-A22B in int4 alone (its
bf16 weights do not fit one card): its weights, the same steps and scoring, and how many
1,000-token rows the KV pool of the rest of the card holds. `--gpu-memory-gb 79` plans KV as an
80 GB card would (the 30B's KV rows are where memory decides).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
from functools import partial
from pathlib import Path

import torch

from benchmarks.bench import scoring
from benchmarks.bench_moe import step_floor_bytes, step_ms
from benchmarks.yardsticks import copy_bandwidth, matmul_flops, time_ms
from replica.kernels.int4_dequantize import dequantized
from replica.kernels.int4_gemv import GemvTile, w4a16_gemv
from replica.kernels.int4_matmul import w4a16_tiled
from replica.kernels.launch import Tile
from replica.loading.source import VENDORED_CONFIGS, resolve
from replica.ops import tables
from replica.ops.feed_forward import TritonMoE
from replica.ops.mlp import SparseMoE
from replica.ops.packed import quantize, random_packed
from replica.startup import load_engine
from replica.wire.spec import EngineConfig

ROWS = (1, 8, 64)
ROW_TOKENS = 1000
CONFIGS = {
    "dense": "qwen3-4b-instruct-2507",
    "moe": "qwen3-30b-a3b-instruct-2507",
    "235b": "qwen3-235b-a22b-instruct-2507",
}


def measure(
    name: str, quantize: str | None, bandwidth: float, flops: float, args: argparse.Namespace
) -> dict:
    """One engine's decode steps, their floor fractions, scoring, weights and KV rows."""
    source = resolve(str(VENDORED_CONFIGS / CONFIGS[name]), random_weights=True)
    memory = None if name == "235b" else args.gpu_memory_gb
    # The 235B fills the card: leave its 16k-token prefill room beside the KV pool.
    kv_fraction = args.kv_fraction_235b if name == "235b" else 0.9
    config = EngineConfig(
        max_batch=max(ROWS),
        max_model_len=args.max_model_len,
        gpu_memory_gb=memory,
        kv_fraction=kv_fraction,
        quantize=quantize,
    )
    engine = load_engine(source, config, "cuda", eos_ids=())
    result: dict = {
        "weights_gib": round(engine.model.weight_bytes() / 2**30, 2),
        "startup_s": engine.info["startup_s"],
        "kv_tokens": engine.info["kv_tokens"],
        "rows_of_1000_tokens": engine.info["kv_tokens"] // ROW_TOKENS,
        "step_ms": {},
        "floor_fraction": {},
        "experts_touched": {},  # a layer, mean (0 for a dense model)
    }
    for rows in ROWS:
        ms = step_ms(engine, rows, seed=rows)
        floor_bytes, touched = step_floor_bytes(engine, rows)
        result["experts_touched"][str(rows)] = round(touched, 1)
        result["step_ms"][str(rows)] = round(ms, 3)
        result["floor_fraction"][str(rows)] = round(1e3 * floor_bytes / bandwidth / ms, 3)
    vocab = source.config.vocab_size
    if args.requests:  # 0: decode steps alone (a variant that changes no prefill path)
        result["scoring_cold"] = scoring(engine, args.requests, vocab, flops, seed=4)  # compiles
        result["scoring"] = scoring(engine, args.requests, vocab, flops)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return result


SWEEP_SHAPES = {  # (N, K) of the 4B's projections; gate_up runs gated (SiLU * up fused)
    "qkv": (6144, 2560),
    "o": (2560, 4096),
    "gate_up": (19456, 2560),
    "down": (2560, 9728),
}
SWEEP_TOKENS = (1, 2, 4, 8, 16)
PREFILL_TILE = Tile(128, 128, 64, 8, 3)  # the tile kernel beyond the table's tiles


def prefill_tile(tokens: int, group: int) -> Tile:
    """The tile kernel's tile at this many tokens: the table's where it names one."""
    choice = tables.int4_linear_table(group).choose(tokens)
    return choice.tile if isinstance(choice, tables.Tiled) else PREFILL_TILE


def sweep_gemv(tokens: int) -> list[GemvTile]:
    """GEMV tiles for this many tokens whose accumulators take 8 to 32 registers a thread
    (fewer leave too few loads in flight, more spill)."""
    return [
        GemvTile(cols, groups, warps, tokens)
        for cols in (8, 16, 32)
        for groups in (1, 2, 4, 8)
        for warps in (4, 8)
        if 8 <= tokens * cols * groups * 16 // (32 * warps) <= 32
    ]


SWEEP_MOE = {"30b": (128, 2048, 768, 8), "235b": (128, 4096, 1536, 8)}  # experts, hidden, inter, k


def graph_us(fn, calls: int = 20, replays: int = 10) -> float:
    """Microseconds a call inside a CUDA graph of `calls` calls: what a decode step pays,
    without the launch overhead eager timing adds."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()  # compile and allocate outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    return 1e3 * time_ms(graph.replay, repeats=replays) / calls


def _packed_bytes(packed) -> int:
    return sum(t.numel() * t.element_size() for t in packed.tensors())


def kernel_sweep(bandwidth: float) -> dict:
    """Each 4B projection in CUDA graphs: bf16 against the GEMV's tiles at 1-8 tokens and the
    16-row tile kernel, then the prefill paths (the tile kernel against the dequantized copy and
    the 16-bit GEMM); the fused experts of the 30B and the 235B by token count, GEMV against
    tiles. Microseconds a call, floors = packed bytes over the copy bandwidth."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    decode, prefill = [], []
    for shape, (n, k) in SWEEP_SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / k**0.5
        packed, gated = quantize(w), shape == "gate_up"
        floor = round(1e6 * _packed_bytes(packed) / bandwidth, 2)
        for tokens in SWEEP_TOKENS:
            x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            row = {"shape": shape, "tokens": tokens, "floor_us": floor}
            row["bf16"] = round(graph_us(lambda x=x, w=w: x @ w.t()), 2)
            row["tile16"] = round(
                graph_us(lambda x=x, p=packed: w4a16_tiled(x, p, tables.TILE_16)), 2
            )
            for t in sweep_gemv(tokens):
                name = f"n{t.features}g{t.groups}w{t.warps}"
                row[name] = round(graph_us(partial(w4a16_gemv, x, packed, t, gated=gated)), 2)
            decode.append(row)
            print(row, flush=True)
        for tokens in (16, 32, 64, 128, 256, 1024, 4096, 16384):
            x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            row = {"shape": shape, "tokens": tokens}
            row["bf16"] = round(1e3 * time_ms(lambda x=x, w=w: x @ w.t(), 20), 1)
            tile = prefill_tile(tokens, packed.group_size)
            row["tile"] = round(
                1e3 * time_ms(lambda x=x, p=packed, t=tile: w4a16_tiled(x, p, t), 20), 1
            )
            row["dequantized"] = round(1e3 * time_ms(
                lambda x=x, p=packed: x @ dequantized(p, torch.bfloat16).t(), 20), 1)  # fmt: skip
            prefill.append(row)
            print(row, flush=True)
        del w, packed
    return {"decode_us": decode, "prefill_us": prefill, "moe_us": _moe_sweep(gen, bandwidth)}


def _moe_sweep(gen: torch.Generator, bandwidth: float) -> list[dict]:
    rows, fused_moe = [], TritonMoE()
    for model, (experts, hidden, inter, top_k) in SWEEP_MOE.items():

        def randn(*shape):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)

        moe = SparseMoE(
            router=randn(experts, hidden),
            gate_up=random_packed((experts, 2 * inter, hidden), 0.02, torch.bfloat16, gen),
            down=random_packed((experts, hidden, inter), 0.02, torch.bfloat16, gen),
            top_k=top_k,
            norm_topk_prob=True,
        )
        for tokens in (1, 8, 16, 32, 64, 128):  # decode: in graphs
            x = randn(tokens, hidden)
            pairs = tokens * top_k
            row = {"model": model, "tokens": tokens, "pairs": pairs}
            row["default"] = round(graph_us(partial(fused_moe, x, moe, True)), 1)
            tiles = tables.MOE_16BIT.choose(pairs / experts)
            row["tiles"] = round(graph_us(partial(fused_moe.run, x, moe, tiles)), 1)
            if pairs <= experts:
                gemv = tables.MOE_NARROW_DECODE.choose(1)
                row["pairs"] = round(graph_us(partial(fused_moe.run, x, moe, gemv)), 1)
            bucket_tiles = sweep_gemv(pairs // experts) if pairs > experts else []
            for t in bucket_tiles:
                name = f"buckets_n{t.features}g{t.groups}w{t.warps}t{t.tokens}"
                buckets = tables.ExpertGemv(t, t, bucketed=True)
                row[name] = round(graph_us(partial(fused_moe.run, x, moe, buckets)), 1)
            touched = int((fused_moe.expert_counts(moe) > 0).sum())
            row["floor_us"] = round(
                1e6 * touched * _packed_bytes(moe.down) / experts * 3 / bandwidth, 1
            )
            rows.append(row)
            print(row, flush=True)
        for tokens in (128, 512, 2048, 8192):  # prefill: eager
            x = randn(tokens, hidden)
            row = {"model": model, "tokens": tokens, "pairs": tokens * top_k}
            tiles = tables.MOE_16BIT.choose(tokens * top_k / experts)
            for path, dequantize in (("tiles", False), ("dequantized", True)):
                choice = tables.ExpertTiles(tiles.up, tiles.down, dequantize)
                call = partial(fused_moe.run, x, moe, choice)
                row[path] = round(1e3 * time_ms(call, 10), 1)
            rows.append(row)
            print(row, flush=True)
        del moe
    return rows


def ratios(bf16: dict, int4: dict, prefix: str) -> dict:
    """The issue's keys: int4 / bf16 step times, both floors, the scoring ratio (where both
    scored)."""
    found = {
        f"{prefix}_step_ratio": {
            rows: round(int4["step_ms"][rows] / bf16["step_ms"][rows], 3)
            for rows in bf16["step_ms"]
        },
        f"{prefix}_floor_fraction_bf16": bf16["floor_fraction"],
        f"{prefix}_floor_fraction_int4": int4["floor_fraction"],
        f"{prefix}_rows_of_1000_tokens": {
            "bf16": bf16["rows_of_1000_tokens"],
            "int4": int4["rows_of_1000_tokens"],
        },
    }
    if "scoring" in bf16 and "scoring" in int4:
        speed = int4["scoring"]["prompts_per_s"] / bf16["scoring"]["prompts_per_s"]
        found[f"{prefix}_scoring_ratio"] = round(speed, 3)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/perf/int4.json"))
    parser.add_argument(
        "--models", default="dense,moe,235b", help="comma-separated subset, and `sweep`"
    )
    parser.add_argument(
        "--requests", type=int, default=256, help="scoring prompts per engine (0: no scoring)"
    )
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--gpu-memory-gb", type=float, help="plan KV as if the card had this much")
    parser.add_argument("--kv-fraction-235b", type=float, default=0.75)
    args = parser.parse_args()
    random.seed(0)
    device = torch.device("cuda")
    bandwidth, flops = copy_bandwidth(device), matmul_flops(device)
    report: dict = {
        "device": torch.cuda.get_device_name(),
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "matmul_tflops": round(flops / 1e12, 1),
        "gpu_memory_gb": args.gpu_memory_gb,
    }
    models = args.models.split(",")

    def save() -> None:  # after each model, so a run cut short keeps what it measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    if "sweep" in models:
        report["kernel_sweep"] = kernel_sweep(bandwidth)
        save()

    for name in ("dense", "moe"):
        if name in models:
            bf16 = measure(name, None, bandwidth, flops, args)
            int4 = measure(name, "int4", bandwidth, flops, args)
            report.update(ratios(bf16, int4, name))
            report[name] = {"bf16": bf16, "int4": int4}
            save()
    if "235b" in models:
        big = measure("235b", "int4", bandwidth, flops, args)
        report.update(
            weights_gib_235b=big["weights_gib"],
            step_ms_235b=big["step_ms"],
            floor_fraction_235b=big["floor_fraction"],
            rows_of_1000_tokens_235b=big["rows_of_1000_tokens"],
        )
        if "scoring" in big:
            report["scoring_prompts_per_s_235b"] = big["scoring"]["prompts_per_s"]
        report["235b"] = big
        save()
    for key, value in report.items():
        if key not in ("dense", "moe", "235b", "kernel_sweep"):
            print(f"{key:34} {value}")


if __name__ == "__main__":
    main()
