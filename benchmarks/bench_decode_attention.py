"""Decode attention alone, from the layer's projection qkv to its output: q/k norms + RoPE + the
K/V write (rope_store) then the split kernel then the merge kernel, against the split kernel doing
either or both of the others in its launch (replica.kernels.decode_attention), at the attention
shapes of Qwen3-4B, 30B-A3B and 235B-A22B, 1 to 256 rows of several live lengths.

    python -m benchmarks.bench_decode_attention --out $OUT      # a GPU
    python -m benchmarks.bench_decode_attention --smoke --out /tmp  # the CPU, interpreter

Each size is one CUDA graph of a model's layers' attention (launches back to back, as in a
decode step), µs a layer; merged with each of MERGE_TILES partial outputs' elements read at once
(decode_attention.MERGE_TILE: more is fewer rounds for the merging split, more registers). The
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
SIZES = [(1, 1000), (1, 8000), (1, 32000), (8, 1000), (64, 1000), (256, 1000)]
CACHE_BYTES = 8 << 30  # the most a size allocates: layers past it reread earlier caches
SMOKE_SIZES = [(1, 40), (3, 70)]
BLOCK_SIZE = 16
MERGE_TILES = (4096, 8192, 16384)


def layer_us(
    model: tuple[int, int, int], rows: int, live: int, merge_tile: int, roped: bool
) -> float:
    """µs a layer of `rows` rows of `live` tokens, each layer its own cache (as a step reads):
    merged in the launch with `merge_tile` (0: by a second kernel); `roped`: the split kernel
    takes the projection (else rope_store before it)."""
    from replica.kernels import decode_attention as module
    from replica.kernels.decode_attention import Rope, decode_attention
    from replica.ops.layer import TritonLayerOps

    q_heads, kv_heads, layers = model
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    layers = layers if cuda else 1
    per_row = -(-live // BLOCK_SIZE)
    shape = (2, rows * per_row, BLOCK_SIZE, kv_heads, 128)
    distinct = max(1, min(layers, CACHE_BYTES // (2 * torch.Size(shape).numel())))
    caches = [torch.randn(shape, device=device, dtype=dtype) for _ in range(distinct)]
    caches = [caches[i % distinct] for i in range(layers)]  # each larger than the L2
    tables = torch.arange(rows * per_row, device=device, dtype=torch.int32).view(rows, per_row)
    row_ids = torch.arange(rows, device=device)
    lengths = torch.full((rows,), live, dtype=torch.int32, device=device)
    positions = (lengths - 1).long()
    slots = tables[:, -1].long() * BLOCK_SIZE + positions % BLOCK_SIZE
    qkv = torch.randn(rows, (q_heads + 2 * kv_heads) * 128, device=device, dtype=dtype)
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, 128, 2, device=device).float() / 128)
    norms = torch.ones(2, 128, device=device, dtype=dtype)
    layer_ops = TritonLayerOps(q_heads, kv_heads, 128, 1e-6, inv_freq)
    rope = Rope(q_heads, *norms, inv_freq, positions, slots, 1e-6)
    tickets = torch.zeros(rows * kv_heads, dtype=torch.int32, device=device)
    launch = {"tickets": tickets if merge_tile else None}

    def step() -> None:
        for k_cache, v_cache in caches:
            paged = (tables, row_ids, lengths)
            if roped:
                decode_attention(qkv, (k_cache, v_cache), *paged, rope=rope, **launch)
            else:
                q, _, _ = layer_ops.rope_store(qkv, *norms, positions, slots, k_cache, v_cache)
                decode_attention(q, (k_cache, v_cache), *paged, **launch)

    with mock.patch.object(module, "MERGE_TILE", merge_tile):
        if not cuda:
            return 1e3 * time_ms(step, repeats=1)
        step()  # compiled before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    return 1e3 * time_ms(graph.replay, repeats=20) / layers


def timed_row(model: str, rows: int, live: int, tiles: tuple[int, ...]) -> dict:
    """One size's µs a layer: three launches, roped (two), merged with each tile (two), and
    both (one, the first tile)."""
    shape = SHAPES[model]
    row = {"model": model, "rows": rows, "live": live}
    row["three_launches_us"] = round(layer_us(shape, rows, live, 0, False), 2)
    row["roped_us"] = round(layer_us(shape, rows, live, 0, True), 2)
    for tile in tiles:
        row[f"merged_{tile}_us"] = round(layer_us(shape, rows, live, tile, False), 2)
        row[f"one_launch_{tile}_us"] = round(layer_us(shape, rows, live, tile, True), 2)
    return row


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
    for model in SHAPES:
        for rows, live in SMOKE_SIZES if args.smoke else SIZES:
            row = timed_row(model, rows, live, tiles)
            report["rows"].append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    out = args.out / f"decode-attention-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
