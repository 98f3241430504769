"""The end of the loading chain: a source's weights on the device, as our Qwen3."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from replica.loading.config import UnsupportedModel
from replica.loading.quantization import int4_checkpoint
from replica.loading.reader import CheckpointReader
from replica.loading.reference import build_reference_model
from replica.loading.source import TINY_RANDOM, ModelSource
from replica.loading.weights import (
    NameBuilder,
    RandomBuilder,
    build,
    check_all_used,
    load_checkpoint,
)
from replica.model.qwen3 import Qwen3
from replica.ops import Ops
from replica.wire.stages import check_stages, split_layers

QUANTIZE_MODES = ("int4",)  # `--quantize`: round-to-nearest 4-bit, group 128, asymmetric
INT4_SHARE = (0.5 + 4 / 128) / 2  # a 4-bit weight's bytes (with its group's scale and zero) / 2


def load_model(
    source: ModelSource,
    device: str,
    dtype: torch.dtype,
    seed: int = 0,
    ops: Ops | None = None,
    quantize: str | None = None,
) -> Qwen3:
    """The whole model on one device (`load_stages` with one stage)."""
    return load_stages(source, [device], dtype, seed, [ops], quantize)[0]


def load_stages(
    source: ModelSource,
    devices: list[str],
    dtype: torch.dtype,
    seed: int = 0,
    ops: list[Ops | None] | None = None,
    quantize: str | None = None,
) -> list[Qwen3]:
    """One pipeline stage a device (`stage_layers` splits the layers), each reading only its
    own tensors: the checkpoint's, layer by layer, else random; `quantize="int4"` makes the
    projections 4-bit as they load. `ops`: each stage's (None: the CPU's).

    `tiny-random` takes transformers' seeded weights, so that our engine and
    transformers serve identical tokens; any other config without weights is random on the device.
    """
    to_int4 = check_quantize(source, quantize)
    config, ops = source.config, ops or [None] * len(devices)
    spans = stage_layers(config, len(devices), to_int4)
    if source.weights_dir is not None:
        reader = CheckpointReader.from_dir(source.weights_dir)
    elif source.name == TINY_RANDOM:
        reader = CheckpointReader.from_state_dict(build_reference_model(source).state_dict())
    else:
        return [
            random_model(config, device, dtype, seed, stage_ops, to_int4, span)
            for span, device, stage_ops in zip(spans, devices, ops, strict=True)
        ]
    stages = [
        model_from_reader(reader, config, device, dtype, stage_ops, to_int4, span)
        for span, device, stage_ops in zip(spans, devices, ops, strict=True)
    ]
    check_all_used(reader, config)
    return stages


def stage_layers(config: PretrainedConfig, stages: int, int4: bool = False) -> list[range]:
    """The layer range of each of `stages` stages (replica.wire.stages.split_layers' rule),
    weighed in 16-bit parameters: a layer's (4-bit ones at INT4_SHARE), the embedding's and
    the head's (16-bit always)."""
    check_stages(stages, config.num_hidden_layers)
    layer = build(config, NameBuilder(), range(1)).layers[0]
    layer_params = sum(t.numel() for t in layer.tensors()) * (INT4_SHARE if int4 else 1)
    table = config.vocab_size * config.hidden_size
    return split_layers(config.num_hidden_layers, stages, layer_params, table, table)


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
    layers: range | None = None,
) -> Qwen3:
    """Every tensor of `reader` (Hugging Face names: a checkpoint, or the tests' transformers
    models) into our model, layer by layer, or those of one stage's `layers`; a 4-bit
    checkpoint's format is the config's."""
    checkpoint = int4_checkpoint(config)
    weights = load_checkpoint(reader, config, device, dtype, checkpoint, quantize, layers)
    return Qwen3(config, weights, ops)


def random_model(
    config: PretrainedConfig,
    device: str,
    dtype: torch.dtype,
    seed: int,
    ops: Ops | None = None,
    quantize: bool = False,
    layers: range | None = None,
) -> Qwen3:
    """Seeded random weights of the config's shapes (or of a stage's `layers`: the same
    numbers), made on the device (the GPU benchmarks); `quantize`: the projections random
    4-bit, made packed."""
    builder = RandomBuilder(config, device, dtype, seed, quantize)
    return Qwen3(config, build(config, builder, layers), ops)
