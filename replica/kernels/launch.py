"""What a launch needs: a matrix-unit tile's shape, the device's multiprocessors, split-K sized by
them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

MAX_SPLIT_K = 16


@dataclass(frozen=True)
class Tile:
    """Block sizes of a GEMM with matrix units: tokens (BLOCK_M), output features (BLOCK_N),
    reduction depth (BLOCK_K), warps and pipeline stages."""

    tokens: int
    features: int
    depth: int
    warps: int
    stages: int


@cache
def multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessors; on the CPU (Triton's interpreter, in tests) a small GPU's 8:
    small shapes still exercise split-K and split attention."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


@cache
def arch(device: torch.device) -> int:
    """The GPU's compute capability as sm_<arch> counts it (80: an A100, 90: an H100 or H200);
    0 on the CPU."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def split_k(programs: int, steps: int, device: torch.device) -> int:
    """Slices of K so that about two programs per SM read weights (a decode step's output
    alone may have only a few dozen feature blocks); a power of two dividing the K steps."""
    split = 1
    target = 2 * multiprocessors(device)
    while programs * split < target and steps % (2 * split) == 0 and split < MAX_SPLIT_K:
        split *= 2
    return split
