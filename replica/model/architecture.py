"""What a Qwen3 config says about the shapes the forward computes with."""

from __future__ import annotations

from transformers import PretrainedConfig


def rope_theta(config: PretrainedConfig) -> float:
    """transformers 5 keeps theta in `rope_parameters`; older configs carry `rope_theta`."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10_000.0)))


def attention_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim); Qwen3 sets head_dim explicitly (128 for 4B)."""
    q_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    return q_heads, config.num_key_value_heads, head_dim
