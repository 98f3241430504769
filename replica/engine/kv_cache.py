"""The KV cache: one allocation after the weights, cut into fixed-size blocks.

Layout per layer is [blocks + 1, block_size, kv_heads, head_dim] for K and for V (the layout of
flash-attn's paged cache). Token t of a sequence lives in block `blocks[t // block_size]` at
offset t % block_size; its flat slot is block * block_size + offset. The extra last block is
scratch: padding rows of a fixed-size decode batch write there, so they never touch a live
sequence's block. Who holds which block is the scheduler's (replica.engine.blocks); this module
sizes and holds the tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from replica.model.architecture import attention_shape
from replica.ops.attention import LayerCache

log = logging.getLogger(__name__)

BLOCK_SIZE = 16  # tokens a block holds (flash-attn's paged kernels need multiples of 256)


@dataclass(frozen=True)
class CacheShape:
    layers: int
    blocks: int
    block_size: int
    kv_heads: int
    head_dim: int

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_size


def bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """K and V of one token over all layers."""
    _, kv_heads, head_dim = attention_shape(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize


def plan_blocks(
    config: PretrainedConfig,
    dtype: torch.dtype,
    devices: list[torch.device],
    layers: list[int],
    block_size: int,
    cpu_blocks: int,
    fraction: float,
    memory_cap_gib: float | None = None,
) -> list[CacheShape]:
    """Each stage's cache (`layers[i]` layers on `devices[i]`; one stage: the whole model), all
    with the same blocks, as many as fit in `fraction` of the free memory of the fullest GPU,
    which holds the KV of every stage placed on it (CPU: `cpu_blocks`).

    `memory_cap_gib` makes each card look that large (e.g. 79 on a 141 GB H200 to plan as an
    A100-80GB would): what is already in use counts against the cap."""
    blocks = cpu_blocks
    if devices[0].type == "cuda":
        layer_block = block_size * bytes_per_token(config, dtype) // config.num_hidden_layers
        fits = []
        for device in dict.fromkeys(devices):
            held = sum(n for d, n in zip(devices, layers, strict=True) if d == device)
            free = device_free_bytes(device, memory_cap_gib)
            fits.append(blocks_that_fit(int(free * fraction), held * layer_block))
            if fits[-1] < 1:
                raise RuntimeError(
                    f"KV cache: {free / 2**30:.1f} GiB free on {device} holds no block"
                )
        blocks = min(fits)
    _, kv_heads, head_dim = attention_shape(config)
    return [CacheShape(n, blocks, block_size, kv_heads, head_dim) for n in layers]


def blocks_that_fit(budget_bytes: int, block_bytes: int) -> int:
    """Whole blocks in the budget, less the scratch block (deploy/systems.py plans with the
    same rule; tests/test_structure.py holds the two together)."""
    return budget_bytes // block_bytes - 1


def device_free_bytes(device: torch.device, cap_gib: float | None = None) -> int:
    """Free device memory after returning the allocator's cached blocks (the loader's and the
    warm-up's temporaries would otherwise be counted as used), at most the cap minus what is used."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    if cap_gib is None:
        return free
    return max(0, min(free, int(cap_gib * 2**30) - (total - free)))


class KVCache:
    """K/V tensors per layer, and the scratch block that decode padding rows write to."""

    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = shape
        dims = (shape.layers, 2, shape.blocks + 1, shape.block_size, shape.kv_heads, shape.head_dim)
        self.data = torch.zeros(dims, dtype=dtype, device=device)
        self.scratch_block = shape.blocks
        log.info(
            "KV cache: %d blocks x %d tokens = %d tokens, %.1f GiB",
            shape.blocks,
            shape.block_size,
            shape.tokens,
            self.nbytes / 2**30,
        )

    @property
    def block_size(self) -> int:
        return self.shape.block_size

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy block `source` to block `destination` in every layer, for each pair (a forked
        sample's own copy of a partly filled block)."""
        source, destination = torch.tensor(pairs, device=self.data.device).unbind(1)
        self.data[:, :, destination] = self.data[:, :, source]

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self.data[index, 0], self.data[index, 1])
