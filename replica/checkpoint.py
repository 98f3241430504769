"""Resolve a `--model` argument to a config, a tokenizer directory and weights.

`tiny-random` is a seeded, tiny Qwen3 (same architecture class) with the real Qwen3 tokenizer:
the offline demo and the test model. Every process that builds it gets identical weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen3Config

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VENDORED_TOKENIZER = PROJECT_ROOT / "vendor" / "qwen3-tokenizer"
VENDORED_CONFIGS = PROJECT_ROOT / "vendor" / "configs"
TINY_RANDOM = "tiny-random"
TINY_RANDOM_SEED = 0


@dataclass(frozen=True)
class ModelSource:
    """Where a model's pieces live. `weights_dir` is None for randomly initialised weights."""

    name: str
    config: Qwen3Config
    tokenizer_dir: Path
    weights_dir: Path | None


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


def resolve(model: str, random_weights: bool = False) -> ModelSource:
    """Map a model argument to its source.

    `model` is `tiny-random`, a local checkpoint dir (config.json + safetensors), a config-only dir
    (with `random_weights`), or a Hugging Face id, downloaded once into the local cache.
    """
    if model == TINY_RANDOM:
        return ModelSource(TINY_RANDOM, tiny_random_config(), VENDORED_TOKENIZER, None)
    path = Path(model)
    if not path.is_dir():
        path = _download(model, config_only=random_weights)
    config = Qwen3Config.from_dict(json.loads((path / "config.json").read_text()))
    has_tokenizer = (path / "tokenizer.json").exists()
    return ModelSource(
        name=model,
        config=config,
        tokenizer_dir=path if has_tokenizer else VENDORED_TOKENIZER,
        weights_dir=None if random_weights else path,
    )


def _download(repo_id: str, config_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["config.json"] if config_only else ["*.json", "*.safetensors", "*.txt"]
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def load_state_dict(
    weights_dir: Path, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint, keyed by their Hugging Face names."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(weights_dir.glob("*.safetensors")):
        state.update(load_file(str(shard), device=str(device)))
    if not state:
        raise FileNotFoundError(f"no *.safetensors in {weights_dir}")
    return state


def build_reference_model(source: ModelSource, dtype: torch.dtype = torch.float32):
    """transformers' Qwen3ForCausalLM for `source`: the reference backend and the test oracle."""
    from transformers import Qwen3ForCausalLM

    if source.weights_dir is not None:
        return Qwen3ForCausalLM.from_pretrained(source.weights_dir, dtype=dtype).eval()
    torch.manual_seed(TINY_RANDOM_SEED)
    return Qwen3ForCausalLM(source.config).to(dtype).eval()


def rope_theta(config: Qwen3Config) -> float:
    """transformers 5 keeps theta in `rope_parameters`; older configs carry `rope_theta`."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10_000.0)))


def attention_shape(config: Qwen3Config) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim); Qwen3 sets head_dim explicitly (128 for 4B)."""
    q_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    return q_heads, config.num_key_value_heads, head_dim
