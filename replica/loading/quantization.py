"""Which 4-bit checkpoint a config describes, and how its tensors become our packed layout.

`quantization_config` is read through transformers' own classes (`AwqConfig`, `GPTQConfig`);
compressed-tensors' class needs the compressed_tensors package, which the engine does not
install, so its plain dict is read here. What we serve, each unpacked as its documentation lays
out (replica.ops.packed holds our layout):

- compressed-tensors `pack-quantized`, 4-bit int, group strategy (llm-compressor's W4A16):
  `weight_packed` int32 [N, K/8] (8 consecutive columns per word, value + 8), `weight_scale`
  [N, K/G], `weight_shape`, and for asymmetric schemes `weight_zero_point` packed the same way
  along N: [N/8, K/G].
- AWQ, GEMM layout (AutoAWQ): `qweight` int32 [K, N/8] and `qzeros` [K/G, N/8] packed along N in
  the order 0 2 4 6 1 3 5 7, `scales` [K/G, N]; w = (q - z) * s.
- GPTQ (AutoGPTQ / GPTQModel): `qweight` int32 [K/8, N] packed along K, `qzeros` [K/G, N/8]
  packed along N, `scales` [K/G, N], `g_idx` [K]; the `gptq` checkpoint format stores zero - 1,
  `gptq_v2` the zero itself. Act-order (`desc_act`) is refused.

Anything else (another bit width, fp8, activation quantization, act-order, mixed schemes) raises
`UnsupportedModel` with one line, before a replica starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PretrainedConfig
from transformers.utils.quantization_config import AwqConfig, GPTQConfig

from replica.loading.config import UnsupportedModel
from replica.ops.packed import PackedInt4, pack, servable_group, unpack_nibbles

SERVED = "compressed-tensors pack-quantized W4A16, AWQ (GEMM), GPTQ 4-bit"
AWQ_COLUMN_NIBBLE = [0, 4, 1, 5, 2, 6, 3, 7]  # column j of a word sits in nibble [j]

Take = Callable[[str], Tensor]


@dataclass(frozen=True)
class Int4Checkpoint:
    """A served 4-bit checkpoint format: the tensor names of a quantized linear and how to turn
    them into our layout. A linear whose names are absent is read as a 16-bit `weight` (layers
    the checkpoint kept in 16 bits: router gates, lm_head, sometimes attention)."""

    method: str  # "compressed-tensors", "awq" or "gptq"
    group_size: int
    symmetric: bool
    zero_offset: int = 0  # GPTQ's `gptq` format stores zero - 1

    def names(self, module: str) -> list[str]:
        """The tensors a quantized `module` (e.g. model.layers.0.mlp.down_proj) must hold."""
        if self.method == "compressed-tensors":
            suffixes = ["weight_packed", "weight_scale", "weight_shape"]
            suffixes += [] if self.symmetric else ["weight_zero_point"]
        else:
            suffixes = ["qweight", "qzeros", "scales"] + (
                ["g_idx"] if self.method == "gptq" else []
            )
        return [f"{module}.{suffix}" for suffix in suffixes]

    def read(self, take: Take, module: str, device: str) -> PackedInt4:
        """`module`'s weight [N, K] in our layout, unpacked on `device`."""
        tensors = {name.rsplit(".", 1)[1]: take(name).to(device) for name in self.names(module)}
        unpack = {"compressed-tensors": _compressed, "awq": _awq, "gptq": _gptq}[self.method]
        qweight, scales, zeros = unpack(tensors, self)
        if qweight.shape[-1] * 8 % self.group_size or scales.shape != zeros.shape:
            raise UnsupportedModel(f"{module}: 4-bit tensors of inconsistent shapes")
        return PackedInt4(qweight.contiguous(), scales.contiguous(), zeros, self.group_size)


def int4_checkpoint(config: PretrainedConfig) -> Int4Checkpoint | None:
    """The config's 4-bit format, None for a 16-bit checkpoint; refuses any other quantization."""
    raw = getattr(config, "quantization_config", None)
    if raw is None:
        return None
    raw = raw if isinstance(raw, dict) else raw.to_dict()
    method = str(raw.get("quant_method", "")).lower()
    readers = {"compressed-tensors": _compressed_config, "awq": _awq_config, "gptq": _gptq_config}
    if method not in readers:
        raise UnsupportedModel(f"quantization {method!r} is not served (served: {SERVED})")
    return readers[method](raw)


def _group(method: str, group_size: int | None) -> int:
    if not group_size or not servable_group(group_size):
        raise UnsupportedModel(
            f"{method} group size {group_size} is not served (a power of two, 16 to 256)"
        )
    return group_size


