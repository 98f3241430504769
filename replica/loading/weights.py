"""A model's tensors from a checkpoint, from random numbers, or as names only, through one recipe.

`build` walks the architecture once, layer by layer, asking a builder for each fused tensor by the
Hugging Face names it is made of. The checkpoint builder allocates the fused tensor on the device
and copies each source tensor straight into its rows, so peak device memory is the final weights
(no unfused copies, no second pass), and the host holds one source tensor at a time. The random
builder fills the same shapes on the device; the name builder lists what a checkpoint must hold.

Projections (QKV, o_proj, the MLP's and the experts') are asked for as `linear`: a builder may
return them packed 4-bit (a 4-bit checkpoint's tensors, or `--quantize int4`: round-to-nearest on
the device as each fused tensor is made, so the 16-bit copy of only one tensor exists at a time).
Embeddings, norms, router gates and the LM head stay 16-bit. A model is built layer by layer
from names alone, so a pipeline stage builds (and reads) only its range of layers.
"""

from __future__ import annotations

import math
import zlib
from typing import Protocol

import torch
from torch import Tensor
from transformers import PretrainedConfig

from replica.loading.config import UnsupportedModel
from replica.loading.quantization import Int4Checkpoint
from replica.loading.reader import CheckpointReader
from replica.model.architecture import attention_shape
from replica.model.weights import LayerWeights, ModelWeights
from replica.ops.mlp import DenseMLP, SparseMoE
from replica.ops.packed import PackedInt4, quantize, random_packed


class Builder(Protocol):
    def matrix(self, names: list[str], shape: tuple[int, ...]) -> Tensor:
        """The named tensors stacked along dim 0 (in order), viewed as `shape`."""

    def linear(self, names: list[str], shape: tuple[int, ...]) -> Tensor | PackedInt4:
        """A projection's weight: `matrix`, or the same rows packed 4-bit."""

    def norm(self, name: str, size: int) -> Tensor: ...


def build(config: PretrainedConfig, builder: Builder, layers: range | None = None) -> ModelWeights:
    """The model's tensors, or a pipeline stage's: only `layers` (default all), the embedding
    if they start at layer 0, the final norm and LM head if they end at the last layer, else
    the next layer's input norm (`ModelWeights`)."""
    hidden, total = config.hidden_size, config.num_hidden_layers
    span = range(total) if layers is None else layers
    weights = [_layer(config, builder, f"model.layers.{i}.") for i in span]
    first, last, tied = span.start == 0, span.stop == total, config.tie_word_embeddings
    embed = None
    if first or (last and tied):
        embed = builder.matrix(["model.embed_tokens.weight"], (config.vocab_size, hidden))
    if not last:
        boundary = builder.norm(f"model.layers.{span.stop}.input_layernorm.weight", hidden)
        return ModelWeights(embed, weights, boundary, None, span.start)
    final_norm = builder.norm("model.norm.weight", hidden)
    lm_head = embed if tied else builder.matrix(["lm_head.weight"], (config.vocab_size, hidden))
    return ModelWeights(embed if first else None, weights, final_norm, lm_head, span.start)


def _layer(config: PretrainedConfig, builder: Builder, p: str) -> LayerWeights:
    hidden = config.hidden_size
    q_heads, kv_heads, head_dim = attention_shape(config)
    attn = p + "self_attn."
    return LayerWeights(
        input_norm=builder.norm(p + "input_layernorm.weight", hidden),
        qkv=builder.linear(
            [f"{attn}{n}_proj.weight" for n in "qkv"],
            ((q_heads + 2 * kv_heads) * head_dim, hidden),
        ),
        q_norm=builder.norm(attn + "q_norm.weight", head_dim),
        k_norm=builder.norm(attn + "k_norm.weight", head_dim),
        o_proj=builder.linear([attn + "o_proj.weight"], (hidden, q_heads * head_dim)),
        post_norm=builder.norm(p + "post_attention_layernorm.weight", hidden),
        mlp=_mlp(config, builder, p + "mlp."),
    )


