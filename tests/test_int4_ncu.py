"""benchmarks.int4_ncu condenses Nsight Compute's CSV: checked on the run PERF.md quotes."""

from __future__ import annotations

from pathlib import Path

from benchmarks.int4_ncu import STALLS, metrics, table

RECORDED = Path(__file__).resolve().parent.parent / "docs" / "perf" / "int4-v2-h100-ncu.csv"


def test_the_metrics_ask_for_every_stall_reason_once():
    asked = metrics().split(",")
    assert len(asked) == len(set(asked)) == 8 + len(STALLS)
    assert all(any(f"stalled_{stall}_per" in name for name in asked) for stall in STALLS)


def test_a_line_a_kernel_with_its_numbers_and_largest_stalls():
    lines = table(RECORDED)
    assert len(lines) == 28  # 2 shapes x 2 calls x 7 kernels
    gemv, tinygemm = lines[0], lines[1]
    assert gemv.startswith("0 _w4a16_gemv_kernel") and "'ns': '24,576'" in gemv
    assert "'issue%': '72.52'" in gemv and "('long_scoreboard', 1.9)" in gemv
    assert "tinygemm" in tinygemm and "'inst': '9,961,472'" in tinygemm
