"""Issue 36's GPU run in one call: the second design's 4-bit paths against bf16, torch's int4
matmul and GemLite, random weights of the real shapes (vendor/configs).

    python -m benchmarks.bench_int4_v2 --out $OUT --gpu-memory-gb 79   # < 7 minutes on an H100
    python -m benchmarks.bench_int4_v2 --smoke                         # the CPU: tiny shapes

writes `int4-v2-<device>.json` under --out (a directory) with an ISO `date`:

- `checks`: every new path against the dequantize oracle, 1 to 16,384 tokens
  (benchmarks.int4_checks);
- `sweep`: each 4B projection by token count, microseconds a call (decode sizes in CUDA graphs,
  prefill sizes eager): bf16, the served table (`served`) and each split-K tile, at one token
  the served GEMV tile and its prefetching twin (`gemv_*p`), torch's int4 matmul
  (`tinygemm`), GemLite; gate_up also with SiLU(gate) * up as the MLP runs it (`*_mlp`);
  the 30B's experts: the served table against the fused kernel's tiles, and at decode sizes
  the layer routed in one launch (`served_fused_route`, `bf16_fused_route`) and each routing
  alone (`route`, `route_fused`);
- `peer_ratio` {"1", "8", "64"}: the four projections' summed time, our served paths over the
  faster peer (tinygemm, GemLite), gate_up with SiLU(gate) * up on both sides;
- engines: `dense_*` / `moe_*` step ratios at 1, 8, 64 rows and scoring ratios, int4 over bf16,
  with the served tables, and `--variants`: engines built another way, each named in
  benchmarks.int4_variants.VARIANTS with what it changes (those of BOTH_DTYPES rebuild bf16
  too, each ratio over that bf16), via benchmarks.bench_int4's `measure`; `--requests 0`: the
  steps alone, no scoring (a variant that changes no prefill path).

The sweep's columns name tiles by benchmarks.int4_names (`_ptx`: weights in packed 16-bit PTX,
`_two`: two groups a loop step); the experts' rows at 1 and 2 tokens also time the pairs in one
launch (`pairs_one_launch`).

`--parts checks,sweep` then `--parts engines` splits the run in two (files named after them);
`--parts moe` sweeps the 30B's experts alone;
`--with-235b` adds the 235B's engine, routing spread (an H200), and its experts with `moe`.

`--smoke` re-runs itself under TRITON_INTERPRET=1 and times single eager calls: a typo check.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from benchmarks.int4_checks import run_checks
from benchmarks.int4_names import expert_gemv_name, fused_name, tile_name
from benchmarks.int4_peers import gemlite_peer, guarded, peer_ratio, silu_after
from benchmarks.int4_tiles import (
    EXPERT_GEMV_TILES,
    FUSED_NARROW_TILES,
    FUSED_PREFILL_TILES,
    FUSED_TILES,
    gated_splitk,
    one_token_gemvs,
    splitk_tiles,
)
from benchmarks.int4_variants import BOTH_DTYPES, VARIANTS, fused_routes
from replica.kernels.int4_dequantize import dequantized
from replica.kernels.int4_splitk import w4a16_splitk
from replica.kernels.moe_route import FUSED_MAX_TOKENS
from replica.loading.source import VENDORED_CONFIGS, resolve
from replica.ops import tables, tinygemm
from replica.ops.feed_forward import TritonMLP, TritonMoE
from replica.ops.linear import TritonLinear
from replica.ops.mlp import SparseMoE
from replica.ops.packed import random_packed

ALL_PARTS = "checks,sweep,engines"
SMOKE_DENSE = {"qkv": (96, 256), "o": (64, 128), "gate_up": (160, 256), "down": (64, 256)}
SMOKE_MOE = (16, 256, 128, 2)  # 1 token: 1/8 pair an expert, a program a pair


@dataclass(frozen=True)
class Sizes:
    """Token counts: decode steps (in CUDA graphs), prefills (eager), correctness checks."""

    decode: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    prefill: tuple[int, ...] = (128, 1024, 4096, 16384)
    checks: tuple[int, ...] = (1, 8, 16, 64, 1024, 16384)


SMOKE_SIZES = Sizes(decode=(1, 8), prefill=(32,), checks=(1, 8, 40))


def dense_shapes(name: str) -> dict[str, tuple[int, int]]:
    """(N, K) of a dense model's four projections, from its vendored config."""
    c = resolve(str(VENDORED_CONFIGS / name), random_weights=True).config
    heads = c.num_attention_heads * c.head_dim
    return {
        "qkv": (heads + 2 * c.num_key_value_heads * c.head_dim, c.hidden_size),
        "o": (c.hidden_size, heads),
        "gate_up": (2 * c.intermediate_size, c.hidden_size),
        "down": (c.hidden_size, c.intermediate_size),
    }


