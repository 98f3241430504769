"""Our Qwen3 forward against transformers' Qwen3ForCausalLM on the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from replica.engine.batch_inputs import pack_prefill
from replica.engine.kv_cache import BLOCK_SIZE, CacheShape, KVCache
from replica.loading.model import model_from_reader, random_model
from replica.loading.reader import CheckpointReader
from replica.loading.reference import build_reference_model
from replica.loading.source import VENDORED_CONFIGS, resolve
from replica.model.architecture import attention_shape
from replica.model.qwen3 import Batch, Qwen3
from replica.ops import select_ops
from replica.ops.attention import BlockTables
from replica.ops.feed_forward import silu_mul
from replica.ops.layer import TorchLayerOps

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def prefill_then_decode(
    model: Qwen3, prompt: list[int], split: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of every prompt position: the first `split` by two prefill chunks (the first
    packed beside another prompt, the second reading the first from the cache as its context),
    the rest by teacher-forced decode steps, all through scattered blocks of a paged cache."""
    dev, size = torch.device(device), BLOCK_SIZE
    _, kv_heads, head_dim = attention_shape(model.config)
    shape = CacheShape(model.config.num_hidden_layers, 64, size, kv_heads, head_dim)
    cache = KVCache(shape, model.dtype, dev)
    blocks = [(7 * i + 3) % 60 for i in range(-(-len(prompt) // size))]  # out of order
    first = split // 2
    chunks = [(prompt, 0, first, blocks), ([7] * 3, 0, 3, [61])]
    prefill = [model.logits(model.forward(pack_prefill(chunks, size, dev), cache))]
    rest = pack_prefill([(prompt, first, split, blocks)], size, dev)
    assert rest.rows is not None and rest.rows.context is not None
    prefill.append(model.logits(model.forward(rest, cache)))
    tables = torch.tensor([blocks], dtype=torch.int32, device=dev)
    decoded = []
    for pos in range(split, len(prompt)):
        step = Batch(
            input_ids=torch.tensor([prompt[pos]], device=dev),
            positions=torch.tensor([pos], device=dev),
            slots=torch.tensor([blocks[pos // size] * size + pos % size], device=dev),
            paged=BlockTables(
                tables,
                torch.tensor([0], device=dev),
                torch.tensor([pos + 1], dtype=torch.int32, device=dev),
            ),
        )
        decoded.append(model.logits(model.forward(step, cache)[0]))
    return torch.cat([prefill[0][:first], prefill[1]]), torch.stack(decoded)


def test_fp32_logits_match_transformers():
    source = resolve("tiny-random")
    reference = build_reference_model(source)
    model = model_from_reader(
        CheckpointReader.from_state_dict(reference.state_dict()),
        source.config,
        "cpu",
        torch.float32,
    )
    prompt = torch.randint(
        0, source.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0)
    )
    expected = reference(prompt[None]).logits[0]
    prefill, decoded = prefill_then_decode(model, prompt.tolist(), 25, "cpu")
    torch.testing.assert_close(prefill, expected[:25], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(decoded, expected[25:], rtol=1e-4, atol=1e-5)


def test_random_weights_have_transformers_shapes():
    config = resolve("tiny-random").config
    ours = random_model(config, "cpu", torch.float32, 0)
    theirs = build_reference_model(resolve("tiny-random"))
    assert ours.weight_bytes() == 4 * sum(p.numel() for p in theirs.parameters())
    assert ours.layers[0].qkv.shape == (
        (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim,
        config.hidden_size,
    )


def test_rope_theta_comes_from_the_config():
    config = Qwen3Config.from_pretrained(VENDORED_CONFIGS / "qwen3-4b-instruct-2507")
    model = random_model(resolve("tiny-random").config, "cpu", torch.float32, 0)
    assert model.inv_freq[1].item() == pytest.approx(1e6 ** (-2 / 16))
    from replica.model.architecture import rope_theta

    assert rope_theta(config) == 5_000_000


def rel_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).norm() / reference.float().norm()).item()


@gpu
@pytest.mark.gpu
def test_bf16_4b_logits_close_to_transformers():
    """Full Qwen3-4B shape, random weights, bf16: prefill and teacher-forced decode logits.

    Yardstick: the same weights in fp32. Ours in bf16 must be about as close to it as
    transformers in bf16 is (both round after every op; random weights amplify rounding)."""
    config = resolve(str(VENDORED_CONFIGS / "qwen3-4b-instruct-2507"), random_weights=True).config
    torch.manual_seed(0)
    with torch.device("cuda"):  # not `.to(bf16)`: that would round RoPE's inv_freq too
        reference = Qwen3ForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    assert reference.model.rotary_emb.inv_freq.dtype == torch.float32
    reader = CheckpointReader.from_state_dict(reference.state_dict())
    model = model_from_reader(
        reader, config, "cuda", torch.bfloat16, select_ops(torch.device("cuda"))
    )
    prompt = torch.randint(0, config.vocab_size, (300,), device="cuda")
    with torch.no_grad():
        theirs = reference(prompt[None]).logits[0].float()
        ours = torch.cat(prefill_then_decode(model, prompt.tolist(), 280, "cuda"))
        del model
        exact = reference.float()(prompt[None]).logits[0]
    ours_error, theirs_error = rel_error(ours, exact), rel_error(theirs, exact)
    print(f"bf16 vs fp32 logits: ours {ours_error:.4f}, transformers {theirs_error:.4f}")
    assert ours_error < 1.5 * theirs_error
    assert rel_error(ours, theirs) < 2 * theirs_error


@gpu
@pytest.mark.gpu
def test_fused_ops_match_torch_ops():
    from replica.kernels.elementwise import silu_mul as silu_mul_triton
    from replica.ops.layer import TritonLayerOps

    gen = torch.Generator(device="cuda").manual_seed(4)
    dev, dt = "cuda", torch.bfloat16

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=dt, generator=gen)

    heads, kv_heads, dim, hidden = 32, 8, 128, 2560
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, dim, 2, device=dev).float() / dim)
    ops = [cls(heads, kv_heads, dim, 1e-6, inv_freq) for cls in (TorchLayerOps, TritonLayerOps)]
    h, delta, weight = randn(37, hidden), randn(37, hidden), 1 + randn(hidden)
    for a, b in zip(
        ops[0].add_rms_norm(h, delta, weight), ops[1].add_rms_norm(h, delta, weight), strict=True
    ):
        assert rel_error(b, a) < 1e-2
    assert (
        rel_error(ops[1].add_rms_norm(h, None, weight)[1], ops[0].add_rms_norm(h, None, weight)[1])
        < 1e-2
    )
    gate_up = randn(37, 2 * 9728)
    assert rel_error(silu_mul_triton(gate_up), silu_mul(gate_up)) < 1e-2

    qkv, q_norm, k_norm = randn(3 * 5, (heads + 2 * kv_heads) * dim), randn(dim), randn(dim)
    positions = torch.randint(0, 4000, (3 * 5,), device=dev)
    slots = torch.randperm(7 * 16, device=dev)[: 3 * 5]  # flat slots of a 7-block cache
    caches = [randn(2, 7, 16, kv_heads, dim).unbind(0) for _ in ops]
    caches[1] = [c.clone() for c in caches[0]]
    outs = [
        op.rope_store(qkv, q_norm, k_norm, positions, slots, *c)
        for op, c in zip(ops, caches, strict=True)
    ]
    for a, b in zip(outs[0], outs[1], strict=True):
        assert rel_error(b, a) < 1e-2
    for a, b in zip(caches[0], caches[1], strict=True):
        a, b = a.flatten(0, 1), b.flatten(0, 1)
        assert rel_error(b[slots], a[slots]) < 1e-2
        a[slots], b[slots] = 0, 0
        assert torch.equal(a, b)  # nothing else was touched
