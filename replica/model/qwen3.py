"""Our Qwen3 forward (dense or MoE): plain weight tensors, QKV and gate/up fused at load, every
op (attention included) from the device's `Ops` (replica.ops.select).

The math follows transformers' `Qwen3ForCausalLM` operation for operation (see `replica.ops.layer`),
so that fp32 greedy tokens match it exactly. Activations are [tokens, features] over the packed
tokens of a batch: no padding, so every matrix multiply does only live work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PretrainedConfig

from replica.model.architecture import attention_shape, rope_theta
from replica.model.weights import LayerWeights, ModelWeights
from replica.ops import Ops, select_ops
from replica.ops.attention import BlockTables, DecodeStep, LayerCache, PackedRows
from replica.ops.mlp import SparseMoE


@dataclass
class Batch:
    """One forward's tokens, packed. Prefill takes a chunk of each of its sequences (`rows` says
    where each lies, and what each already holds in its blocks); decode takes one token per row
    (`paged` says which blocks each row reads, and how many of their tokens, this one included)."""

    input_ids: Tensor  # [T] int64
    positions: Tensor  # [T] int64
    slots: Tensor  # [T] int64: the flat KV slot (block * block_size + offset) each token writes
    rows: PackedRows | None = None  # prefill
    paged: BlockTables | None = None  # decode


class KVLayers(Protocol):
    """The KV cache as the forward sees it: each layer's K and V blocks (the engine owns the
    pool and who holds which block)."""

    def layer(self, index: int) -> LayerCache: ...


class Qwen3:
    """Qwen3 causal LM (dense or MoE) over an external KV cache: the whole model, or one
    pipeline stage of it (its layers, with the embedding if first and the LM head if last;
    `replica.model.weights.ModelWeights`). The cache's layer i is the stage's i-th layer."""

    def __init__(
        self, config: PretrainedConfig, weights: ModelWeights, ops: Ops | None = None
    ) -> None:
        """`ops`: the device's (`select_ops`); None: the CPU's."""
        self.config = config
        self.embed = weights.embed
        self.layers, self.first_layer = weights.layers, weights.first_layer
        self.final_norm = weights.final_norm
        self.lm_head = weights.lm_head
        self.num_heads, self.num_kv_heads, self.head_dim = attention_shape(config)
        self.eps = config.rms_norm_eps
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        self.inv_freq = (1.0 / rope_theta(config) ** exponents).to(self.device)
        self.ops = ops or select_ops(torch.device("cpu"))
        self.layer_ops = self.ops.layer(
            self.num_heads, self.num_kv_heads, self.head_dim, self.eps, self.inv_freq
        )

    @property
    def device(self) -> torch.device:
        return self.final_norm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.final_norm.dtype

    @property
    def is_first(self) -> bool:
        return self.embed is not None

    @property
    def is_last(self) -> bool:
        return self.lm_head is not None

    def weight_bytes(self) -> int:
        """Bytes of every weight once (a tied embedding counts once): a dense decode step reads
        them all; an MoE step reads only the experts it routes to."""
        tensors = {id(t): t for layer in self.layers for t in layer.tensors()}
        for t in (self.embed, self.final_norm, self.lm_head):
            if t is not None:
                tensors[id(t)] = t
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def active_params(self) -> int:
        """Weights one token multiplies in the layers (the MoE's router and top-k experts)."""
        return sum(layer.active_params() for layer in self.layers)

    def forward(self, batch: Batch, cache: KVLayers) -> Tensor:
        """Hidden states [T, hidden] after the final norm; writes this batch's K/V to `cache`."""
        return self.forward_stage(batch, cache)[1]

    def forward_stage(
        self, batch: Batch, cache: KVLayers, entering: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """(residual, normed) [T, hidden] after this stage's layers, writing their K/V to
        `cache`: the first stage starts from the embedding, a later one from `entering`, the
        pair the stage before it returned."""
        ops, layer_ops, layers = self.ops, self.layer_ops, self.layers
        decode = batch.paged is not None
        step = DecodeStep(batch.positions, batch.slots, batch.paged) if decode else None
        if entering is None:
            assert self.embed is not None, "a later stage continues from the previous one's pair"
            h, x = layer_ops.add_rms_norm(
                F.embedding(batch.input_ids, self.embed), None, layers[0].input_norm
            )
        else:
            h, x = entering
        for index, w in enumerate(layers):
            kv = cache.layer(index)
            qkv = ops.linear(x, w.qkv)
            if step is not None:
                out = layer_ops.attend_decode(ops.attention, qkv, (w.q_norm, w.k_norm), kv, step)
            else:
                assert batch.rows is not None
                q, k, v = layer_ops.rope_store(
                    qkv, w.q_norm, w.k_norm, batch.positions, batch.slots, *kv
                )
                out = ops.attention.prefill(q, k, v, kv, batch.rows)
            attended = ops.linear(out.reshape(h.shape[0], -1), w.o_proj)
            h, delta = self._feed_forward(h, attended, w, decode)
            next_norm = layers[index + 1].input_norm if index + 1 < len(layers) else self.final_norm
            h, x = layer_ops.add_rms_norm(h, delta, next_norm)
        return h, x

    def _feed_forward(
        self, h: Tensor, attended: Tensor, w: LayerWeights, decode: bool
    ) -> tuple[Tensor, Tensor]:
        """(h + attended, the MLP's output of its post-attention RMSNorm, or the MoE's: [T *
        top_k, hidden] from the fused experts; the MoE may take the add + RMSNorm itself)."""
        mlp, moe = w.mlp, self.ops.moe
        if isinstance(mlp, SparseMoE) and moe.takes_residual(h, decode):
            return moe.from_residual((h, attended, w.post_norm, self.eps), mlp, decode)
        h, x = self.layer_ops.add_rms_norm(h, attended, w.post_norm)
        if isinstance(mlp, SparseMoE):
            return h, moe(x, mlp, decode)
        return h, self.ops.mlp(x, mlp)

    def logits(self, hidden: Tensor) -> Tensor:
        assert self.lm_head is not None, "only the last stage has the LM head"
        return F.linear(hidden, self.lm_head)
