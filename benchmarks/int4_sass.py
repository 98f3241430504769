"""The 4-bit kernels' instructions a weight, counted without a GPU: Triton compiles each for a
Hopper (sm_90) on the CPU, `cuobjdump -sass` lists the machine code, and the main loop's
instructions over the weights a thread takes a loop step give the figure (PERF.md, issue 36's
sixth session: the one-token GEMV is bound by its instructions).

    python -m benchmarks.int4_sass            # a line a kernel and tile
    python -m benchmarks.int4_sass --json F   # and the rows as JSON (--arch 80: the A100's)

Ints and pointers are marked divisible by 16, as the launcher specializes them at run time.
The count is static (one pass of the loop), not what a GPU issues; Triton's version matters.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from benchmarks.int4_names import fused_name, gemv_name, tile_name
from replica.kernels.int4_gemv import GemvTile, _w4a16_gemv_kernel
from replica.kernels.int4_splitk import SplitKTile, _splitk_kernel
from replica.kernels.moe_fused import FusedTile, _fused_down_kernel

GROUP = 128
BINARIES = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
POINTERS = {"qweight_ptr": "*i32", "counts_ptr": "*i32", "bucket_ptr": "*i32"}
POINTERS |= {"experts_ptr": "*i32", "done_ptr": "*i32", "route_ptr": "*fp32"}
POINTERS |= {"partial_ptr": "*fp32", "pairs_ptr": "*i32"}
DIVISIBLE = ("n", "depth", "stride_x", "hidden", "inter")  # widths and depths: multiples of 16


def compiled(
    kernel,
    constants: dict,
    warps: int,
    stages: int,
    arch: int = 90,
    half: str = "bf16",
    types: dict | None = None,
):
    """The kernel compiled for sm_<arch> (arguments typed by `types`, else POINTERS; other
    pointers `half`, other ints i32)."""
    names = kernel.arg_names
    known = POINTERS | (types or {})
    signature = {
        name: "constexpr" if name in constants else known.get(name, f"*{half}")
        if name.endswith("_ptr") or name in known else "i32"
        for name in names
    }  # fmt: skip
    aligned = [n for n in names if signature[n].startswith("*") or n in DIVISIBLE]
    aligned += [n for n in names if n.startswith("stride") and n not in aligned]
    source = ASTSource(
        kernel,
        signature,
        constexprs={(names.index(n),): v for n, v in constants.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(
        source,
        target=target,
        options={"num_warps": warps, "num_stages": stages, "enable_fp_fusion": True},
    )


def sass(kernel, constants: dict, warps: int, stages: int, arch: int = 90, **typing) -> str:
    """The kernel's machine code for sm_<arch> (`typing`: compiled's half and types)."""
    return machine_code(compiled(kernel, constants, warps, stages, arch, **typing))


def machine_code(kernel) -> str:
    """cuobjdump's listing of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        return subprocess.run(
            [str(BINARIES / "cuobjdump"), "-sass", cubin.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip


def loop_opcodes(code: str) -> Counter:
    """The opcodes of the longest loop (a backward branch's span) in cuobjdump's listing."""
    return Counter(loop_ops(code))


def loop_ops(code: str) -> list[str]:
    """The longest loop's opcodes in the listing's order."""
    lines = re.findall(r"/\*([0-9a-f]{4,5})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", code)
    at = [(int(a, 16), op, rest) for a, _, op, rest in lines]
    spans = [
        (int(rest.split("0x")[-1], 16), a) for a, op, rest in at if op == "BRA" and "0x" in rest
    ]
    start, end = max(((s, e) for s, e in spans if s < e), key=lambda span: span[1] - span[0])
    return [op for a, op, _ in at if start <= a <= end]


def gemv_row(tile: GemvTile, gated: bool, arch: int = 90) -> dict:
    """The one-token GEMV (as a decode step's projection or gate-up launches it)."""
    constants = dict(OUTPUTS_PER_TOKEN=1, GROUP=GROUP, SPLIT_K=1, BLOCK_N=tile.features)
    constants |= dict(GROUPS=tile.groups, TOKENS=1, PER_OUTPUT_EXPERT=False, BUCKETED=False)
    constants |= dict(GATED=gated, ROUTED=False, PREFETCH=tile.prefetch)
    ops = loop_opcodes(sass(_w4a16_gemv_kernel, constants, tile.warps, tile.stages, arch))
    rows = tile.features * (2 if gated else 1)
    weights = rows * tile.groups * GROUP / (32 * tile.warps)  # a thread's, a loop step
    name = f"gemv{'_gated' * gated}_{gemv_name(tile)}"
    return row(name, ops, weights)


def splitk_row(tile: SplitKTile, arch: int = 90) -> dict:
    """The split-K tile, K split (the serial sum after the loop)."""
    constants = dict(GROUP=GROUP, SPLIT_K=2, BLOCK_M=tile.tokens, BLOCK_N=tile.features)
    constants |= dict(PTX=tile.ptx, GATED=False, TWO_GROUPS=tile.two_groups)
    constants |= dict(TOKENS_ON_M=tile.tokens_on_m)
    kernel = compiled(_splitk_kernel, constants, tile.warps, tile.stages, arch)
    weights = tile.features * GROUP * (1 + tile.two_groups) / (32 * tile.warps)
    return row(tile_name(tile), loop_opcodes(machine_code(kernel)), weights, kernel)


def fused_row(tile: FusedTile, arch: int = 90) -> dict:
    """The fused experts' down kernel (its loop is the up kernel's, once for gate and up)."""
    constants = dict(GROUP=GROUP, BLOCK_M=tile.tokens, BLOCK_N=tile.down_features, PTX=tile.ptx)
    constants |= dict(TWO=tile.two_groups)
    kernel = compiled(_fused_down_kernel, constants, tile.warps, tile.stages, arch)
    weights = tile.down_features * GROUP * (1 + tile.two_groups) / (32 * tile.warps)
    return row(fused_name(tile), loop_opcodes(machine_code(kernel)), weights, kernel)


def row(name: str, ops: Counter, weights: float, kernel=None) -> dict:
    """A kernel's loop: its instructions, those a weight, the commonest; and the shared memory
    a program takes, where the compiled kernel is given."""
    total = sum(ops.values())
    found = {
        "kernel": name,
        "loop_instructions": total,
        "per_weight": round(total / weights, 2),
        "top": dict(ops.most_common(6)),
    }
    return found | ({"shared_bytes": kernel.metadata.shared} if kernel else {})


def rows(arch: int = 90) -> list[dict]:
    """The served one-token GEMV tiles; split-K and fused tiles, plain, with PTX weights, and
    with those two groups a step; the 64-token PTX tiles with tokens on the M side."""
    from replica.ops import tables

    one_token = tables.INT4_LINEAR_WIDE.choose(1)
    gemv = [gemv_row(one_token.tile, False, arch), gemv_row(one_token.gated, True, arch)]
    gemv += [gemv_row(one_token.shallow, False, arch)] if one_token.shallow else []
    gemv += [gemv_row(replace(one_token.tile, prefetch=True), False, arch)]
    tiles = [SplitKTile(m, n, w, 3) for m, n in ((16, 128), (64, 64)) for w in (4, 2)]
    fused = [tables.FUSED_16, tables.FUSED_16_W2, tables.FUSED_32_W2]
    tiles += [replace(t, ptx=True) for t in tiles]
    tiles += [replace(t, two_groups=True) for t in tiles if t.ptx]
    tiles += [replace(t, tokens_on_m=True) for t in tiles if t.ptx and t.tokens == 64]
    fused += [replace(t, ptx=True) for t in fused]
    fused += [replace(t, two_groups=True) for t in fused if t.ptx]
    return gemv + [splitk_row(t, arch) for t in tiles] + [fused_row(t, arch) for t in fused]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the rows here too")
    parser.add_argument("--arch", type=int, default=90, help="sm_<arch>: 90 (H100), 80 (A100)")
    args = parser.parse_args()
    found = rows(args.arch)
    for r in found:
        print(f"{r['kernel']:<28} {r['loop_instructions']:>5} {r['per_weight']:>6}  {r['top']}")
    if args.json:
        report = {"triton": triton.__version__, "arch": f"sm_{args.arch}", "rows": found}
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
