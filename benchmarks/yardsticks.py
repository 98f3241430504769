"""What a GPU run measures against: copy bandwidth, matmul rate, and CUDA-event timing."""

from __future__ import annotations

import time

import torch


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


def matmul_flops(device: torch.device, n: int = 8192) -> float:
    """FLOP/s of a large bf16 matrix multiply: the compute yardstick for prefill."""
    a, b = torch.randn(2, n, n, dtype=torch.bfloat16, device=device)
    return 2 * n**3 / (time_ms(lambda: a @ b, repeats=20) / 1e3)


def time_ms(fn, repeats: int = 10) -> float:
    """Mean milliseconds of `fn` after one warm-up call: CUDA events on the GPU, the wall clock
    on a machine without one (the benchmarks' CPU smoke runs)."""
    fn()
    if not torch.cuda.is_available():
        begin_s = time.perf_counter()
        for _ in range(repeats):
            fn()
        return 1e3 * (time.perf_counter() - begin_s) / repeats
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / repeats