def _awq_config(raw: dict[str, Any]) -> Int4Checkpoint:
    awq = AwqConfig.from_dict(raw)
    version = str(awq.format).lower()  # transformers reads `version` into `format`
    if awq.bits != 4 or version != "gemm" or not awq.zero_point:
        what = f"{awq.bits}-bit {version} zero_point={awq.zero_point}"
        raise UnsupportedModel(f"AWQ {what} is not served (served: 4-bit GEMM with zero points)")
    return Int4Checkpoint("awq", _group("AWQ", awq.group_size), symmetric=False)


def _gptq_config(raw: dict[str, Any]) -> Int4Checkpoint:
    if raw.get("desc_act"):  # before transformers' class, which warns about it
        raise UnsupportedModel("GPTQ with act-order (desc_act=True) is not served")
    gptq = GPTQConfig.from_dict(raw)
    offsets = {"gptq": 1, "gptq_v2": 0}
    checkpoint_format = str(getattr(gptq, "checkpoint_format", "gptq")).lower()
    if gptq.bits != 4 or checkpoint_format not in offsets:
        what = f"{gptq.bits}-bit, format {checkpoint_format}"
        raise UnsupportedModel(f"GPTQ {what} is not served (served: 4-bit without act-order)")
    group = _group("GPTQ", gptq.group_size)
    return Int4Checkpoint("gptq", group, bool(gptq.sym), offsets[checkpoint_format])


def _compressed_config(raw: dict[str, Any]) -> Int4Checkpoint:
    if raw.get("format") != "pack-quantized":
        raise UnsupportedModel(f"compressed-tensors format {raw.get('format')!r} is not served")
    schemes = set()
    for group in (raw.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        served = (
            weights.get("num_bits") == 4
            and weights.get("type") == "int"
            and weights.get("strategy") == "group"
            and not weights.get("actorder")
            and not weights.get("dynamic")
            and not group.get("input_activations")
            and not group.get("output_activations")
        )
        if not served:
            raise UnsupportedModel(f"compressed-tensors scheme {weights} is not W4A16 (group)")
        schemes.add((weights.get("group_size"), bool(weights.get("symmetric", True))))
    if len(schemes) != 1:
        raise UnsupportedModel(
            f"compressed-tensors with {len(schemes)} weight schemes is not served"
        )
    ((group_size, symmetric),) = schemes
    return Int4Checkpoint("compressed-tensors", _group("compressed-tensors", group_size), symmetric)


def _compressed(t: dict[str, Tensor], fmt: Int4Checkpoint) -> tuple[Tensor, Tensor, Tensor]:
    scales = t["weight_scale"]
    if fmt.symmetric:
        zeros = torch.full_like(scales, 8)
    else:
        zeros = unpack_nibbles(t["weight_zero_point"].t()).t()[: scales.shape[0]].to(scales.dtype)
    n, k = t["weight_shape"].tolist()
    if tuple(t["weight_packed"].shape) != (n, k // 8):
        raise UnsupportedModel(f"compressed-tensors weight of shape {n}x{k} not packed by 8")
    return pack(unpack_nibbles(t["weight_packed"]), fmt.group_size), scales, zeros


def _awq(t: dict[str, Tensor], fmt: Int4Checkpoint) -> tuple[Tensor, Tensor, Tensor]:
    order = torch.tensor(AWQ_COLUMN_NIBBLE, device=t["qweight"].device)

    def columns(words: Tensor) -> Tensor:  # [rows, N/8] packed along N -> [rows, N]
        return unpack_nibbles(words).unflatten(-1, (-1, 8))[..., order].flatten(-2)

    scales = t["scales"].t()
    zeros = columns(t["qzeros"]).t().to(scales.dtype)
    return pack(columns(t["qweight"]).t(), fmt.group_size), scales, zeros


def _gptq(t: dict[str, Tensor], fmt: Int4Checkpoint) -> tuple[Tensor, Tensor, Tensor]:
    k = t["qweight"].shape[0] * 8
    groups = torch.arange(k, device=t["g_idx"].device) // fmt.group_size
    if not torch.equal(t["g_idx"].to(groups.dtype), groups):
        raise UnsupportedModel("GPTQ g_idx out of group order (act-order) is not served")
    scales = t["scales"].t()
    # a stored zero - 1 of -1 wrapped to 15: modulo 16 undoes both
    zeros = ((unpack_nibbles(t["qzeros"]) + fmt.zero_offset) & 0xF).t().to(scales.dtype)
    return pack(unpack_nibbles(t["qweight"].t()), fmt.group_size), scales, zeros
