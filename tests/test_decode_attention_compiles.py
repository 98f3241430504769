"""Decode attention's split kernel compiled for the A100 (sm_80) and the H100 (sm_90) on the CPU,
in each way a step launches it: Triton's interpreter runs what a GPU compile may refuse (a name
given another shape in a branch once compiled only in the interpreter). With its splits merged in
the launch, one atomic a program draws the ticket, after a barrier."""

from __future__ import annotations

import itertools

import pytest

pytest.importorskip("triton")

from benchmarks import int4_sass
from replica.kernels.decode_attention import _split_kernel

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
