"""Decode attention alone: its splits merged by a second kernel against merged in the split
kernel's own launch by the split that finishes last (replica.kernels.decode_attention), at the
attention shapes of Qwen3-4B, 30B-A3B and 235B-A22B, 1 to 256 rows of several live lengths.

    python -m benchmarks.bench_decode_attention --out $OUT      # a GPU
    python -m benchmarks.bench_decode_attention --smoke --out /tmp  # the CPU, interpreter

Each size is one CUDA graph of a model's layers' attention (launches back to back, as in a
decode step), µs a layer; the JSON `decode-attention-<device>.json` has an ISO `date`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

from benchmarks.bench_int4_v2 import device_slug
from benchmarks.yardsticks import time_ms

# (q heads, KV heads, layers) of each model's attention (head dim 128)
SHAPES = {"4b": (32, 8, 36), "30b-a3b": (32, 4, 48), "235b-a22b": (64, 4, 94)}
SIZES = [(1, 1000), (1, 8000), (1, 32000), (8, 1000), (8, 8000), (64, 1000), (256, 1000)]
SMOKE_SIZES = [(1, 40), (3, 70)]
BLOCK_SIZE = 16


def layer_us(shape: tuple[int, int, int], rows: int, live: int, merged: bool) -> float:
    """µs a layer of `rows` rows of `live` tokens, each layer its own cache (as a step reads)."""
    from replica.kernels.decode_attention import decode_attention

    q_heads, kv_heads, layers = shape
    device, dtype = (
        ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    )
    layers = layers if device == "cuda" else 1
    per_row = -(-live // BLOCK_SIZE)
    caches = [
        torch.randn(2, rows * per_row, BLOCK_SIZE, kv_heads, 128, device=device, dtype=dtype)
        for _ in range(layers)
    ]
    tables = torch.arange(rows * per_row, device=device, dtype=torch.int32).view(rows, per_row)
    row_ids = torch.arange(rows, device=device)
    lengths = torch.full((rows,), live, dtype=torch.int32, device=device)
    q = torch.randn(rows, q_heads, 128, device=device, dtype=dtype)
    tickets = torch.zeros(rows * kv_heads, dtype=torch.int32, device=device) if merged else None

    def step() -> None:
        for k_cache, v_cache in caches:
            decode_attention(q, (k_cache, v_cache), tables, row_ids, lengths, tickets=tickets)

    if device == "cpu":
        return 1e3 * time_ms(step, repeats=1)
    step()  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return 1e3 * time_ms(graph.replay, repeats=20) / layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/perf"), help="a directory")
    parser.add_argument("--smoke", action="store_true", help="the CPU: tiny sizes, interpreter")
    args = parser.parse_args()
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":  # before the kernels load
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        argv = [sys.executable, "-m", "benchmarks.bench_decode_attention", *sys.argv[1:]]
        os.execve(sys.executable, argv, env)
    name = "cpu-smoke" if args.smoke else device_slug(torch.cuda.get_device_name())
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": "cpu (interpreter)" if args.smoke else torch.cuda.get_device_name(),
        "rows": [],
    }
    print(f"{'model':>10} {'rows':>5} {'live':>6} {'two kernels':>12} {'merged':>8} {'ratio':>6}")
    for model, shape in SHAPES.items():
        for rows, live in SMOKE_SIZES if args.smoke else SIZES:
            two = layer_us(shape, rows, live, merged=False)
            merged = layer_us(shape, rows, live, merged=True)
            row = {"model": model, "rows": rows, "live": live, "two_kernels_us": round(two, 2)}
            row |= {"merged_us": round(merged, 2), "ratio": round(merged / two, 3)}
            report["rows"].append(row)
            print(f"{model:>10} {rows:>5} {live:>6} {two:>12.2f} {merged:>8.2f} {row['ratio']:>6}")
    out = args.out / f"decode-attention-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
