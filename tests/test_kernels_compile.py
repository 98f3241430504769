"""Kernels a decode step launches in more than one way, compiled for the A100 (sm_80) and the H100
(sm_90) on the CPU in each: Triton's interpreter runs what a GPU compile may refuse (a name given
another shape in a branch once compiled only in the interpreter). Decode attention's split
kernel, whose splits merged in the launch draw a ticket by one atomic a program, after a barrier;
the one-launch MoE routing, with the layer's add + RMSNorm in it or not; the experts' pairs in one
launch."""

from __future__ import annotations

import itertools
import re

import pytest

pytest.importorskip("triton")

from benchmarks import int4_sass
from replica.kernels.decode_attention import _split_kernel
from replica.kernels.moe_pairs import _pairs_kernel
from replica.kernels.moe_route import _fused_route_kernel
from replica.ops import tables

if not (int4_sass.BINARIES / "cuobjdump").exists():
    pytest.skip("triton without its NVIDIA binaries", allow_module_level=True)

TYPES = {"table_ptr": "*i32", "row_ptr": "*i64", "len_ptr": "*i32", "part_ptr": "*fp32"}
TYPES |= {"lse_ptr": "*fp32", "ticket_ptr": "*i32", "inv_freq_ptr": "*fp32", "pos_ptr": "*i64"}
TYPES |= {"slot_ptr": "*i64", "scale": "fp32", "eps": "fp32"}


@pytest.mark.parametrize(
    ("arch", "group", "merged", "roped"),
    [(arch, group, *launch) for arch, group in ((80, 8), (90, 16), (90, 4))
     for launch in itertools.product((False, True), repeat=2)],
)  # fmt: skip
def test_the_split_kernel_compiles_each_way_a_step_launches_it(arch, group, merged, roped):
    constants = dict(GROUP=group, GROUP_PAD=max(16, group), HEAD_DIM=128, BLOCK=64)
    constants |= dict(BLOCK_SIZE=16, MERGE=merged, MERGE_HEADS=group, MERGE_SPLITS=4, ROPE=roped)
    code = int4_sass.sass(_split_kernel, constants, 4, 2, arch, types=TYPES)
    atomics = [line for line in code.splitlines() if "ATOMG" in line or "RED." in line]
    assert len(atomics) == (1 if merged else 0), atomics
    assert ("BAR.SYNC" in code) or not merged


@pytest.mark.parametrize(("arch", "normed"), [(80, True), (90, False), (90, True)])
def test_the_one_launch_routing_compiles_with_the_norm_or_without(arch: int, normed: bool):
    constants = dict(NORM=normed, TOP_K=8, NORMALIZE=True, SLICES=8, BLOCK_T=16, FILE_T=1)
    constants |= dict(BLOCK_E=128, BLOCK_K=8, ROWS=16, STEP=64)
    types = {"slices_ptr": "*fp32", "ticket_ptr": "*i32", "weights_ptr": "*fp32"}
    types |= {"experts_ptr": "*i32", "counts_ptr": "*i32", "bucket_ptr": "*i32", "eps": "fp32"}
    code = int4_sass.sass(_fused_route_kernel, constants, 4, 2, arch, types=types)
    assert len([line for line in code.splitlines() if "ATOMG" in line]) == 1


@pytest.mark.parametrize("arch", [80, 90])
def test_the_pairs_in_one_launch_compile_with_the_served_pair_tiles(arch: int):
    """Its atomics: a gate-up program's count (a reduction after a GPU-scope fence: release;
    RED on sm_80, REDG on sm_90), a down program's spin on it (a strong GPU-scope load, L1
    invalidated once after it: acquire), its own count, and the last's two resets."""
    up, down = tables.EXPERT_PAIRS.up, tables.EXPERT_PAIRS.down
    constants = dict(TOP_K=8, UP_GROUP=128, UP_N=up.features, UP_GROUPS=up.groups)
    constants |= dict(UP_PREFETCH=up.prefetch, DOWN_GROUP=128, DOWN_N=down.features)
    constants |= dict(DOWN_GROUPS=down.groups, DOWN_PREFETCH=down.prefetch)
    types = {"experts_ptr": "*i32", "route_ptr": "*fp32", "tickets_ptr": "*i32"}
    types |= {"up_qweight_ptr": "*i32", "down_qweight_ptr": "*i32"}
    code = int4_sass.sass(_pairs_kernel, constants, up.warps, up.stages, arch, types=types)
    lines = code.splitlines()
    assert len([line for line in lines if re.search(r"\bREDG?\.E\.ADD\.STRONG\.GPU", line)]) == 1
    assert len([line for line in lines if "ATOMG.E.ADD.STRONG.GPU" in line]) == 1
    assert len([line for line in lines if "ATOMG.E.EXCH.STRONG.GPU" in line]) == 2
    spin = next(i for i, line in enumerate(lines) if "LDG.E.STRONG.GPU" in line)
    back = next(i for i in range(spin, len(lines)) if "BRA" in lines[i])  # the spin's branch
    assert "CCTL" not in "".join(lines[spin:back]) and "CCTL.IVALL" in "".join(lines[back:][:16])
    assert "FFMA" in code  # the GEMV's sums
