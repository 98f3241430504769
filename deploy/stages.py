"""The pipeline stages of a deployment's replica, printed by `deploy.sh --dry-run` after
deploy/systems.py's settings. Standard library only, like systems.py.

A model whose weights (and the assumed overhead) overflow one GPU spans the container's GPUs as
pipeline stages of one replica (`systems.Deployment.pipeline_parallel_size`, server.py's
`--pipeline-parallel-size`). The layers split by the engine's own rule, imported from
replica/wire/stages.py (standard library only too): weights as even as whole layers allow, the
embedding on the first stage and the LM head on the last. Every stage holds the same KV blocks,
each for its own layers: as many as the fullest GPU's memory left after its weights holds.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import systems  # beside this file, like deploy/timeline.py's import

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project root
from replica.wire.stages import split_layers  # torch-free, stdlib only


@dataclass(frozen=True)
class StagePlan:
    """`stages` stages of the model `shape` describes, one an A100-80GB; `table_bytes`: the
    embedding's (and the head's: the same size, tied or not)."""

    shape: systems.Shape
    table_bytes: int
    tied: bool
    stages: int

    @property
    def layer_bytes(self) -> float:
        tables = self.table_bytes * (1 if self.tied else 2)
        return (self.shape.weight_bytes - tables) / self.shape.layers

    def layers(self) -> list[range]:
        size = self.table_bytes
        return split_layers(self.shape.layers, self.stages, self.layer_bytes, size, size)

    def weight_bytes(self) -> list[int]:
        """Each GPU's: its layers, the embedding (first), the head (last; a tied one again)."""
        spans = self.layers()
        return [
            int(len(span) * self.layer_bytes)
            + self.table_bytes * ((i == 0) + (i == len(spans) - 1))
            for i, span in enumerate(spans)
        ]

    def blocks(self) -> int:
        """The replica's blocks: the fewest any GPU holds for its layers."""
        per_layer = systems.BLOCK_SIZE * self.shape.kv_bytes_per_token // self.shape.layers
        fits = []
        for span, weights in zip(self.layers(), self.weight_bytes(), strict=True):
            free = systems.GPU_MEMORY_BYTES - weights - systems.OVERHEAD_ESTIMATE_BYTES
            budget = max(0, int(free * systems.KV_FRACTION))
            fits.append(systems.blocks_in(budget, per_layer * len(span)))
        return min(fits)

    @classmethod
    def of(cls, deployment: systems.Deployment) -> StagePlan | None:
        plan, path = deployment.block_plan(), systems.vendored_config(deployment.model)
        if plan is None or path is None:
            return None
        shape, config = plan.shape, json.loads(path.read_text())
        table = config["vocab_size"] * config["hidden_size"] * 2
        tied = bool(config.get("tie_word_embeddings"))
        return cls(shape, table, tied, deployment.pipeline_parallel_size)


def lines(deployment: systems.Deployment) -> list[str]:
    plan = StagePlan.of(deployment)
    out = [f"pipeline_parallel_size: {deployment.pipeline_parallel_size}"]
    if plan is None or plan.stages == 1:
        return out
    tokens = plan.blocks() * systems.BLOCK_SIZE
    for gpu, (span, weights) in enumerate(zip(plan.layers(), plan.weight_bytes(), strict=True)):
        holds = ["embedding"] * (gpu == 0) + ["final norm, LM head"] * (gpu == plan.stages - 1)
        out.append(
            f"stage_{gpu}: GPU {gpu}, layers {span.start}-{span.stop - 1}"
            + (f" with the {' and '.join(holds)}" if holds else "")
            + f", weights {weights / systems.GiB:.1f} GiB (estimate)"
        )
    out += [
        f"kv_blocks_per_gpu: {plan.blocks()} (every stage the same blocks, for its own layers; "
        f"{systems.KV_FRACTION:g} x (80 GiB - its weights - "
        f"{systems.OVERHEAD_ESTIMATE_BYTES // systems.GiB} GiB), the fuller GPU's; estimate)",
        f"kv_tokens_per_gpu: {tokens} (the two GPUs hold the two halves of the same tokens)",
        f"rows_at_1000_tokens: {min(systems.MAX_BATCH, tokens // 1000)} (the one replica's)",
    ]
    return out


if __name__ == "__main__":
    print("\n".join(lines(systems.Deployment.from_env(os.environ))))
