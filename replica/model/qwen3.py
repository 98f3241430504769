"""Our Qwen3 forward (dense or MoE): plain weight tensors, QKV and gate/up fused at load,
attention pluggable.

The math follows transformers' `Qwen3ForCausalLM` operation for operation (see `replica.model.ops`),
so that fp32 greedy tokens match it exactly. Activations are [tokens, features] over the packed
tokens of a batch: no padding, so every matrix multiply does only live work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PretrainedConfig

from replica.attention import AttentionBackend, BlockTables, CachedContext, PackedRows
from replica.engine.kv_cache import KVCache
from replica.model.architecture import attention_shape, rope_theta
from replica.model.ops import TorchOps
from replica.model.weights import ModelWeights


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

    @classmethod
    def prefill(
        cls, chunks: list[tuple[list[int], int, int, list[int]]], block_size: int, device
    ) -> Batch:
        """`chunks`: (tokens, start, end, blocks) for each row: tokens start..end are computed,
        0..start are already in `blocks`."""
        host = []
        for tokens, start, end, blocks in chunks:
            positions = torch.arange(start, end)
            table = torch.tensor(blocks, dtype=torch.int64)
            slots = table[positions // block_size] * block_size + positions % block_size
            host.append(torch.stack((torch.tensor(tokens[start:end]), positions, slots)))
        input_ids, positions, slots = torch.cat(host, dim=1).to(device).unbind(0)
        context = None  # when no row has tokens cached before
        if any(start for _, start, _, _ in chunks):
            context = CachedContext.from_blocks(
                [blocks for *_, blocks in chunks], [start for _, start, _, _ in chunks], device
            )
        lengths = [end - start for _, start, end, _ in chunks]
        return cls(
            input_ids, positions, slots, rows=PackedRows.from_lengths(lengths, device, context)
        )


class Qwen3:
    """Qwen3 causal LM (dense or MoE) over an external KV cache and attention backend."""

    def __init__(
        self, config: PretrainedConfig, weights: ModelWeights, ops: type[TorchOps] = TorchOps
    ) -> None:
        """`ops`: TorchOps, or the fused kernels' TritonOps on CUDA (replica.backends chooses)."""
        self.config = config
        self.embed = weights.embed
        self.layers = weights.layers
        self.final_norm = weights.final_norm
        self.lm_head = weights.lm_head
        self.num_heads, self.num_kv_heads, self.head_dim = attention_shape(config)
        self.eps = config.rms_norm_eps
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        self.inv_freq = (1.0 / rope_theta(config) ** exponents).to(self.device)
        self.ops = ops(self.num_heads, self.num_kv_heads, self.head_dim, self.eps, self.inv_freq)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def weight_bytes(self) -> int:
        """Bytes of every weight once (a tied embedding counts once): a dense decode step reads
        them all; an MoE step reads only the experts it routes to."""
        tensors = {id(t): t for layer in self.layers for t in layer.tensors()}
        for t in (self.embed, self.final_norm, self.lm_head):
            tensors[id(t)] = t
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def active_params(self) -> int:
        """Weights one token multiplies in the layers (the MoE's router and top-k experts)."""
        return sum(layer.active_params() for layer in self.layers)

    def forward(self, batch: Batch, cache: KVCache, attention: AttentionBackend) -> Tensor:
        """Hidden states [T, hidden] after the final norm; writes this batch's K/V to `cache`."""
        ops, layers = self.ops, self.layers
        h, x = ops.add_rms_norm(
            F.embedding(batch.input_ids, self.embed), None, layers[0].input_norm
        )
        for index, w in enumerate(layers):
            kv = cache.layer(index)
            q, k, v = ops.rope_store(
                ops.linear(x, w.qkv), w.q_norm, w.k_norm, batch.positions, batch.slots, *kv
            )
            if batch.paged is not None:
                out = attention.decode(q, kv, batch.paged)
            else:
                assert batch.rows is not None
                out = attention.prefill(q, k, v, kv, batch.rows)
            attended = ops.linear(out.reshape(h.shape[0], -1), w.o_proj)
            h, x = ops.add_rms_norm(h, attended, w.post_norm)
            next_norm = layers[index + 1].input_norm if index + 1 < len(layers) else self.final_norm
            h, x = ops.add_rms_norm(h, ops.mlp(x, w.mlp), next_norm)
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.lm_head)
