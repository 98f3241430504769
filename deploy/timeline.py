"""`deploy.sh --dry-run`'s timeline: when a system answers /ready, step by step, on a fresh
workspace (no image built, nothing in the weights volume) and on a warm one (a redeploy).

Every duration is an estimate from the assumptions below; none is measured on Modal (nothing
here reaches it), and each says where its range comes from. Standard library only, like
systems.py, which it reads the deployment and the model's size from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import systems  # beside this file, like deploy/modal_app.py's import

GRADER_SETUP_MIN = 5  # the course queries five minutes after it starts deploy.sh


@dataclass(frozen=True)
class Assumption:
    low: float
    high: float
    unit: str
    source: str

    @property
    def span(self) -> tuple[float, float]:
        return self.low, self.high

    def __str__(self) -> str:
        return f"{self.low:g}-{self.high:g} {self.unit} ({self.source})"


ASSUMPTIONS = {
    "download": Assumption(
        0.15, 0.35, "GB/s", "Hugging Face Hub into the volume: issue 23's 3-7 min for 61 GB"
    ),
    "volume_read": Assumption(
        0.5,
        1.0,
        "GB/s",
        "volume to GPU, each replica its own copy: issue 23's 1-2 min for 61 GB; 1.02 GB/s "
        "measured from local disk on an H100 (docs/DEPLOY.md)",
    ),
    "image_build": Assumption(
        2, 5, "min", "serving image, torch + CUDA wheels and requirements: issue 23's estimate"
    ),
    "fill_start": Assumption(
        0.5, 1.5, "min", "the fill's small image (huggingface-hub) and its CPU container"
    ),
    "redeploy": Assumption(0.2, 0.5, "min", "`modal deploy` with every image layer cached"),
    "gpu_start": Assumption(
        0.5, 2, "min", "2 x A100-80GB scheduled and the image pulled: issue 23's estimate"
    ),
    "replica_start": Assumption(
        0.3,
        1,
        "min",
        "imports, tokenizer, KV, CUDA graphs once loaded: 17.4 s measured for the MoE replica "
        "on an H100 (docs/PERF.md); more on an A100 from a cold image",
    ),
}


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    low: float  # minutes
    high: float
    after: tuple[str, ...] = ()


def transfer(size_gb: float, rate: Assumption) -> tuple[float, float]:
    """Minutes to move `size_gb` at the assumed GB/s: the low time at the high rate."""
    return size_gb / rate.high / 60, size_gb / rate.low / 60


def steps(size_gb: float, fresh: bool, stages: int = 1) -> list[Step]:
    """The deploy's steps and what each waits for; the rest runs side by side. `stages`: a
    replica's pipeline stages (2: one replica over both GPUs, each stage reading its half)."""
    a = ASSUMPTIONS
    gb = f"{size_gb:.1f} GB"
    if fresh:
        load_after: tuple[str, ...] = ("wake", "fill")
        deploy = Step(
            "deploy",
            "modal deploy builds the serving image and deploys the app",
            *a["image_build"].span,
        )
        start, download = a["fill_start"], transfer(size_gb, a["download"])
        fill = Step(
            "fill",
            f"beside it, the detached fill: its image and container, then {gb} from the Hub",
            start.low + download[0],
            start.high + download[1],
        )
    else:
        load_after = ("wake",)  # the marker is already in the volume
        deploy = Step(
            "deploy",
            "modal deploy, every image layer cached",
            *a["redeploy"].span,
        )
        fill = Step(
            "fill",
            "beside it, the detached fill finds the marker and returns; nothing waits for it",
            *a["fill_start"].span,
        )
    load = transfer(size_gb, a["volume_read"])
    who_loads = (
        f"both replicas load {gb} each"
        if stages == 1
        else f"the replica's {stages} stages load {gb} in all, each its own layers,"
    )
    return [
        deploy,
        fill,
        Step(
            "wake",
            "deploy.sh's first /ready request wakes the container: GPUs scheduled, image pulled",
            *a["gpu_start"].span,
            ("deploy",),
        ),
        Step(
            "load",
            f"the marker is in: {who_loads} from the volume",
            *load,
            load_after,
        ),
        Step(
            "start",
            "replicas start up; /ready answers 200 and deploy.sh prints the endpoint",
            *a["replica_start"].span,
            ("load",),
        ),
    ]


def schedule(plan: list[Step]) -> dict[str, tuple[float, float, float, float]]:
    """Each step's earliest start and end, low and high: a step starts when all it waits for
    has ended (low with low, high with high)."""
    times: dict[str, tuple[float, float, float, float]] = {}
    for step in plan:
        start_low = max((times[name][2] for name in step.after), default=0.0)
        start_high = max((times[name][3] for name in step.after), default=0.0)
        times[step.name] = (start_low, start_high, start_low + step.low, start_high + step.high)
    return times


def lines(model: str, size_gb: float, stages: int = 1) -> list[str]:
    """The timeline as `key: value` lines, like the rest of the dry run."""
    out = [f"timeline: minutes after deploy.sh starts, low-high, for {model} ({size_gb:.1f} GB)"]
    out += [f"assumed {name}: {value}" for name, value in ASSUMPTIONS.items()]
    for workspace, fresh in (("fresh", True), ("warm", False)):
        plan = steps(size_gb, fresh, stages)
        times = schedule(plan)
        for number, step in enumerate(plan, 1):
            start_low, start_high, end_low, end_high = times[step.name]
            out.append(
                f"{workspace} step {number}: {start_low:.1f}-{start_high:.1f} to "
                f"{end_low:.1f}-{end_high:.1f} min: {step.what}"
            )
        ready_low, ready_high = max(t[2] for t in times.values()), max(t[3] for t in times.values())
        out.append(
            f"{workspace} ready: {ready_low:.1f}-{ready_high:.1f} min (the course queries after "
            f"{GRADER_SETUP_MIN})"
        )
    return out


if __name__ == "__main__":
    deployment = systems.Deployment.from_env(os.environ)  # systems.py has already checked it
    # the checkpoint's own size: a 4-bit build's, or the 16-bit one that --quantize reads
    found = systems.vendored_shape(
        deployment.model, bool(systems.FOUR_BIT.search(deployment.model))
    )
    if found is None:
        print(f"timeline: not estimated (no vendored config for {deployment.model}: size unknown)")
    else:
        size_gb = found[0].weight_bytes / 1e9
        print("\n".join(lines(deployment.model, size_gb, deployment.pipeline_parallel_size)))
