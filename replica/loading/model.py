"""The end of the loading chain: a source's weights on the device, as our Qwen3."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PretrainedConfig

from replica.loading.reader import CheckpointReader
from replica.loading.reference import build_reference_model
from replica.loading.source import TINY_RANDOM, ModelSource
from replica.loading.weights import RandomBuilder, build, load_checkpoint
from replica.model.ops import TorchOps
from replica.model.qwen3 import Qwen3


def load_model(
    source: ModelSource,
    device: str,
    dtype: torch.dtype,
    seed: int = 0,
    ops: type[TorchOps] = TorchOps,
) -> Qwen3:
    """Weights for `source`: its checkpoint, layer by layer, else random.

    `tiny-random` takes transformers' seeded weights, so that our engine and
    transformers serve identical tokens; any other config without weights is random on the device.
    """
    if source.weights_dir is not None:
        reader = CheckpointReader.from_dir(source.weights_dir)
        return Qwen3(source.config, load_checkpoint(reader, source.config, device, dtype), ops)
    if source.name == TINY_RANDOM:
        state = build_reference_model(source).state_dict()
        return model_from_state_dict(source.config, state, device, dtype, ops)
    return random_model(source.config, device, dtype, seed, ops)


def model_from_state_dict(
    config: PretrainedConfig,
    state: dict[str, Tensor],
    device: str,
    dtype: torch.dtype,
    ops: type[TorchOps] = TorchOps,
) -> Qwen3:
    """Build from Hugging Face names (the tests' transformers models)."""
    reader = CheckpointReader.from_state_dict(state)
    return Qwen3(config, load_checkpoint(reader, config, device, dtype), ops)


def random_model(
    config: PretrainedConfig,
    device: str,
    dtype: torch.dtype,
    seed: int = 0,
    ops: type[TorchOps] = TorchOps,
) -> Qwen3:
    """Seeded random weights of the config's shapes, made on the device (the GPU benchmarks)."""
    return Qwen3(config, build(config, RandomBuilder(config, device, dtype, seed)), ops)
