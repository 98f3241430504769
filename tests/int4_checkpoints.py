"""Tiny 4-bit checkpoints in each served format, packed as each format's documentation lays out.

AutoAWQ and GPTQModel need CUDA builds, so this module packs the tensors itself, with its own
bit loops rather than replica.ops.packed's, from integer levels it chooses; for
compressed-tensors, whose library runs on the CPU (a test dependency only: the server reads its
config without it), `compress_with_library` also has the library write the checkpoint. Each
checkpoint comes with its dequantized twin: the same names in fp32, (q - zero) * scale, which
transformers loads as a plain checkpoint (the oracle for greedy tokens).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

QUANTIZED_LINEAR = re.compile(
    r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)\.weight$"
)
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i holds column AWQ_ORDER[i] of its 8


@dataclass(frozen=True)
class Levels:
    """One linear's integer quantization: w = (q - zero) * scale, groups along the input."""

    q: Tensor  # [N, K] in 0..15
    scale: Tensor  # [N, K / G]
    zero: Tensor  # [N, K / G] in 0..15

    def dequantized(self) -> Tensor:
        g = self.q.shape[1] // self.scale.shape[1]
        return (
            self.q.float() - self.zero.float().repeat_interleave(g, 1)
        ) * self.scale.float().repeat_interleave(g, 1)


def levels(weight: Tensor, group: int, symmetric: bool, scale_dtype: torch.dtype) -> Levels:
    groups = weight.float().unflatten(1, (-1, group))
    if symmetric:
        scale = (groups.abs().amax(-1) / 7).to(scale_dtype)
        zero = torch.full(scale.shape, 8)
    else:
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).to(scale_dtype)
        zero = (-low / scale.float()).round().clamp(0, 15).long()
    q = (groups / scale.float()[..., None]).round() + zero[..., None]
    return Levels(q.clamp(0, 15).long().flatten(1), scale, zero)


def pack_rows(values: Tensor, order: list[int]) -> Tensor:
    """int32 [R, C / 8]: nibble i of word w holds column 8w + order[i]."""
    words = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for nibble, column in enumerate(order):
        words |= (values[:, column::8].long() & 0xF) << (4 * nibble)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


SEQUENTIAL = list(range(8))


def compressed_tensors(lv: Levels, symmetric: bool) -> dict[str, Tensor]:
    tensors = {
        "weight_packed": pack_rows(lv.q, SEQUENTIAL),
        "weight_scale": lv.scale,
        "weight_shape": torch.tensor(lv.q.shape),
    }
    if not symmetric:  # zero points packed along the output dimension
        tensors["weight_zero_point"] = pack_rows(lv.zero.t(), SEQUENTIAL).t().contiguous()
    return tensors


def awq(lv: Levels, symmetric: bool) -> dict[str, Tensor]:
    return {
        "qweight": pack_rows(lv.q.t(), AWQ_ORDER),
        "qzeros": pack_rows(lv.zero.t(), AWQ_ORDER),
        "scales": lv.scale.t().contiguous(),
    }


def gptq(lv: Levels, symmetric: bool) -> dict[str, Tensor]:
    k, groups = lv.q.shape[1], lv.scale.shape[1]
    return {
        "qweight": pack_rows(lv.q, SEQUENTIAL).t().contiguous(),  # [K / 8, N], packed along K
        "qzeros": pack_rows((lv.zero - 1).t(), SEQUENTIAL),  # the `gptq` format: zero - 1
        "scales": lv.scale.t().contiguous(),
        "g_idx": torch.arange(k, dtype=torch.int32) // (k // groups),
    }


def quantization_config(method: str, group: int, symmetric: bool) -> dict:
    if method == "compressed-tensors":
        weights = {
            "num_bits": 4,
            "type": "int",
            "symmetric": symmetric,
            "strategy": "group",
            "group_size": group,
            "actorder": None,
            "dynamic": False,
        }
        return {
            "quant_method": method,
            "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
            "ignore": ["lm_head", "re:.*mlp.gate$"],
            "quantization_status": "compressed",
        }
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                "version": "gemm"}  # fmt: skip
    return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False,
            "sym": symmetric, "checkpoint_format": "gptq"}  # fmt: skip


PACKERS = {"compressed-tensors": compressed_tensors, "awq": awq, "gptq": gptq}
SCALE_DTYPES = {"compressed-tensors": torch.bfloat16, "awq": torch.float16, "gptq": torch.float16}


def write_int4(
    source: Path,
    out: Path,
    method: str,
    group: int = 32,
    symmetric: bool = False,
    keep_16bit: str | None = None,
) -> tuple[Path, Path]:
    """(4-bit checkpoint, its dequantized fp32 twin) from a 16-bit `save_pretrained` dir.
    Linears whose name contains `keep_16bit` stay 16-bit, as a checkpoint's ignore list keeps
    them."""
    state = {}
    for shard in sorted(source.glob("*.safetensors")):
        state.update(load_file(shard))
    packed, dequantized = {}, {}
    for name, tensor in state.items():
        keep = keep_16bit is not None and keep_16bit in name
        if not QUANTIZED_LINEAR.search(name) or keep:
            packed[name] = dequantized[name] = tensor
            continue
        lv = levels(tensor, group, symmetric, SCALE_DTYPES[method])
        module = name.removesuffix(".weight")
        for suffix, value in PACKERS[method](lv, symmetric).items():
            packed[f"{module}.{suffix}"] = value
        dequantized[name] = lv.dequantized()
    config = json.loads((source / "config.json").read_text())
    paths = []
    for directory, tensors, quantized in (
        (out / method, packed, True),
        (out / "deq", dequantized, False),
    ):
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, directory / "model.safetensors")
        extra = {"quantization_config": quantization_config(method, group, symmetric)}
        (directory / "config.json").write_text(
            json.dumps({**config, **(extra if quantized else {})})
        )
        paths.append(directory)
    return paths[0], paths[1]


def compress_with_library(source: Path, out: Path, symmetric: bool) -> tuple[Path, Path]:
    """(4-bit checkpoint, its dequantized fp32 twin), both made by the compressed_tensors
    library: it attaches the W4A16 group-32 scheme to every Linear but the head, takes this
    module's scales and zero points (the library alone computes none: llm-compressor's observers
    do), then quantizes, packs and writes the checkpoint and its config itself. The twin holds
    the library's own fake-quantized weights."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from transformers import AutoModelForCausalLM

    args = QuantizationArgs(
        num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=32
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    twin = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    apply_quantization_config(
        model,
        QuantizationConfig(
            config_groups={"group_0": scheme}, ignore=["lm_head"], format="pack-quantized"
        ),
    )
    twin_modules = dict(twin.named_modules())
    with torch.no_grad():
        for name, module in model.named_modules():
            if not hasattr(module, "weight_scale"):
                continue
            lv = levels(module.weight, 32, symmetric, module.weight_scale.dtype)
            module.weight_scale.copy_(lv.scale)
            if not symmetric:  # the library's zero points are signed: ours less 8
                module.weight_zero_point.copy_(lv.zero - 8)
            twin_modules[name].weight.copy_(
                fake_quantize(module.weight, module.weight_scale, module.weight_zero_point, args)
            )
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    packed, dequantized = out / "compressed-tensors-library", out / "library-deq"
    model.save_pretrained(packed)
    compressor.update_config(str(packed))
    twin.save_pretrained(dequantized)
    return packed, dequantized