def _mlp(config: PretrainedConfig, builder: Builder, p: str) -> DenseMLP | SparseMoE:
    hidden = config.hidden_size
    if config.model_type != "qwen3_moe":
        inter = config.intermediate_size
        gate_up = [p + "gate_proj.weight", p + "up_proj.weight"]
        return DenseMLP(
            gate_up=builder.linear(gate_up, (2 * inter, hidden)),
            down=builder.linear([p + "down_proj.weight"], (hidden, inter)),
        )
    experts, inter = config.num_experts, config.moe_intermediate_size
    expert = [f"{p}experts.{e}." for e in range(experts)]
    return SparseMoE(
        router=builder.matrix([p + "gate.weight"], (experts, hidden)),
        gate_up=builder.linear(
            [e + n for e in expert for n in ("gate_proj.weight", "up_proj.weight")],
            (experts, 2 * inter, hidden),
        ),
        down=builder.linear([e + "down_proj.weight" for e in expert], (experts, hidden, inter)),
        top_k=config.num_experts_per_tok,
        norm_topk_prob=config.norm_topk_prob,
    )


def _modules(names: list[str]) -> list[str]:
    return [name.removesuffix(".weight") for name in names]


def _packed_modules(
    checkpoint: Int4Checkpoint | None, names: list[str], present: set[str]
) -> list[str]:
    """The modules behind `names` if the checkpoint holds them 4-bit, else [] (16-bit).
    One fused tensor is all 4-bit or all 16-bit."""
    if checkpoint is None:
        return []
    modules = _modules(names)
    packed = [set(checkpoint.names(m)) <= present for m in modules]
    if any(packed) and not all(packed):
        raise UnsupportedModel(f"{modules[0]} and the projections fused with it mix 4 and 16 bits")
    return modules if all(packed) else []


class CheckpointBuilder:
    """Copies checkpoint tensors into preallocated fused tensors on the device; a 4-bit
    checkpoint's projections are unpacked into our layout there, and `quantize` makes the
    16-bit ones 4-bit as they are built."""

    def __init__(
        self,
        reader: CheckpointReader,
        device: str,
        dtype: torch.dtype,
        checkpoint: Int4Checkpoint | None = None,
        quantize: bool = False,
    ) -> None:
        self.reader, self.device, self.dtype = reader, device, dtype
        self.checkpoint, self.quantize = checkpoint, quantize

    def matrix(self, names: list[str], shape: tuple[int, ...]) -> Tensor:
        return self._stack(names, shape)

    def linear(self, names: list[str], shape: tuple[int, ...]) -> Tensor | PackedInt4:
        modules = _packed_modules(self.checkpoint, names, self.reader.names)
        if modules:
            return self._unpack(modules, shape)
        weight = self.matrix(names, shape)
        return quantize(weight) if self.quantize else weight

    def _unpack(self, modules: list[str], shape: tuple[int, ...]) -> PackedInt4:
        """Each module's 4-bit tensors in our layout, stacked along N, viewed as `shape`."""
        parts = [self.checkpoint.read(self.reader.take, m, self.device) for m in modules]
        stacked = [
            torch.cat(tensors) for tensors in zip(*(p.tensors() for p in parts), strict=True)
        ]
        qweight, scales, zeros = stacked
        rows = shape[:-1]
        if qweight.shape != (math.prod(rows), shape[-1] // 8):
            raise ValueError(f"{modules[0]}...: 4-bit shape {tuple(qweight.shape)} for {shape}")
        return PackedInt4(
            qweight.view(*rows, -1),
            scales.view(*rows, -1),
            zeros.view(*rows, -1),
            parts[0].group_size,
        )

    def norm(self, name: str, size: int) -> Tensor:
        return self._stack([name], (size,))

    def _stack(self, names: list[str], shape: tuple[int, ...]) -> Tensor:
        out = torch.empty(shape, dtype=self.dtype, device=self.device)
        rows = out.view(-1, *shape[-1:]) if len(shape) > 1 else out.view(1, -1)
        start = 0
        for name in names:
            source = self.reader.take(name)
            piece = source.reshape(-1, rows.shape[1])
            if start + piece.shape[0] > rows.shape[0] or piece.shape[1] != rows.shape[1]:
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(source.shape)}")
            rows[start : start + piece.shape[0]].copy_(piece)
            start += piece.shape[0]
        if start != rows.shape[0]:
            raise ValueError(f"{names[0]}...: {start} rows where the config implies {shape}")
        return out


