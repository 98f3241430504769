"""The KV cache: one allocation after the weights, cut into per-request slots.

Layout per layer is [slots + 1, max_seq_len, kv_heads, head_dim], the layout
`flash_attn_with_kvcache` reads. The extra last slot is scratch: padding rows of a fixed-size
decode batch write there, so they never touch a live request's slot. Which request holds which
slot is the scheduler's business (replica.engine.slots); this module sizes and holds the tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PretrainedConfig

from replica.model.architecture import attention_shape

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheShape:
    layers: int
    slots: int
    max_seq_len: int
    kv_heads: int
    head_dim: int

    @property
    def tokens(self) -> int:
        return self.slots * self.max_seq_len


def bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """K and V of one token over all layers."""
    _, kv_heads, head_dim = attention_shape(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize


def plan_slots(
    config: PretrainedConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_seq_len: int,
    max_slots: int,
    fraction: float,
    memory_cap_gib: float | None = None,
) -> CacheShape:
    """Slots of `max_seq_len` tokens that fit in `fraction` of free GPU memory (CPU: `max_slots`).

    `memory_cap_gib` makes the card look that large (e.g. 79 on a 141 GB H200 to plan as an
    A100-80GB would): what is already in use counts against the cap."""
    slots = max_slots
    if device.type == "cuda":
        free = device_free_bytes(device, memory_cap_gib)
        per_slot = max_seq_len * bytes_per_token(config, dtype)
        slots = slots_that_fit(int(free * fraction), per_slot, max_slots)
        if slots < 1:
            raise RuntimeError(
                f"KV cache: {free / 2**30:.1f} GiB free holds no slot of {max_seq_len} tokens"
            )
    _, kv_heads, head_dim = attention_shape(config)
    return CacheShape(config.num_hidden_layers, slots, max_seq_len, kv_heads, head_dim)


def slots_that_fit(budget_bytes: int, slot_bytes: int, max_slots: int) -> int:
    """Whole slots in the budget, less the scratch slot, at most `max_slots` (deploy/systems.py
    plans with the same rule; tests/test_structure.py holds the two together)."""
    return min(max_slots, budget_bytes // slot_bytes - 1)


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
    """K/V tensors per layer, and the scratch slot that decode padding rows write to."""

    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = shape
        dims = (shape.layers, 2, shape.slots + 1, shape.max_seq_len, shape.kv_heads, shape.head_dim)
        self.data = torch.zeros(dims, dtype=dtype, device=device)
        self.scratch_slot = shape.slots
        log.info(
            "KV cache: %d slots x %d tokens = %d tokens, %.1f GiB",
            shape.slots,
            shape.max_seq_len,
            shape.tokens,
            self.nbytes / 2**30,
        )

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def layer(self, index: int) -> tuple[Tensor, Tensor]:
        return self.data[index, 0], self.data[index, 1]