def moe_shape(name: str) -> tuple[int, int, int, int]:
    """(experts, hidden, expert intermediate, top-k) of an MoE model's vendored config."""
    c = resolve(str(VENDORED_CONFIGS / name), random_weights=True).config
    return c.num_experts, c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok


class Clock:
    """Microseconds a call: in CUDA graphs (decode) or eager (prefill); on the CPU one call."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def graphed(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            return self.eager(fn)
        from benchmarks.bench_int4 import graph_us

        return round(graph_us(fn), 2)

    def eager(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            from benchmarks.yardsticks import time_ms

            return round(1e3 * time_ms(fn, 10), 1)
        start = time.perf_counter()
        fn()
        return round(1e6 * (time.perf_counter() - start), 1)


def dense_sweep(
    shapes: dict, clock: Clock, device: torch.device, sizes: Sizes, gemlite_wanted: bool
) -> dict:
    """Each projection by token count through every path (random symmetric weights); GemLite
    where wanted and importable (it autotunes on first use where it has no stored config)."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if clock.cuda else torch.float32
    rows, peer_note = [], ""
    served = TritonLinear()
    mlp = TritonMLP(served)
    for shape, (n, k) in shapes.items():
        packed = random_packed((n, k), 0.02, dtype, gen)
        weight = tinygemm.dequantize(packed, dtype)  # the same weights in 16 bits
        converted = tinygemm.convert(packed, torch.bfloat16)
        gemlite, peer_note = gemlite_peer(packed, dtype) if gemlite_wanted else (None, "skipped")
        for tokens in sizes.decode + sizes.prefill:
            x = torch.randn(tokens, k, device=device, generator=gen).to(dtype)
            decode = tokens in sizes.decode
            time_us = clock.graphed if decode else clock.eager
            row = {"shape": shape, "tokens": tokens}
            paths = {
                "bf16": partial(torch.matmul, x, weight.t()),
                "served": partial(served, x, packed),
                "tinygemm": partial(tinygemm.matmul, x.to(torch.bfloat16), converted),
            }
            if gemlite is not None:
                paths["gemlite"] = partial(gemlite, x)
            if shape == "gate_up":  # SiLU(gate) * up too, as the MLP runs it: fused, or after
                paths["served_mlp"] = partial(mlp.gated, x, packed)
                paths["tinygemm_mlp"] = partial(silu_after, paths["tinygemm"])
                if gemlite is not None:
                    paths["gemlite_mlp"] = partial(silu_after, paths["gemlite"])
            if tokens == 1:  # the served one-token GEMV tile, and with loads a step ahead
                paths.update(one_token_gemvs(x, packed, shape == "gate_up"))
            if decode:
                for t in splitk_tiles(tokens):
                    paths[tile_name(t)] = partial(w4a16_splitk, x, packed, t)
                if shape == "gate_up":  # SiLU(gate) * up fused into the tile
                    paths.update(gated_splitk(x, packed, tokens))
            ours = {name: fn for name, fn in paths.items() if not name.startswith("gemlite")}
            row.update({name: time_us(fn) for name, fn in ours.items()})
            for name in paths.keys() - ours.keys():  # a peer we do not control: eager if need be
                row[name] = guarded(time_us, clock.eager, paths[name])
            rows.append(row)
            print(row, flush=True)
    return {"dense_us": rows, "gemlite": peer_note}


