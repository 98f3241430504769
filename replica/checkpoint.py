"""Resolve a `--model` argument to a config, a tokenizer directory and weights, and read them.

`tiny-random` is a seeded, tiny Qwen3 (same architecture class) with the real Qwen3 tokenizer:
the offline demo and the test model. Every process that builds it gets identical weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig, Qwen3Config

from replica.servable import config_from_dict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VENDORED_TOKENIZER = PROJECT_ROOT / "vendor" / "qwen3-tokenizer"
VENDORED_CONFIGS = PROJECT_ROOT / "vendor" / "configs"
TINY_RANDOM = "tiny-random"
TINY_RANDOM_SEED = 0
# Hub repos keep the chat template in tokenizer_config.json or in chat_template.jinja.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model's pieces live. `weights_dir` is None for randomly initialised weights."""

    name: str
    config: PretrainedConfig  # Qwen3Config or Qwen3MoeConfig
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
    (with `random_weights`), or a Hugging Face id, downloaded once into the local cache. A config
    of a family we do not serve raises `UnsupportedModel`.
    """
    if model == TINY_RANDOM:
        return ModelSource(TINY_RANDOM, tiny_random_config(), VENDORED_TOKENIZER, None)
    path = Path(model)
    if not path.is_dir():
        path = _download(model, config_only=random_weights)
    config = config_from_dict(json.loads((path / "config.json").read_text()))
    has_tokenizer = (path / "tokenizer.json").exists()
    return ModelSource(
        name=model,
        config=config,
        tokenizer_dir=path if has_tokenizer else VENDORED_TOKENIZER,
        weights_dir=None if random_weights else path,
    )


def _download(repo_id: str, config_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["config.json"] if config_only else DOWNLOAD_PATTERNS
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


class CheckpointReader:
    """A checkpoint's tensors by Hugging Face name, each read only when taken.

    Reading on demand lets the loader build one layer at a time, so the host never holds more
    than a layer's worth of source tensors. It remembers what was taken, so that tensors the
    model never used can be reported instead of silently ignored.
    """

    def __init__(self, loaders: dict[str, Callable[[], torch.Tensor]]) -> None:
        self._loaders = loaders
        self._taken: set[str] = set()

    @classmethod
    def from_dir(cls, weights_dir: Path) -> CheckpointReader:
        from safetensors import safe_open

        loaders: dict[str, Callable[[], torch.Tensor]] = {}
        for shard in sorted(weights_dir.glob("*.safetensors")):
            handle = safe_open(str(shard), framework="pt", device="cpu")
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                loaders[name] = _getter(handle, name)
        if not loaders:
            raise FileNotFoundError(f"no *.safetensors in {weights_dir}")
        return cls(loaders)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> CheckpointReader:
        return cls({name: (lambda t=tensor: t) for name, tensor in state.items()})

    @property
    def names(self) -> set[str]:
        return set(self._loaders)

    def take(self, name: str) -> torch.Tensor:
        if name not in self._loaders:
            raise KeyError(f"checkpoint tensor {name} is missing")
        self._taken.add(name)
        return self._loaders[name]()

    def untaken(self) -> set[str]:
        return self.names - self._taken


def _getter(handle, name: str) -> Callable[[], torch.Tensor]:
    return lambda: handle.get_tensor(name)


def build_reference_model(source: ModelSource, dtype: torch.dtype = torch.float32):
    """transformers' model for `source` (dense or MoE): the test oracle."""
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

    if source.weights_dir is not None:
        return AutoModelForCausalLM.from_pretrained(source.weights_dir, dtype=dtype).eval()
    torch.manual_seed(TINY_RANDOM_SEED)
    return Qwen3ForCausalLM(source.config).to(dtype).eval()


def rope_theta(config: PretrainedConfig) -> float:
    """transformers 5 keeps theta in `rope_parameters`; older configs carry `rope_theta`."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10_000.0)))


def attention_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim); Qwen3 sets head_dim explicitly (128 for 4B)."""
    q_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    return q_heads, config.num_key_value_heads, head_dim
