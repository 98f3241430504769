"""How a replica's layers split into pipeline stages (`--pipeline-parallel-size`).

Torch-free: the front end checks the flag against the model's layers at start-up, and the
loader splits the layers with the same rule (deploy/systems.py mirrors it, standard library
only, and tests/test_deploy.py holds the two equal).
"""

from __future__ import annotations

from itertools import pairwise


def split_layers(
    layers: int, stages: int, layer_bytes: float, embed_bytes: float, head_bytes: float
) -> list[range]:
    """Contiguous layer ranges, one per stage, with weights as even as whole layers allow: the
    embedding counts on the first stage, the final norm's LM head on the last.

    Why weights alone: every stage holds the same number of KV blocks (one block table per
    replica) and a layer's KV is the same size on every stage, so stages with even weights on
    GPUs of equal memory also leave even room for KV; the replica's blocks are what the fullest
    GPU holds. Each stage keeps at least one layer."""
    check_stages(stages, layers)
    total = embed_bytes + layers * layer_bytes + head_bytes
    bounds = [0]
    for stage in range(1, stages):
        ideal = round((stage * total / stages - embed_bytes) / layer_bytes)
        bounds.append(min(max(ideal, bounds[-1] + 1), layers - (stages - stage)))
    bounds.append(layers)
    return [range(a, b) for a, b in pairwise(bounds)]


def check_stages(stages: int, layers: int) -> None:
    """Refuses, in one line, a stage count the model's layers cannot take."""
    if stages < 1:
        raise ValueError(f"--pipeline-parallel-size must be at least 1, not {stages}")
    if stages > layers:
        raise ValueError(f"--pipeline-parallel-size {stages} exceeds the model's {layers} layers")


def group_gpus(gpus: list[int], stages: int) -> list[tuple[int, ...]]:
    """--gpus in replicas of `stages` GPUs each, in order (0,1,2,3 at 2 stages: (0,1) and
    (2,3)); a GPU may repeat (0,0: both stages on GPU 0)."""
    if stages < 1:
        raise ValueError(f"--pipeline-parallel-size must be at least 1, not {stages}")
    if not gpus or len(gpus) % stages:
        raise ValueError(
            f"--gpus lists {len(gpus)} GPUs, not a multiple of --pipeline-parallel-size {stages}"
        )
    return [tuple(gpus[i : i + stages]) for i in range(0, len(gpus), stages)]
