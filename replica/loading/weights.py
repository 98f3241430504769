"""A model's tensors from a checkpoint, from random numbers, or as names only, through one recipe.

`build` walks the architecture once, layer by layer, asking a builder for each fused tensor by the
Hugging Face names it is made of. The checkpoint builder allocates the fused tensor on the device
and copies each source tensor straight into its rows, so peak device memory is the final weights
(no unfused copies, no second pass), and the host holds one source tensor at a time. The random
builder fills the same shapes on the device; the name builder lists what a checkpoint must hold.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor
from transformers import PretrainedConfig

from replica.loading.reader import CheckpointReader
from replica.model.architecture import attention_shape
from replica.model.mlp import DenseMLP, SparseMoE
from replica.model.weights import LayerWeights, ModelWeights


class Builder(Protocol):
    def matrix(self, names: list[str], shape: tuple[int, ...]) -> Tensor:
        """The named tensors stacked along dim 0 (in order), viewed as `shape`."""

    def norm(self, name: str, size: int) -> Tensor: ...


def build(config: PretrainedConfig, builder: Builder) -> ModelWeights:
    hidden = config.hidden_size
    q_heads, kv_heads, head_dim = attention_shape(config)
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        layers.append(
            LayerWeights(
                input_norm=builder.norm(p + "input_layernorm.weight", hidden),
                qkv=builder.matrix(
                    [f"{attn}{n}_proj.weight" for n in "qkv"],
                    ((q_heads + 2 * kv_heads) * head_dim, hidden),
                ),
                q_norm=builder.norm(attn + "q_norm.weight", head_dim),
                k_norm=builder.norm(attn + "k_norm.weight", head_dim),
                o_proj=builder.matrix([attn + "o_proj.weight"], (hidden, q_heads * head_dim)),
                post_norm=builder.norm(p + "post_attention_layernorm.weight", hidden),
                mlp=_mlp(config, builder, p + "mlp."),
            )
        )
    embed = builder.matrix(["model.embed_tokens.weight"], (config.vocab_size, hidden))
    final_norm = builder.norm("model.norm.weight", hidden)
    tied = config.tie_word_embeddings
    lm_head = embed if tied else builder.matrix(["lm_head.weight"], (config.vocab_size, hidden))
    return ModelWeights(embed, layers, final_norm, lm_head)


def _mlp(config: PretrainedConfig, builder: Builder, p: str) -> DenseMLP | SparseMoE:
    hidden = config.hidden_size
    if config.model_type != "qwen3_moe":
        inter = config.intermediate_size
        gate_up = [p + "gate_proj.weight", p + "up_proj.weight"]
        return DenseMLP(
            gate_up=builder.matrix(gate_up, (2 * inter, hidden)),
            down=builder.matrix([p + "down_proj.weight"], (hidden, inter)),
        )
    experts, inter = config.num_experts, config.moe_intermediate_size
    expert = [f"{p}experts.{e}." for e in range(experts)]
    return SparseMoE(
        router=builder.matrix([p + "gate.weight"], (experts, hidden)),
        gate_up=builder.matrix(
            [e + n for e in expert for n in ("gate_proj.weight", "up_proj.weight")],
            (experts, 2 * inter, hidden),
        ),
        down=builder.matrix([e + "down_proj.weight" for e in expert], (experts, hidden, inter)),
        top_k=config.num_experts_per_tok,
        norm_topk_prob=config.norm_topk_prob,
    )


class CheckpointBuilder:
    """Copies checkpoint tensors into preallocated fused tensors on the device."""

    def __init__(self, reader: CheckpointReader, device: str, dtype: torch.dtype) -> None:
        self.reader, self.device, self.dtype = reader, device, dtype

    def matrix(self, names: list[str], shape: tuple[int, ...]) -> Tensor:
        return self._stack(names, shape)

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
    """Seeded random weights made directly on the device: seconds even for 30B."""

    def __init__(self, config: PretrainedConfig, device: str, dtype: torch.dtype, seed: int):
        self.device, self.dtype = device, dtype
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.std = getattr(config, "initializer_range", 0.02)

    def matrix(self, names: list[str], shape: tuple[int, ...]) -> Tensor:
        out = torch.randn(shape, generator=self.gen, device=self.device, dtype=self.dtype)
        return out.mul_(self.std)

    def norm(self, name: str, size: int) -> Tensor:
        return torch.ones(size, device=self.device, dtype=self.dtype)


class NameBuilder:
    """Records the names a checkpoint must hold; its tensors live on the meta device."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def matrix(self, names: list[str], shape: tuple[int, ...]) -> Tensor:
        self.names.update(names)
        return torch.empty(shape, device="meta")

    def norm(self, name: str, size: int) -> Tensor:
        return self.matrix([name], (size,))


def expected_tensor_names(config: PretrainedConfig) -> set[str]:
    builder = NameBuilder()
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
    reader: CheckpointReader, config: PretrainedConfig, device: str, dtype: torch.dtype
) -> ModelWeights:
    """Every tensor of `reader` into the model, layer by layer; refuses unused tensors."""
    weights = build(config, CheckpointBuilder(reader, device, dtype))
    unused = reader.untaken() - redundant_tensor_names(config, reader.names)
    if unused:
        raise ValueError(f"checkpoint tensors unused: {', '.join(sorted(unused)[:3])}")
    return weights