def moe_sweep(shape: tuple, clock: Clock, device: torch.device, sizes: Sizes) -> list:
    """An expert layer by token count: the served table against the 16-bit experts, each fused
    kernel tile (to a pair an expert, narrower ones too) and, under a quarter pair an expert,
    each program-a-pair tile pair."""
    experts, hidden, inter, top_k = shape
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if clock.cuda else torch.float32
    layer = SparseMoE(
        router=torch.randn(experts, hidden, device=device, generator=gen).to(dtype),
        gate_up=random_packed((experts, 2 * inter, hidden), 0.02, dtype, gen),
        down=random_packed((experts, hidden, inter), 0.02, dtype, gen),
        top_k=top_k,
        norm_topk_prob=True,
    )

    # Prefill beside the 16-bit experts it is measured against, and the 16-bit copy's share
    def copy() -> tuple:
        return dequantized(layer.gate_up, dtype), dequantized(layer.down, dtype)

    gate_up, down = copy()
    wide = replace(layer, gate_up=gate_up, down=down)
    rows, moe = [], TritonMoE()
    one_launch = TritonMoE(routes=fused_routes)
    for tokens in sizes.decode + sizes.prefill:
        x = torch.randn(tokens, hidden, device=device, generator=gen).to(dtype)
        decode = tokens in sizes.decode
        time_us = clock.graphed if decode else clock.eager
        row: dict = {"tokens": tokens, "pairs_an_expert": tokens * top_k / experts}
        row["served"] = time_us(partial(moe, x, layer, decode))
        row["bf16"] = time_us(partial(moe, x, wide, decode))
        if not decode:
            row["dequantize_alone"] = time_us(copy)
        if decode and tokens <= FUSED_MAX_TOKENS:  # routing in one launch, and alone
            row["served_fused_route"] = time_us(partial(one_launch, x, layer, decode))
            row["bf16_fused_route"] = time_us(partial(one_launch, x, wide, decode))
            row["route"] = time_us(partial(moe.route, x, layer))
            row["route_fused"] = time_us(partial(one_launch.route, x, layer))
        narrow = FUSED_NARROW_TILES if tokens * top_k <= experts else []
        for t in FUSED_TILES + narrow + ([] if decode else FUSED_PREFILL_TILES):
            row[fused_name(t)] = time_us(partial(moe.run, x, layer, tables.FusedExperts(t)))
        if tokens * top_k / experts < 0.25:  # a program a pair: its tiles
            for up, down in EXPERT_GEMV_TILES:
                choice = tables.ExpertGemv(up, down, bucketed=False)
                row[expert_gemv_name(up, down)] = time_us(partial(moe.run, x, layer, choice))
            one_launch_pairs = replace(tables.EXPERT_PAIRS, one_launch=True)  # moe_pairs
            row["pairs_one_launch"] = time_us(partial(moe.run, x, layer, one_launch_pairs))
        rows.append(row)
        print(row, flush=True)
    return rows


def engines(
    args: argparse.Namespace, bandwidth: float, flops: float, report: dict, save: Callable
) -> None:
    """bf16; int4 through the served tables, and through each of `--variants` (`tinygemm`:
    torch's int4 matmul owning every 2-D projection); for the models of `--engines`. Into
    `report`, saved after each engine (a run cut short keeps them)."""
    from benchmarks.bench_int4 import measure, ratios

    for name in filter(None, args.engines.split(",")):
        runs = report[name] = {}

        def run(variant: str, quantize: str | None, runs: dict = runs, name: str = name) -> None:
            runs[variant] = measure(name, quantize, bandwidth, flops, args)
            save()

        run("bf16", None)
        run("int4", "int4")
        report.update(ratios(runs["bf16"], runs["int4"], name))
        for variant in filter(None, args.variants.split(",")):
            baseline = f"bf16_{variant}" if variant in BOTH_DTYPES else "bf16"
            with VARIANTS[variant]():
                if variant in BOTH_DTYPES:
                    run(baseline, None)
                run(f"int4_{variant}", "int4")
            variant_ratios = ratios(runs[baseline], runs[f"int4_{variant}"], name)
            report.update({f"{k}_{variant}": v for k, v in variant_ratios.items()})
        print({k: v for k, v in report.items() if k.startswith(name)}, flush=True)
        save()


def big_moe(args: argparse.Namespace, clock: Clock, device: torch.device, sizes: Sizes) -> dict:
    """The 235B's engine, int4 alone (its bf16 weights fit no card), routed as a trained model
    would, about (bench_moe.spread_routing: a random router sends a batch to a few experts and
    its step would read a fraction of the bytes); with `moe` in --parts, its experts swept."""
    from benchmarks.bench_int4 import measure
    from benchmarks.bench_moe import spread_routing
    from benchmarks.yardsticks import copy_bandwidth, matmul_flops

    report: dict = {}
    if "moe" in args.parts.split(","):
        shape = moe_shape("qwen3-235b-a22b-instruct-2507")
        report["moe_235b_us"] = moe_sweep(shape, clock, device, sizes)
    with spread_routing() as routing:
        big = measure("235b", "int4", copy_bandwidth(device), matmul_flops(device), args)
    return {
        **report,
        "routing_235b": routing,
        "step_ms_235b": big["step_ms"],
        "floor_fraction_235b": big["floor_fraction"],
        "235b": big,
    }


