"""Our Qwen3 forward: plain weight tensors, QKV and gate/up fused at load, attention pluggable.

The math follows transformers' `Qwen3ForCausalLM` operation for operation (see `replica.ops`),
so that fp32 greedy tokens match it exactly. Activations are [tokens, features] over the packed
tokens of a batch: no padding, so every matrix multiply does only live work.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import Qwen3Config

from replica.attention import AttentionBackend, PackedRows
from replica.checkpoint import (
    TINY_RANDOM,
    ModelSource,
    attention_shape,
    build_reference_model,
    load_state_dict,
    rope_theta,
)
from replica.kv_cache import KVCache
from replica.ops import TorchOps


@dataclass
class LayerWeights:
    input_norm: Tensor
    qkv: Tensor  # [(q_heads + 2 * kv_heads) * head_dim, hidden]
    q_norm: Tensor
    k_norm: Tensor
    o_proj: Tensor
    post_norm: Tensor
    gate_up: Tensor  # [2 * intermediate, hidden]
    down: Tensor


@dataclass
class Batch:
    """One forward's tokens, packed: prefill takes whole prompts (`rows` says where each lies),
    decode one token per row (`seq_lens` says how much of its slot each row attends over)."""

    input_ids: Tensor  # [T] int64
    positions: Tensor  # [T] int64
    slot_ids: Tensor  # [T] int64: the KV-cache slot each token's K/V are written to
    seq_lens: Tensor | None = None  # decode: [T] int32, live length including this token
    rows: PackedRows | None = None  # prefill

    @classmethod
    def prefill(cls, prompts: list[list[int]], slots: list[int], device: torch.device) -> Batch:
        lengths = [len(p) for p in prompts]
        chain = itertools.chain.from_iterable
        host = torch.tensor(
            [
                list(chain(prompts)),
                list(chain(range(n) for n in lengths)),
                list(chain([slot] * n for slot, n in zip(slots, lengths, strict=True))),
            ]
        )
        input_ids, positions, slot_ids = host.to(device).unbind(0)
        rows = PackedRows.from_lengths(lengths, device)
        return cls(input_ids, positions, slot_ids, rows=rows)


class Qwen3:
    """Qwen3 causal LM over an external KV cache and attention backend."""

    def __init__(
        self,
        config: Qwen3Config,
        embed: Tensor,
        layers: list[LayerWeights],
        final_norm: Tensor,
        lm_head: Tensor,
    ) -> None:
        self.config = config
        self.embed = embed
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.num_heads, self.num_kv_heads, self.head_dim = attention_shape(config)
        self.eps = config.rms_norm_eps
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        self.inv_freq = (1.0 / rope_theta(config) ** exponents).to(embed.device)
        shape = (self.num_heads, self.num_kv_heads, self.head_dim, self.eps, self.inv_freq)
        self.ops = TorchOps(*shape)
        if embed.is_cuda:
            from replica.triton_ops import TritonOps

            self.ops = TritonOps(*shape)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @classmethod
    def from_state_dict(
        cls, config: Qwen3Config, state: dict[str, Tensor], device: str, dtype: torch.dtype
    ) -> Qwen3:
        """Build from Hugging Face names, fusing q/k/v and gate/up into one matrix each."""

        def get(name: str) -> Tensor:
            return state[name].detach().to(device=device, dtype=dtype)

        layers = []
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            qkv = [get(attn + f"{n}_proj.weight") for n in "qkv"]
            gate_up = [get(mlp + f"{n}_proj.weight") for n in ("gate", "up")]
            layers.append(
                LayerWeights(
                    input_norm=get(p + "input_layernorm.weight"),
                    qkv=torch.cat(qkv),
                    q_norm=get(attn + "q_norm.weight"),
                    k_norm=get(attn + "k_norm.weight"),
                    o_proj=get(attn + "o_proj.weight"),
                    post_norm=get(p + "post_attention_layernorm.weight"),
                    gate_up=torch.cat(gate_up),
                    down=get(mlp + "down_proj.weight"),
                )
            )
        embed = get("model.embed_tokens.weight")
        tied = config.tie_word_embeddings or "lm_head.weight" not in state
        lm_head = embed if tied else get("lm_head.weight")
        return cls(config, embed, layers, get("model.norm.weight"), lm_head)

    @classmethod
    def random(cls, config: Qwen3Config, device: str, dtype: torch.dtype, seed: int = 0) -> Qwen3:
        """Seeded random weights made directly on `device`: seconds for 4B, no transformers init."""
        gen = torch.Generator(device=device).manual_seed(seed)
        std = getattr(config, "initializer_range", 0.02)

        def normal(*shape: int) -> Tensor:
            return torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(std)

        def ones(n: int) -> Tensor:
            return torch.ones(n, device=device, dtype=dtype)

        hidden, inter = config.hidden_size, config.intermediate_size
        q_heads, kv_heads, head_dim = attention_shape(config)
        layers = [
            LayerWeights(
                input_norm=ones(hidden),
                qkv=normal((q_heads + 2 * kv_heads) * head_dim, hidden),
                q_norm=ones(head_dim),
                k_norm=ones(head_dim),
                o_proj=normal(hidden, q_heads * head_dim),
                post_norm=ones(hidden),
                gate_up=normal(2 * inter, hidden),
                down=normal(hidden, inter),
            )
            for _ in range(config.num_hidden_layers)
        ]
        embed = normal(config.vocab_size, hidden)
        lm_head = embed if config.tie_word_embeddings else normal(config.vocab_size, hidden)
        return cls(config, embed, layers, ones(hidden), lm_head)

    def weight_bytes(self) -> int:
        """Bytes one decode step must read: every matrix once (a tied embedding counts once)."""
        tensors = {id(t): t for layer in self.layers for t in vars(layer).values()}
        for t in (self.embed, self.final_norm, self.lm_head):
            tensors[id(t)] = t
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def forward(self, batch: Batch, cache: KVCache, attention: AttentionBackend) -> Tensor:
        """Hidden states [T, hidden] after the final norm; writes this batch's K/V to `cache`."""
        ops, layers = self.ops, self.layers
        h, x = ops.add_rms_norm(
            F.embedding(batch.input_ids, self.embed), None, layers[0].input_norm
        )
        for index, w in enumerate(layers):
            k_cache, v_cache = cache.layer(index)
            q, k, v = ops.rope_store(
                F.linear(x, w.qkv),
                w.q_norm,
                w.k_norm,
                batch.positions,
                batch.slot_ids,
                k_cache,
                v_cache,
            )
            if batch.rows is None:
                out = attention.decode(q, k_cache, v_cache, batch.slot_ids, batch.seq_lens)
            else:
                out = attention.prefill(q, k, v, batch.rows)
            h, x = ops.add_rms_norm(h, F.linear(out.reshape(h.shape[0], -1), w.o_proj), w.post_norm)
            next_norm = layers[index + 1].input_norm if index + 1 < len(layers) else self.final_norm
            mlp = F.linear(ops.silu_mul(F.linear(x, w.gate_up)), w.down)
            h, x = ops.add_rms_norm(h, mlp, next_norm)
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.lm_head)


def load_model(source: ModelSource, device: str, dtype: torch.dtype, seed: int = 0) -> Qwen3:
    """Weights for `source`: its checkpoint, else random.

    `tiny-random` takes the reference model's seeded weights, so our engine and the reference
    backend serve identical tokens; any other config without weights is random on the device.
    """
    if source.weights_dir is not None:
        state = load_state_dict(source.weights_dir, device)
        return Qwen3.from_state_dict(source.config, state, device, dtype)
    if source.name == TINY_RANDOM:
        state = build_reference_model(source).state_dict()
        return Qwen3.from_state_dict(source.config, state, device, dtype)
    return Qwen3.random(source.config, device, dtype, seed)
