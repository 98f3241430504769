"""The 4-bit GEMV compiled for the A100 (sm_80) and the H100 (sm_90) on the CPU, in every way a
decode step launches it: Triton's interpreter runs what a GPU compile may refuse (a one-token
path once returned differently shaped values from a constexpr branch and compiled only in the
interpreter). And the one-token loop's instructions a weight, counted from the machine code."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from benchmarks import int4_sass
from replica.kernels.int4_gemv import GemvTile, _w4a16_gemv_kernel
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
}


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("launch", LAUNCHES)
def test_the_gemv_compiles_for_the_gpu_in_every_launch(launch: str, arch: int):
    tile = GemvTile(16, 4, 4)
    constants = dict(OUTPUTS_PER_TOKEN=1, GROUP=128, SPLIT_K=1, BLOCK_N=tile.features)
    constants |= dict(GROUPS=tile.groups, TOKENS=1, PER_OUTPUT_EXPERT=False, BUCKETED=False)
    constants |= dict(GATED=False, ROUTED=False) | LAUNCHES[launch]
    code = int4_sass.sass(_w4a16_gemv_kernel, constants, tile.warps, tile.stages, arch)
    assert sum(int4_sass.loop_opcodes(code).values()) > 50


def test_the_served_one_token_gemv_stays_lean():
    """Four sets of rows sharing x, high nibbles from the whole pair: 4.7 instructions a weight
    at Triton 3.9 (exact halves: 5.2; the GEMV before: 7.8)."""
    one_token = tables.INT4_LINEAR_WIDE.choose(1)
    for row in (
        int4_sass.gemv_row(one_token.tile, False),
        int4_sass.gemv_row(one_token.gated, True),
    ):
        assert row["per_weight"] < 5.0, row
