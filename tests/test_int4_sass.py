"""The 4-bit kernels compiled for the A100 (sm_80) and the H100 (sm_90) on the CPU: the GEMV in
every way a decode step launches it, the split-K tile and the fused experts on the matrix units.
Triton's interpreter runs what a GPU compile may refuse (a one-token path once returned
differently shaped values from a constexpr branch and compiled only in the interpreter). And the
one-token loop's instructions a weight, counted from the machine code."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("triton")

from benchmarks import int4_sass
from replica.kernels.int4_gemv import GemvTile, _w4a16_gemv_kernel
from replica.kernels.int4_splitk import SplitKTile, _splitk_kernel
from replica.kernels.moe_fused import _fused_down_kernel, _fused_up_kernel
from replica.ops import tables

if not (int4_sass.BINARIES / "cuobjdump").exists():
    pytest.skip("triton without its NVIDIA binaries", allow_module_level=True)

LAUNCHES = {  # the constexprs a launch sets, beyond one token through one matrix
    "projection": {},
    "gate_up": {"GATED": True},
    "split_k": {"SPLIT_K": 2},
    "expert_gate_up": {"PER_OUTPUT_EXPERT": True, "GATED": True, "OUTPUTS_PER_TOKEN": 8},
    "expert_down": {"PER_OUTPUT_EXPERT": True, "ROUTED": True},
    "bucketed_gate_up": {"BUCKETED": True, "GATED": True, "TOKENS": 2},
    "prefetch": {"PREFETCH": True},
    "expert_gate_up_prefetch": {
        "PER_OUTPUT_EXPERT": True,
        "GATED": True,
        "OUTPUTS_PER_TOKEN": 8,
        "PREFETCH": True,
    },
}


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("launch", LAUNCHES)
def test_the_gemv_compiles_for_the_gpu_in_every_launch(launch: str, arch: int):
    tile = GemvTile(16, 4, 4)
    constants = dict(OUTPUTS_PER_TOKEN=1, GROUP=128, SPLIT_K=1, BLOCK_N=tile.features)
    constants |= dict(GROUPS=tile.groups, TOKENS=1, PER_OUTPUT_EXPERT=False, BUCKETED=False)
    constants |= dict(GATED=False, ROUTED=False, PREFETCH=False) | LAUNCHES[launch]
    code = int4_sass.sass(_w4a16_gemv_kernel, constants, tile.warps, tile.stages, arch)
    assert sum(int4_sass.loop_opcodes(code).values()) > 50


def _defaults(kernel, constants: dict) -> dict:
    """The split-K kernel's GATED and TWO_GROUPS, the fused kernels' TWO: False unless given."""
    if kernel is _splitk_kernel:
        return {"GATED": False, "TWO_GROUPS": False, "TOKENS_ON_M": False} | constants
    return {"TWO": False} | constants


PLAIN = {  # the matrix-unit kernels: (kernel, constexprs, warps); 4 warps take wgmma on sm_90
    "splitk": (_splitk_kernel, dict(GROUP=128, SPLIT_K=2, BLOCK_M=16, BLOCK_N=128), 4),
    "splitk_gated": (
        _splitk_kernel,
        dict(GROUP=128, SPLIT_K=1, BLOCK_M=16, BLOCK_N=128, GATED=True),
        4,
    ),
    "splitk_whole_k": (_splitk_kernel, dict(GROUP=128, SPLIT_K=1, BLOCK_M=64, BLOCK_N=64), 4),
    "splitk_2_warps": (_splitk_kernel, dict(GROUP=128, SPLIT_K=2, BLOCK_M=64, BLOCK_N=64), 2),
    "splitk_wide": (_splitk_kernel, dict(GROUP=128, SPLIT_K=2, BLOCK_M=64, BLOCK_N=128), 4),
    "fused_up": (_fused_up_kernel, dict(TOP_K=8, GROUP=128, BLOCK_M=16, BLOCK_N=64), 4),
    "fused_down": (_fused_down_kernel, dict(GROUP=128, BLOCK_M=32, BLOCK_N=128), 4),
    "fused_up_2_warps": (_fused_up_kernel, dict(TOP_K=8, GROUP=128, BLOCK_M=16, BLOCK_N=64), 2),
    "fused_down_2_warps": (_fused_down_kernel, dict(GROUP=128, BLOCK_M=32, BLOCK_N=128), 2),
}
TILES = {  # each plain, and with its weights made in packed 16-bit PTX (replica.kernels.int4_ptx)
    f"{name}{'_ptx' * ptx}": (kernel, _defaults(kernel, constants) | {"PTX": ptx}, warps)
    for name, (kernel, constants, warps) in PLAIN.items()
    for ptx in (False, True)
}


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name", TILES)
def test_the_4bit_tiles_compile_for_the_gpu(name: str, arch: int):
    kernel, constants, warps = TILES[name]
    code = int4_sass.sass(kernel, constants, warps, 3, arch)
    mma = "HGMMA" if arch == 90 and warps == 4 else "HMMA"
    assert mma in code  # the dots run on the matrix units
    loop = int4_sass.loop_opcodes(code)
    packed = sum(n for op, n in loop.items() if op.startswith(("HFMA2", "HADD2", "HMUL2")))
    packs = sum(n for op, n in loop.items() if op.startswith("F2FP"))  # fp32 pairs to 16 bits
    if constants["PTX"]:  # the weights in packed 16-bit arithmetic, not through fp32 (Triton
        assert packed >= 32 and 32 * packs <= packed, loop  # 3.6 packs the groups' zero points)
    else:
        assert packed == 0 and packs >= 16, loop


@pytest.mark.parametrize("arch", [80, 90])
def test_the_ptx_weights_compile_for_fp16_activations(arch: int):
    constants = dict(GROUP=128, SPLIT_K=2, BLOCK_M=16, BLOCK_N=128, PTX=True)
    code = int4_sass.sass(
        _splitk_kernel, _defaults(_splitk_kernel, constants), 4, 3, arch, half="fp16"
    )
    loop = int4_sass.loop_opcodes(code)
    assert loop["HMUL2"] + loop["HFMA2"] > 0 and "BF16" not in " ".join(loop), loop


@pytest.mark.parametrize("arch", [80, 90])
def test_the_ptx_weights_take_a_third_fewer_instructions(arch: int):
    """Per weight in the split-K tile's loop (PERF.md, issue 36's eighth session: sm_90 5.48 ->
    3.56 at 16 x 128, 4 warps)."""
    for tokens, features in ((16, 128), (64, 64)):
        plain = SplitKTile(tokens, features, 4, 3)
        rows = [int4_sass.splitk_row(t, arch) for t in (plain, replace(plain, ptx=True))]
        assert rows[1]["per_weight"] < 0.8 * rows[0]["per_weight"], rows


TWO_GROUPS = ("splitk", "splitk_2_warps", "splitk_wide", "fused_up", "fused_down_2_warps")


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name", TWO_GROUPS)
def test_two_groups_a_step_load_both_groups_scales_before_the_first_dot(name: str, arch: int):
    """int4_splitk.span_dots' TWO: the loop takes twice the 2-byte scale and zero loads of one
    group a step, and issues them all before its first matrix op: one wait for two groups."""
    kernel, constants, warps = TILES[f"{name}_ptx"]
    two = "TWO_GROUPS" if kernel is _splitk_kernel else "TWO"
    loads = []
    for step in (False, True):
        ops = int4_sass.loop_ops(int4_sass.sass(kernel, constants | {two: step}, warps, 3, arch))
        first_dot = next(i for i, op in enumerate(ops) if "MMA" in op)
        scales = [i for i, op in enumerate(ops) if op.startswith("LDG.E.U16")]
        loads.append(len(scales))
        assert max(scales) < first_dot, ops
    assert loads[1] == 2 * loads[0] > 0, loads


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("features", [64, 128])
def test_tokens_on_m_chain_a_groups_wgmma_without_waits_on_sm90(features: int, arch: int):
    """group_dots' ON_M at 64 tokens: on sm_90 the group is one dot, its k-steps chained with
    one wait a group where the slabs' dots wait after each (7 in the loop); on sm_80 (mma.sync,
    no waits either way) it compiles."""
    constants = _defaults(_splitk_kernel, dict(GROUP=128, SPLIT_K=2, BLOCK_M=64, PTX=True))
    waits = []
    for on_m in (False, True):
        tile = constants | {"BLOCK_N": features, "TOKENS_ON_M": on_m}
        ops = int4_sass.loop_ops(int4_sass.sass(_splitk_kernel, tile, 4, 3, arch))
        assert any("MMA" in op for op in ops), ops
        waits.append(sum(op.startswith("WARPGROUP.DEPBAR") for op in ops))
    assert waits == ([7, 1] if arch == 90 else [0, 0]), waits


def test_the_served_one_token_gemv_stays_lean():
    """Four sets of rows sharing x, high nibbles from the whole pair: 4.7 instructions a weight
    at Triton 3.9 (exact halves: 5.2; the GEMV before: 7.8)."""
    one_token = tables.INT4_LINEAR_WIDE.choose(1)
    for row in (
        int4_sass.gemv_row(one_token.tile, False),
        int4_sass.gemv_row(one_token.gated, True),
    ):
        assert row["per_weight"] < 5.0, row
