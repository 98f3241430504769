"""The decode step's parts, timed on synthetic rows: rows of a given live length in blocks
taken from the engine's pool, fed to the model runner directly (no scheduler), so a step's
attention, its whole graph and its sampling variant can be timed apart."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch

from benchmarks.yardsticks import time_ms
from replica.engine.batch_inputs import DecodeRows
from replica.engine.engine import Engine
from replica.engine.kv_cache import bytes_per_token
from replica.kernels.decode_attention import WAVES, decode_attention
from replica.wire.messages import SamplingParams


def synthetic_rows(engine: Engine, rows: int, live: int) -> tuple[DecodeRows, list[int]]:
    """`rows` decode rows of `live` tokens each, in blocks taken from the engine's pool (the
    caller gives them back), as a decode step reads them."""
    size = engine.blocks.block_size
    per_row = -(-live // size)
    held = engine.blocks.take(rows * per_row)
    decode = DecodeRows()
    for row in range(rows):
        blocks = held[row * per_row : (row + 1) * per_row]
        decode.tokens.append(1)
        decode.positions.append(live - 1)
        decode.row_ids.append(row)
        decode.kv_slots.append(blocks[(live - 1) // size] * size + (live - 1) % size)
        decode.table_entries += [(row, j, block) for j, block in enumerate(blocks)]
    return decode, held


def _attention_ms(engine: Engine, rows: int, live: int, waves: int) -> float:
    """The decode attention of every layer, captured as one CUDA graph (no launch gaps)."""
    model, cache, inputs = engine.model, engine.cache, engine.runner.inputs
    decode, held = synthetic_rows(engine, rows, live)
    inputs.set(decode, rows)
    row_ids = torch.arange(rows, device="cuda")
    lens = torch.full((rows,), live, dtype=torch.int32, device="cuda")
    q = torch.randn(rows, model.num_heads, model.head_dim, device="cuda").to(model.dtype)
    paged = (inputs.tables, row_ids, lens)
    for layer in range(len(model.layers)):  # warm-up: compiles for this split count
        decode_attention(q, cache.layer(layer), *paged, waves)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(len(model.layers)):
            decode_attention(q, cache.layer(layer), *paged, waves)
    ms = time_ms(graph.replay)
    engine.blocks.release(held)
    return ms


def attention_sweep(engine: Engine, bandwidth: float) -> list[dict]:
    """Decode attention at several split counts (programs per multiprocessor)."""
    results = []
    for rows, live in ((64, 428), (min(256, engine.max_rows), 843)):
        kv_bytes = rows * live * bytes_per_token(engine.model.config, engine.model.dtype)
        for waves in (2, 4, 8, 16):
            ms = _attention_ms(engine, rows, live, waves)
            floor = round(1e3 * kv_bytes / bandwidth / ms, 3)
            results.append({"rows": rows, "waves": waves, "ms": round(ms, 3), "floor": floor})
    return results


def decode_profile(engine: Engine, rows: int, live: int, bandwidth: float) -> dict:
    """Where one decode step's time goes: the whole step's graph against its attention alone,
    at `rows` rows of `live` tokens each, each part against its byte floor."""
    runner = engine.runner
    decode, held = synthetic_rows(engine, rows, live)
    runner.decode_rows(decode)
    step_ms = time_ms(lambda: runner.replay(rows))
    engine.blocks.release(held)
    attention_ms = _attention_ms(engine, rows, live, WAVES)
    kv_ms = 1e3 * rows * live * bytes_per_token(engine.model.config, engine.model.dtype) / bandwidth
    weights_ms = 1e3 * engine.model.weight_bytes() / bandwidth
    return {
        "rows": rows,
        "live_tokens": live,
        "step_ms": round(step_ms, 2),
        "floor_ms": round(weights_ms + kv_ms, 2),
        "attention_ms": round(attention_ms, 2),
        "attention_floor_fraction": round(kv_ms / attention_ms, 3),
        "rest_ms": round(step_ms - attention_ms, 2),
        "rest_floor_fraction": round(weights_ms / (step_ms - attention_ms), 3),
    }


SAMPLING_SETTINGS = {
    "top_k 50, top_p 0.95": SamplingParams(1.0, 0.95, 50),
    "top_p 0.9": SamplingParams(1.0, 0.9),
    "temperature only": SamplingParams(0.7),
}


def sampling_cost(engine: Engine, live: int = 500, rounds: int = 3) -> list[dict]:
    """The decode step at 64 and 256 rows (or as many as the card holds) with every row sampling
    (each setting of SAMPLING_SETTINGS, every row its own seed) against the same step all greedy:
    graph replays of the same inputs, the variants alternating over `rounds`, median of each."""
    runner, results = engine.runner, []
    for rows in sorted({min(64, engine.max_rows), min(256, engine.max_rows)}):
        decode, held = synthetic_rows(engine, rows, live)
        times: dict[str, list[float]] = {"greedy": []}
        for _ in range(rounds):
            runner.decode_rows(decode)
            times["greedy"].append(time_ms(partial(runner.replay, rows), repeats=50))
            for name, params in SAMPLING_SETTINGS.items():
                runner.decode_rows(decode, [replace(params, seed=i) for i in range(rows)])
                sampled_ms = time_ms(partial(runner.replay, rows, True), repeats=50)
                times.setdefault(name, []).append(sampled_ms)
        engine.blocks.release(held)
        median = {name: sorted(ms)[len(ms) // 2] for name, ms in times.items()}
        greedy_ms = median.pop("greedy")
        for name, sampled_ms in median.items():
            results.append(
                {
                    "rows": rows,
                    "setting": name,
                    "greedy_ms": round(greedy_ms, 3),
                    "sampled_ms": round(sampled_ms, 3),
                    "overhead": round(sampled_ms / greedy_ms - 1, 4),
                }
            )
    return results
