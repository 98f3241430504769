"""Sweep the fused MoE's GEMM tiles at the real Qwen3-30B-A3B layer shape (CUDA).

    python -m benchmarks.tune_moe [--tokens 16384 4096 256]

For each token count: the layer with the table's choice (replica.ops.tables.MOE_16BIT), then
each candidate tile for the up kernel (down kept at the default) and for the down kernel (up kept
at the default), in ms and TFLOP/s of the whole layer, with its relative difference from the
default's result (another reduction depth sums in another order). The table holds the winners.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.yardsticks import time_ms
from replica.kernels.launch import Tile
from replica.loading.model import random_model
from replica.loading.source import VENDORED_CONFIGS, resolve
from replica.ops import select_ops
from replica.ops.feed_forward import TritonMoE
from replica.ops.tables import MOE_16BIT, ExpertTiles

CANDIDATES = [
    Tile(64, 64, 64, 4, 4),
    Tile(64, 128, 64, 4, 3),
    Tile(64, 128, 64, 8, 4),
    Tile(128, 64, 64, 4, 4),
    Tile(128, 128, 64, 8, 3),
    Tile(128, 128, 64, 8, 4),
    Tile(128, 128, 32, 8, 4),
    Tile(128, 256, 64, 8, 3),
    Tile(256, 128, 64, 8, 3),
    Tile(32, 64, 128, 4, 4),
    Tile(16, 32, 128, 4, 4),
]


FUSED_MOE = TritonMoE()


def layer_ms(x: torch.Tensor, moe, tiles: ExpertTiles) -> float:
    return time_ms(lambda: FUSED_MOE.run(x, moe, tiles))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 4096, 256])
    args = parser.parse_args()
    config = resolve(str(VENDORED_CONFIGS / "qwen3-30b-a3b-instruct-2507"), True).config
    config.num_hidden_layers = 1
    ops = select_ops(torch.device("cuda"))
    moe = random_model(config, "cuda", torch.bfloat16, 0, ops).layers[0].mlp
    hidden, inter = config.hidden_size, config.moe_intermediate_size
    for tokens in args.tokens:
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        gflop = tokens * moe.top_k * 2 * (hidden * 2 * inter + inter * hidden) / 1e9
        default = MOE_16BIT.choose(tokens * moe.top_k / moe.num_experts)
        up, down = default.up, default.down
        expected = FUSED_MOE.run(x, moe, default).float()
        ms = layer_ms(x, moe, default)
        print(
            f"{tokens} tokens, default up {up} down {down}: {ms:.3f} ms, {gflop / ms:.0f} TFLOP/s"
        )
        for kernel in ("up", "down"):
            for tile in CANDIDATES:
                tiles = ExpertTiles(tile, down) if kernel == "up" else ExpertTiles(up, tile)
                try:
                    ours = FUSED_MOE.run(x, moe, tiles).float()
                    ms = layer_ms(x, moe, tiles)
                except Exception as failure:  # a tile too big for shared memory
                    print(f"  {kernel} {tile}: {type(failure).__name__}")
                    continue
                diff = ((ours - expected).norm() / expected.norm()).item()
                print(f"  {kernel} {tile}: {ms:.3f} ms, {gflop / ms:.0f} TFLOP/s, diff {diff:.1e}")


if __name__ == "__main__":
    main()
