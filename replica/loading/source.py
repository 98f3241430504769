"""Resolve a `--model` argument to a config, a tokenizer directory and a weights directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig

from replica.loading.config import config_from_dict, tiny_random_config
from replica.tokenization import PromptCodec
from replica.wire.messages import SamplingParams

PROJECT_ROOT = Path(__file__).resolve().parents[2]
VENDORED_TOKENIZER = PROJECT_ROOT / "vendor" / "qwen3-tokenizer"
VENDORED_CONFIGS = PROJECT_ROOT / "vendor" / "configs"
THINKING_TEMPLATE = PROJECT_ROOT / "vendor" / "qwen3-thinking-2507-template"
TINY_RANDOM = "tiny-random"
TINY_RANDOM_THINKING = "tiny-random-thinking"  # tiny-random with the Thinking-2507 template
# Hub repos keep the chat template in tokenizer_config.json or in chat_template.jinja.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model's pieces live. `weights_dir` is None for randomly initialised weights."""

    name: str
    config: PretrainedConfig  # Qwen3Config or Qwen3MoeConfig
    tokenizer_dir: Path
    weights_dir: Path | None
    chat_template: str | None = None  # replaces the tokenizer's own (tiny-random-thinking)
    # The checkpoint's sampling settings (generation_config.json), None when it sets none
    sampling_defaults: SamplingParams | None = None

    def codec(self) -> PromptCodec:
        """The model's prompt codec: its tokenizer and chat template."""
        return PromptCodec(self.tokenizer_dir, self.chat_template)


def resolve(model: str, random_weights: bool = False) -> ModelSource:
    """Map a model argument to its source.

    `model` is `tiny-random` (or `tiny-random-thinking`, the same with an always-thinking
    template), a local checkpoint dir (config.json + safetensors), a config-only dir
    (with `random_weights`), or a Hugging Face id, downloaded once into the local cache. A config
    of a family we do not serve raises `UnsupportedModel`.
    """
    if model == TINY_RANDOM:
        return ModelSource(TINY_RANDOM, tiny_random_config(), VENDORED_TOKENIZER, None)
    if model == TINY_RANDOM_THINKING:
        settings = json.loads((THINKING_TEMPLATE / "tokenizer_config.json").read_text())
        return ModelSource(
            model, tiny_random_config(), VENDORED_TOKENIZER, None, settings["chat_template"]
        )
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
        sampling_defaults=sampling_defaults(path / "generation_config.json"),
    )


def sampling_defaults(path: Path) -> SamplingParams | None:
    """The temperature, top_p and top_k a checkpoint recommends (Thinking-2507: 0.6, 0.95,
    20), None when its generation_config.json is absent or sets none of them; one it leaves
    out keeps a request's default."""
    if not path.exists():
        return None
    found = json.loads(path.read_text())
    if not any(found.get(name) is not None for name in ("temperature", "top_p", "top_k")):
        return None
    return SamplingParams(
        temperature=float(found.get("temperature") or 1.0),
        top_p=float(found.get("top_p") or 1.0),
        top_k=int(found.get("top_k") or 0),
    )


def _download(repo_id: str, config_only: bool) -> Path:
    from huggingface_hub import snapshot_download  # only a Hub id needs it

    patterns = ["config.json", "generation_config.json"] if config_only else DOWNLOAD_PATTERNS
    return Path(snapshot_download(repo_id, allow_patterns=patterns))
