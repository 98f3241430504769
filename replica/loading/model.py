"""The end of the loading chain: a source's weights on the device, as our Qwen3."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from replica.loading.config import UnsupportedModel
from replica.loading.quantization import int4_checkpoint
from replica.loading.reader import CheckpointReader
from replica.loading.reference import build_reference_model
from replica.loading.source import TINY_RANDOM, ModelSource
from replica.loading.weights import RandomBuilder, build, load_checkpoint
from replica.model.qwen3 import Qwen3
from replica.ops import Ops

QUANTIZE_MODES = ("int4",)  # `--quantize`: round-to-nearest 4-bit, group 128, asymmetric


def load_model(
    source: ModelSource,
    device: str,
    dtype: torch.dtype,
    seed: int = 0,
    ops: Ops | None = None,
    quantize: str | None = None,
) -> Qwen3:
    """Weights for `source`: its checkpoint, layer by layer, else random; `quantize="int4"`
    makes the projections 4-bit as they load.

    `tiny-random` takes transformers' seeded weights, so that our engine and
    transformers serve identical tokens; any other config without weights is random on the device.
    """
    to_int4 = check_quantize(source, quantize)
    if source.weights_dir is not None:
        reader = CheckpointReader.from_dir(source.weights_dir)
    elif source.name == TINY_RANDOM:
        reader = CheckpointReader.from_state_dict(build_reference_model(source).state_dict())
    else:
        return random_model(source.config, device, dtype, seed, ops, to_int4)
    return model_from_reader(reader, source.config, device, dtype, ops, to_int4)


def check_quantize(source: ModelSource, quantize: str | None) -> bool:
    """Whether to quantize at load; refuses an unknown mode and a checkpoint already 4-bit."""
    if quantize is None:
        return False
    if quantize not in QUANTIZE_MODES:
        raise UnsupportedModel(
            f"--quantize {quantize!r} is not served (choose from {QUANTIZE_MODES})"
        )
    if source.weights_dir is not None and int4_checkpoint(source.config) is not None:
        raise UnsupportedModel("--quantize int4 on a checkpoint that is already quantized")
    return True


def model_from_reader(
    reader: CheckpointReader,
    config: PretrainedConfig,
    device: str,
    dtype: torch.dtype,
    ops: Ops | None = None,  # None: the CPU's ops
    quantize: bool = False,
) -> Qwen3:
    """Every tensor of `reader` (Hugging Face names: a checkpoint, or the tests' transformers
    models) into our model, layer by layer; a 4-bit checkpoint's format is the config's."""
    weights = load_checkpoint(reader, config, device, dtype, int4_checkpoint(config), quantize)
    return Qwen3(config, weights, ops)


def random_model(
    config: PretrainedConfig,
    device: str,
    dtype: torch.dtype,
    seed: int,
    ops: Ops | None = None,
    quantize: bool = False,
) -> Qwen3:
    """Seeded random weights of the config's shapes, made on the device (the GPU benchmarks);
    `quantize`: the projections random 4-bit, made packed."""
    builder = RandomBuilder(config, device, dtype, seed, quantize)
    return Qwen3(config, build(config, builder), ops)