class RandomBuilder:
    """Seeded random weights made directly on the device: seconds even for 30B. Each tensor's
    numbers come from the seed and its first name alone, so a pipeline stage builds the same
    layers the whole model would."""

    def __init__(
        self,
        config: PretrainedConfig,
        device: str,
        dtype: torch.dtype,
        seed: int,
        quantize: bool = False,
    ):
        self.device, self.dtype, self.quantize, self.seed = device, dtype, quantize, seed
        self.gen = torch.Generator(device=device)
        self.std = getattr(config, "initializer_range", 0.02)

    def _generator(self, name: str) -> torch.Generator:
        return self.gen.manual_seed(self.seed * 2**32 + zlib.crc32(name.encode()))

    def matrix(self, names: list[str], shape: tuple[int, ...]) -> Tensor:
        gen = self._generator(names[0])
        out = torch.randn(shape, generator=gen, device=self.device, dtype=self.dtype)
        return out.mul_(self.std)

    def linear(self, names: list[str], shape: tuple[int, ...]) -> Tensor | PackedInt4:
        """Packed directly when quantizing: a 235B model never exists in 16 bits."""
        if self.quantize:
            return random_packed(shape, self.std, self.dtype, self._generator(names[0]))
        return self.matrix(names, shape)

    def norm(self, name: str, size: int) -> Tensor:
        return torch.ones(size, device=self.device, dtype=self.dtype)


class NameBuilder:
    """Records the names a checkpoint must hold; its tensors live on the meta device. A
    4-bit checkpoint's projections are expected in its format where `present` has them."""

    def __init__(self, checkpoint: Int4Checkpoint | None = None, present: set[str] = frozenset()):
        self.names: set[str] = set()
        self.checkpoint, self.present = checkpoint, present

    def matrix(self, names: list[str], shape: tuple[int, ...]) -> Tensor:
        self.names.update(names)
        return torch.empty(shape, device="meta")

    def linear(self, names: list[str], shape: tuple[int, ...]) -> Tensor:
        modules = _packed_modules(self.checkpoint, names, self.present)
        if not modules:
            return self.matrix(names, shape)
        self.names.update(name for m in modules for name in self.checkpoint.names(m))
        return torch.empty(shape, device="meta")

    def norm(self, name: str, size: int) -> Tensor:
        return self.matrix([name], (size,))


def expected_tensor_names(
    config: PretrainedConfig,
    checkpoint: Int4Checkpoint | None = None,
    present: set[str] = frozenset(),
) -> set[str]:
    builder = NameBuilder(checkpoint, present)
    build(config, builder)
    return builder.names


def redundant_tensor_names(config: PretrainedConfig, present: set[str]) -> set[str]:
    """Tensors a valid checkpoint may carry that we do not read: a tied head saved anyway, and
    rotary frequency buffers that older exports included."""
    redundant = {name for name in present if name.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        redundant.add("lm_head.weight")
    return redundant


def load_checkpoint(
    reader: CheckpointReader,
    config: PretrainedConfig,
    device: str,
    dtype: torch.dtype,
    checkpoint: Int4Checkpoint | None = None,
    quantize: bool = False,
    layers: range | None = None,
) -> ModelWeights:
    """The tensors of `reader` into the model (or a stage: `layers`), layer by layer. The whole
    model refuses unused tensors; a stage reads only its own (`check_all_used` after the last)."""
    weights = build(config, CheckpointBuilder(reader, device, dtype, checkpoint, quantize), layers)
    if layers is None:
        check_all_used(reader, config)
    return weights


def check_all_used(reader: CheckpointReader, config: PretrainedConfig) -> None:
    unused = reader.untaken() - redundant_tensor_names(config, reader.names)
    if unused:
        raise ValueError(f"checkpoint tensors unused: {', '.join(sorted(unused)[:3])}")
