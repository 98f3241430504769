"""Decode attention alone: its splits merged by a second kernel against merged in the split
kernel's own launch by the split that finishes last (replica.kernels.decode_attention), at the
attention shapes of Qwen3-4B, 30B-A3B and 235B-A22B, 1 to 256 rows of several live lengths.

    python -m benchmarks.bench_decode_attention --out $OUT      # a GPU
    python -m benchmarks.bench_decode_attention --smoke --out /tmp  # the CPU, interpreter

Each size is one CUDA graph of a model's layers' attention (launches back to back, as in a
decode step), µs a layer, merged with each of MERGE_TILES partial outputs' elements read at once
(decode_attention.MERGE_TILE: more is fewer rounds for the merging split, more registers); the
JSON `decode-attention-<device>.json` has an ISO `date`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from unittest import mock

import torch

from benchmarks.bench_int4_v2 import device_slug
from benchmarks.yardsticks import time_ms

# (q heads, KV heads, layers) of each model's attention (head dim 128)
SHAPES = {"4b": (32, 8, 36), "30b-a3b": (32, 4, 48), "235b-a22b": (64, 4, 94)}
SIZES = [(1, 1000), (1, 8000), (1, 32000), (8, 1000), (8, 8000), (64, 1000), (256, 1000)]
SMOKE_SIZES = [(1, 40), (3, 70)]
BLOCK_SIZE = 16
MERGE_TILES = (4096, 8192, 16384)


def layer_us(shape: tuple[int, int, int], rows: int, live: int, merge_tile: int) -> float:
    """µs a layer of `rows` rows of `live` tokens, each layer its own cache (as a step reads);
    merged in the launch with `merge_tile` (0: by a second kernel)."""
    from replica.kernels import decode_attention as module
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
    tickets = torch.zeros(rows * kv_heads, dtype=torch.int32, device=device)

    def step() -> None:
        for k_cache, v_cache in caches:
            decode_attention(
                q,
                (k_cache, v_cache),
                tables,
                row_ids,
                lengths,
                tickets=tickets if merge_tile else None,
            )

    with mock.patch.object(module, "MERGE_TILE", merge_tile):
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
    tiles = MERGE_TILES[:1] if args.smoke else MERGE_TILES
    print(f"{'model':>10} {'rows':>5} {'live':>6} {'two kernels':>12}", *tiles)
    for model, shape in SHAPES.items():
        for rows, live in SMOKE_SIZES if args.smoke else SIZES:
            two = layer_us(shape, rows, live, 0)
            row = {"model": model, "rows": rows, "live": live, "two_kernels_us": round(two, 2)}
            row |= {f"merged_{t}_us": round(layer_us(shape, rows, live, t), 2) for t in tiles}
            report["rows"].append(row)
            merged = " ".join(f"{row[f'merged_{t}_us']:.2f}" for t in tiles)
            print(f"{model:>10} {rows:>5} {live:>6} {two:>12.2f} {merged}", flush=True)
    out = args.out / f"decode-attention-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
