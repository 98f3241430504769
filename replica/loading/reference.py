"""transformers' own model for a source: the oracle our forward is tested against, and the
seeded weights of `tiny-random`."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

from replica.loading.source import ModelSource

TINY_RANDOM_SEED = 0


def build_reference_model(source: ModelSource, dtype: torch.dtype = torch.float32):
    """transformers' model for `source` (dense or MoE): its checkpoint, else seeded random weights
    (every process that builds it gets identical ones)."""
    if source.weights_dir is not None:
        return AutoModelForCausalLM.from_pretrained(source.weights_dir, dtype=dtype).eval()
    torch.manual_seed(TINY_RANDOM_SEED)
    return Qwen3ForCausalLM(source.config).to(dtype).eval()
