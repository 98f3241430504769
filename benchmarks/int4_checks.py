"""Issue 36's kernels against the dequantize oracle at the real shapes, 1 to 16,384 tokens: the
split-K tile (and its PTX weights', which must equal it bit for bit), today's linear table, torch's int4 matmul (symmetric and asymmetric weights: its
bf16 float zero is the one lossy step) and the fused 4-bit experts. Run by
benchmarks.bench_int4_v2; on the CPU (`--smoke`) with tiny shapes in Triton's interpreter.

Errors are the largest absolute difference and that over the oracle's largest magnitude. The
MoE's are per token (its k pairs summed) and count the tokens off by more than 1%: a token whose
router logits nearly tie may pick another expert under another GEMM's rounding.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from benchmarks.int4_names import expert_gemv_name, fused_name
from replica.kernels.int4_gemv import MAX_GRID_Z, w4a16_gemv
from replica.kernels.int4_splitk import SplitKTile, w4a16_splitk
from replica.kernels.launch import arch
from replica.ops import tables, tinygemm
from replica.ops.feed_forward import TritonMoE
from replica.ops.linear import TritonLinear
from replica.ops.mlp import SparseMoE, moe_reference
from replica.ops.packed import PackedInt4, dequantize, quantize

PREFILL_SPLITK = SplitKTile(64, 64, 4, 3)  # the split-K tile past the table's 64 tokens


def errors(ours: Tensor, oracle: Tensor) -> dict:
    diff = (ours.float() - oracle.float()).abs().max().item()
    scale = oracle.float().abs().max().item()
    return {"max_abs": float(f"{diff:.3g}"), "max_rel": float(f"{diff / max(scale, 1e-30):.3g}")}


def splitk_tile(tokens: int, rows: int, device: torch.device) -> SplitKTile:
    """The served split-K tile here (past the table's split-K sizes, PREFILL_SPLITK)."""
    choice = tables.INT4_LINEAR_WIDE.choose(tokens)
    if isinstance(choice, tables.SplitK):
        return choice.for_rows(rows, arch(device))
    return PREFILL_SPLITK


def linear_checks(shapes: dict, token_counts: tuple[int, ...], device: torch.device) -> list:
    """Each projection, asymmetric and symmetric weights, every path against the oracle."""
    gen = torch.Generator(device=device).manual_seed(1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for shape, (n, k) in shapes.items():
        w = torch.randn(n, k, device=device, generator=gen) / k**0.5
        for symmetric in (False, True):
            packed = quantize(w.to(dtype), symmetric=symmetric)
            weight = dequantize(packed, dtype)
            converted = (
                tinygemm.convert(packed, torch.bfloat16) if tinygemm.servable(packed) else None
            )
            base = {"shape": shape, "symmetric": symmetric}
            if converted is not None:  # what the conversion changes in the weights themselves
                exact = dequantize(packed, torch.float32)
                rows.append(
                    {
                        **base,
                        "tinygemm_weights": errors(
                            tinygemm.dequantize(packed, torch.bfloat16), exact
                        ),
                    }
                )
            for tokens in token_counts:
                x = torch.randn(tokens, k, device=device, generator=gen).to(dtype)
                oracle = x @ weight.t()
                row = {**base, "tokens": tokens}
                tile = splitk_tile(tokens, n, device)
                plain = w4a16_splitk(x, packed, tile)
                ptx = w4a16_splitk(x, packed, replace(tile, ptx=True))
                row["splitk"] = errors(plain, oracle)
                row["splitk_ptx"] = {**errors(ptx, oracle), "equal": torch.equal(ptx, plain)}
                row["default"] = errors(TritonLinear()(x, packed), oracle)
                if tokens <= 2:  # a GEMV tile whose K splits on these shapes (the serial sum)
                    row["gemv_split"] = errors(w4a16_gemv(x, packed, tables.GEMV_2.tile), oracle)
                if converted is not None:
                    row["tinygemm"] = errors(
                        tinygemm.matmul(x.to(torch.bfloat16), converted), oracle
                    )
                rows.append(row)
                print(row, flush=True)
        del w
    return rows


def moe_checks(
    shape: tuple[int, int, int, int], token_counts: tuple[int, ...], device: torch.device
) -> list:
    """Every packed-expert path the tables serve (a program a pair, each fused tile) against the
    expert loop, per token."""
    experts, hidden, inter, top_k = shape
    gen = torch.Generator(device=device).manual_seed(2)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def packed(*size: int) -> PackedInt4:
        return quantize(
            (torch.randn(*size, device=device, generator=gen) / size[-1] ** 0.5).to(dtype)
        )

    layer = SparseMoE(
        router=torch.randn(experts, hidden, device=device, generator=gen).to(dtype),
        gate_up=packed(experts, 2 * inter, hidden),
        down=packed(experts, hidden, inter),
        top_k=top_k,
        norm_topk_prob=True,
    )
    rows, fused = [], TritonMoE()
    for tokens in token_counts:
        x = torch.randn(tokens, hidden, device=device, generator=gen).to(dtype)
        oracle = moe_reference(x, layer).float()
        row: dict = {"tokens": tokens}
        for name, choice in served_experts().items():
            if isinstance(choice, tables.ExpertGemv) and tokens * top_k > MAX_GRID_Z:
                continue  # a program a pair: decode sizes only (its grid's third axis)
            out = fused.run(x, layer, choice).float()
            row[name] = {
                **errors(out.view(tokens, top_k, hidden).sum(1), oracle),
                **_off(out, oracle, top_k),
            }
        rows.append(row)
        print(row, flush=True)
    return rows


def served_experts() -> dict[str, tables.MoeChoice]:
    """The packed tables' GEMV and fused choices, named as the moe sweep names them; each fused
    one also with its weights made in packed 16-bit PTX."""
    entries = tables.MOE_PACKED_DECODE.entries + tables.MOE_PACKED_PREFILL.entries
    named = {}
    for choice in (entry.choice for entry in entries):
        if isinstance(choice, tables.FusedExperts):
            named[fused_name(choice.tile)] = choice
            ptx = replace(choice.tile, ptx=True)
            named[fused_name(ptx)] = tables.FusedExperts(ptx)
        elif isinstance(choice, tables.ExpertGemv):
            named[expert_gemv_name(choice.up, choice.down)] = choice
    return named


def _off(out: Tensor, oracle: Tensor, top_k: int) -> dict:
    """Tokens whose output is off by more than 1% of the largest."""
    per_token = (out.view(oracle.shape[0], top_k, -1).sum(1) - oracle).abs().amax(-1)
    return {"tokens_off": int((per_token > 1e-2 * oracle.abs().max()).sum())}


def run_checks(
    dense: dict, moe: tuple[int, int, int, int], token_counts: tuple[int, ...], device: torch.device
) -> dict:
    return {
        "linear": linear_checks(dense, token_counts, device),
        "moe": moe_checks(moe, token_counts, device),
    }
