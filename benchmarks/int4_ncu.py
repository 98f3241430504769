"""The 4-bit projections under Nsight Compute: our served paths and tinygemm on the 4B's gate_up
and qkv at 1, 8 and 64 tokens, each launched twice, then ncu's CSV condensed to a line a kernel.

    ncu --clock-control none -k regex:'gemv|splitk|tinygemm' --csv --metrics "$(python3 -m \
        benchmarks.int4_ncu --metrics)" python3 -m benchmarks.int4_ncu --launch > ncu.csv
    python3 -m benchmarks.int4_ncu --table ncu.csv

Why a kernel is slow, where timing alone cannot say: how busy the memory and the issue slots
are, how many warps stay resident, what the warps wait on (PERF.md, issue 36's fifth session).
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

SHORT = {
    "gpu__time_duration.sum": "ns",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram%",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm%",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue%",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "resident%",
    "launch__registers_per_thread": "regs",
    "launch__grid_size": "grid",
    "smsp__inst_executed.sum": "inst",
}
STALLS = ("long_scoreboard", "lg_throttle", "mio_throttle", "short_scoreboard", "barrier")
STALLS += ("wait", "math_pipe_throttle")


def metrics() -> str:
    """ncu's --metrics: SHORT's and the warps' stall reasons per issued instruction."""
    stalls = [f"smsp__average_warps_issue_stalled_{s}_per_issue_active.ratio" for s in STALLS]
    return ",".join([*SHORT, *stalls])


def launch() -> None:
    """The served path, tinygemm, and the split-K tile at 64 tokens, twice each (the first call
    compiles)."""
    import torch

    from replica.ops import tinygemm
    from replica.ops.linear import TritonLinear
    from replica.ops.packed import random_packed

    gen = torch.Generator("cuda").manual_seed(0)
    served = TritonLinear()
    for n, k in ((19456, 2560), (6144, 2560)):  # gate_up, qkv
        weight = random_packed((n, k), 0.02, torch.bfloat16, gen)
        converted = tinygemm.convert(weight, torch.bfloat16)
        for tokens in (1, 8, 64):
            x = torch.randn(tokens, k, device="cuda", generator=gen).to(torch.bfloat16)
            for _ in range(2):
                served(x, weight)
                tinygemm.matmul(x, converted)
    torch.cuda.synchronize()


def table(path: Path) -> list[str]:
    """A line a profiled kernel: SHORT's values and its three largest stall reasons."""
    rows: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    lines = [line for line in path.read_text().splitlines() if line.startswith('"')]
    for row in csv.DictReader(lines):
        rows[(row["ID"], row["Kernel Name"][:40])][row["Metric Name"]] = row["Metric Value"]
    out = []
    for (kernel_id, name), values in rows.items():
        stalls = {
            key.split("stalled_")[1].split("_per")[0]: float(value.replace(",", ""))
            for key, value in values.items()
            if "stalled" in key
        }
        top = sorted(stalls.items(), key=lambda item: -item[1])[:3]
        shown = {SHORT[key]: value for key, value in values.items() if key in SHORT}
        out.append(f"{kernel_id} {name} {shown} {[(s, round(v, 2)) for s, v in top]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--metrics", action="store_true", help="print ncu's --metrics list")
    what.add_argument("--launch", action="store_true", help="run the kernels (under ncu)")
    what.add_argument("--table", type=Path, help="condense ncu's CSV")
    args = parser.parse_args()
    if args.metrics:
        print(metrics())
    elif args.launch:
        launch()
    else:
        print("\n".join(table(args.table)))


if __name__ == "__main__":
    main()
