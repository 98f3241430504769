"""A model's config through transformers' classes, refusing what our forward does not implement.

`tiny-random` is a seeded, tiny Qwen3 (same architecture class): the offline demo and the test
model, with the real Qwen3 tokenizer.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig, Qwen3Config, Qwen3MoeConfig

CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "qwen3": Qwen3Config,
    "qwen3_moe": Qwen3MoeConfig,
}


class UnsupportedModel(ValueError):
    """The model cannot be served by this engine; the message says why, in one line."""


def config_from_dict(raw: dict[str, Any]) -> PretrainedConfig:
    """The config through transformers' own class for its model_type (so that, for example,
    `num_experts` and `num_local_experts` read the same), refusing other families."""
    model_type = raw.get("model_type")
    if model_type not in CONFIG_CLASSES:
        served = ", ".join(CONFIG_CLASSES)
        raise UnsupportedModel(f"model_type {model_type!r} is not served (served: {served})")
    config = CONFIG_CLASSES[model_type].from_dict(raw)
    check_config(config)
    return config


def check_config(config: PretrainedConfig) -> None:
    """Refuse the options our forward does not implement rather than ignore them."""
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    problems = [
        (rope_type != "default", f"rope scaling {rope_type!r} (e.g. YaRN)"),
        (getattr(config, "attention_bias", False), "attention_bias"),
        (getattr(config, "use_sliding_window", False), "sliding-window attention"),
        (getattr(config, "hidden_act", "silu") != "silu", f"hidden_act {config.hidden_act!r}"),
    ]
    if config.model_type == "qwen3_moe":
        problems += [
            (bool(config.mlp_only_layers), "dense layers among the MoE layers (mlp_only_layers)"),
            (config.decoder_sparse_step != 1, "decoder_sparse_step other than 1"),
        ]
    for unsupported, what in problems:
        if unsupported:
            raise UnsupportedModel(f"{config.model_type} with {what} is not supported")


def tiny_random_config() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        initializer_range=0.2,  # large enough that greedy output depends on the prompt
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
    )
