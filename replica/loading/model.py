"""The end of the loading chain: a source's weights on the device, as our Qwen3."""

from __future__ import annotations

import torch
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
    elif source.name == TINY_RANDOM:
        reader = CheckpointReader.from_state_dict(build_reference_model(source).state_dict())
    else:
        return random_model(source.config, device, dtype, seed, ops)
    return model_from_reader(reader, source.config, device, dtype, ops)


def model_from_reader(
    reader: CheckpointReader,
    config: PretrainedConfig,
    device: str,
    dtype: torch.dtype,
    ops: type[TorchOps] = TorchOps,
) -> Qwen3:
    """Every tensor of `reader` (Hugging Face names: a checkpoint, or the tests' transformers
    models) into our model, layer by layer."""
    return Qwen3(config, load_checkpoint(reader, config, device, dtype), ops)


def random_model(
    config: PretrainedConfig, device: str, dtype: torch.dtype, seed: int, ops: type[TorchOps]
) -> Qwen3:
    """Seeded random weights of the config's shapes, made on the device (the GPU benchmarks)."""
    return Qwen3(config, build(config, RandomBuilder(config, device, dtype, seed)), ops)