def smoke_reexec() -> None:
    """--smoke: the kernels must be defined under the interpreter, so run again with it set."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        os.execve(
            sys.executable, [sys.executable, "-m", "benchmarks.bench_int4_v2", *sys.argv[1:]], env
        )


def device_slug(name: str) -> str:
    """'h100' of 'NVIDIA H100 80GB HBM3': the model number, for the file name."""
    return next((w.split("-")[0].lower() for w in name.split() if w[1:4].isdigit()), "gpu")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/perf"), help="a directory")
    parser.add_argument("--parts", default=ALL_PARTS, help="a subset names the file after it")
    parser.add_argument("--smoke", action="store_true", help="the CPU: tiny shapes, interpreter")
    parser.add_argument(
        "--requests", type=int, default=128, help="scoring prompts per engine (0: no scoring)"
    )
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--gpu-memory-gb", type=float, help="plan KV as if the card had this much")
    parser.add_argument("--kv-fraction-235b", type=float, default=0.75)  # measure() reads it
    parser.add_argument("--no-gemlite", action="store_true", help="skip the GemLite peer")
    parser.add_argument("--engines", default="dense,moe", help="engines: which models")
    parser.add_argument(
        "--spread-routing",
        action="store_true",
        help="engines: route as a trained model would, about (bench_moe.spread_routing)",
    )
    parser.add_argument(
        "--variants", default="tinygemm", help=f"engines beside the served: of {list(VARIANTS)}"
    )
    parser.add_argument("--with-235b", action="store_true", help="its engine too (an H200)")
    parser.add_argument(
        "--decode-only", action="store_true", help="sweeps: decode sizes alone (no prefill)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.smoke:
        smoke_reexec()
    device = torch.device("cpu" if args.smoke else "cuda")
    clock, parts = Clock(device), args.parts.split(",")
    name = "cpu-smoke" if args.smoke else device_slug(torch.cuda.get_device_name())
    part_names = "" if args.parts == ALL_PARTS else "-" + "-".join(parts)
    out = args.out / f"int4-v2-{name}{part_names}.json"
    report: dict = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    report["device"] = "cpu (interpreter)" if args.smoke else torch.cuda.get_device_name()

    def save() -> None:  # after each part, so a run cut short keeps what it measured
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")

    dense = SMOKE_DENSE if args.smoke else dense_shapes("qwen3-4b-instruct-2507")
    moe = SMOKE_MOE if args.smoke else moe_shape("qwen3-30b-a3b-instruct-2507")
    sizes = SMOKE_SIZES if args.smoke else Sizes()
    if args.decode_only:
        sizes = replace(sizes, prefill=())
    if "checks" in parts:
        report["checks"] = run_checks(dense, moe, sizes.checks, device)
        save()
    if "sweep" in parts:
        report["sweep"] = dense_sweep(dense, clock, device, sizes, not args.no_gemlite)
        report["peer_ratio"] = peer_ratio(report["sweep"]["dense_us"])
        save()
        report["sweep"]["moe_us"] = moe_sweep(moe, clock, device, sizes)
        save()
    if "moe" in parts and "sweep" not in parts:  # the experts' sweep alone (`sweep` has it)
        report["sweep"] = {"moe_us": moe_sweep(moe, clock, device, sizes)}
        save()
    if "engines" in parts and not args.smoke:
        from benchmarks.bench_moe import spread_routing
        from benchmarks.yardsticks import copy_bandwidth, matmul_flops

        with spread_routing(args.spread_routing) as routing:
            report["routing"] = routing
            engines(args, copy_bandwidth(device), matmul_flops(device), report, save)
    if args.with_235b and not args.smoke:
        report.update(big_moe(args, clock, device, sizes))
        save()
    print(json.dumps({k: v for k, v in report.items() if "ratio" in k or k == "date"}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
