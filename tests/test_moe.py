"""Qwen3-MoE in our engine against transformers' `Qwen3MoeForCausalLM` on the same checkpoint.

The checkpoint is a tiny MoE (8 experts, top-2, 3 layers) saved sharded by `save_pretrained`, in
the Hub's per-expert layout, with the real tokenizer's vocabulary and an untied head.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from replica.engine.engine import Engine
from replica.engine.kv_cache import bytes_per_token
from replica.engine.request import EngineRequest
from replica.loading.model import random_model
from replica.loading.reader import CheckpointReader
from replica.loading.source import VENDORED_CONFIGS, resolve
from replica.loading.weights import expected_tensor_names
from replica.model.qwen3 import Qwen3
from replica.ops import select_ops
from replica.ops.feed_forward import TorchMoE
from replica.ops.layer import TritonLayerOps
from replica.ops.mlp import SparseMoE
from replica.startup import load_engine
from replica.wire.spec import EngineConfig
from tests.test_engine import idle, prefill_logits
from tests.transformers_oracle import greedy_continuations

NEW_TOKENS = 64
PROMPT_LENGTHS = (5, 17, 40, 3, 64, 9, 28, 1)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_moe_config(**overrides) -> Qwen3MoeConfig:
    settings = dict(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        initializer_range=0.2,  # large enough that routing and greedy output vary by prompt
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
    )
    return Qwen3MoeConfig(**{**settings, **overrides})


def save_tiny_moe(directory: Path, **overrides) -> Path:
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(tiny_moe_config(**overrides)).save_pretrained(
        directory, max_shard_size="2MB"
    )
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_moe(tmp_path_factory.mktemp("tiny-moe"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    return Qwen3MoeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 151_000, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def run(engine: Engine, requests: list[EngineRequest]) -> dict:
    for request in requests:
        engine.add(request)
    results = {}
    while engine.has_work():
        for result in engine.step():
            results[result.id] = result
    return results


def test_checkpoint_is_sharded_per_expert_and_read_as_moe(checkpoint):
    assert len(list(checkpoint.glob("*.safetensors"))) > 1
    source = resolve(str(checkpoint))
    assert source.config.model_type == "qwen3_moe"
    assert source.config.num_experts == 8  # written as num_local_experts by transformers 5
    names = CheckpointReader.from_dir(checkpoint).names
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in names
    assert names == expected_tensor_names(source.config)


def test_vendored_30b_config_reads_as_moe_with_96_kib_of_kv_a_token():
    config = resolve(str(VENDORED_CONFIGS / "qwen3-30b-a3b-instruct-2507"), True).config
    assert (config.num_experts, config.num_experts_per_tok, config.norm_topk_prob) == (128, 8, True)
    assert bytes_per_token(config, torch.bfloat16) == 96 * 1024


def test_random_weights_build_the_moe_not_a_dense_model():
    config = tiny_moe_config()
    model = random_model(config, "cpu", torch.float32, 0)
    moe = model.layers[0].mlp
    assert isinstance(moe, SparseMoE)
    assert moe.gate_up.shape == (8, 2 * 32, 64)
    assert moe.down.shape == (8, 64, 32)
    with torch.device("meta"):
        theirs = Qwen3MoeForCausalLM(config)
    assert model.weight_bytes() == 4 * sum(p.numel() for p in theirs.parameters())


def test_the_cpu_moe_from_the_residual_is_the_add_rms_norm_then_the_moe():
    """The CPU's MoE never takes the residual itself, and where asked to, does what the layer
    does without it: the layer ops' add + RMSNorm, then the MoE."""
    from replica.ops.layer import TorchLayerOps

    moe = random_model(tiny_moe_config(), "cpu", torch.float32, 0).layers[0].mlp
    h, delta = torch.randn(2, 3, 64)
    weight = torch.rand(64) + 0.5
    ours = TorchMoE()
    assert not ours.takes_residual(h, decode=True)
    got_h, got = ours.from_residual((h, delta, weight, 1e-6), moe, True)
    want_h, x = TorchLayerOps(4, 2, 16, 1e-6, torch.ones(8)).add_rms_norm(h, delta, weight)
    assert torch.equal(got_h, want_h) and torch.equal(got, ours(x, moe, True))


def test_loaded_experts_are_the_checkpoints(checkpoint, reference):
    model = Qwen3(resolve(str(checkpoint)).config, _load(checkpoint))
    theirs = reference.model.layers[1].mlp
    ours = model.layers[1].mlp
    torch.testing.assert_close(ours.gate_up, theirs.experts.gate_up_proj, rtol=0, atol=0)
    torch.testing.assert_close(ours.down, theirs.experts.down_proj, rtol=0, atol=0)
    torch.testing.assert_close(ours.router, theirs.gate.weight, rtol=0, atol=0)
    assert not torch.equal(model.lm_head, model.embed)  # untied head


def _load(checkpoint: Path):
    from replica.loading.weights import load_checkpoint

    config = resolve(str(checkpoint)).config
    return load_checkpoint(CheckpointReader.from_dir(checkpoint), config, "cpu", torch.float32)


def test_greedy_tokens_equal_transformers_with_refill(checkpoint, reference, prompts):
    """Four slots for eight prompts of mixed lengths: rows are refilled mid-batch."""
    expected = greedy_continuations(reference, prompts, NEW_TOKENS)
    caps = [NEW_TOKENS, 20, NEW_TOKENS, 33, 1, NEW_TOKENS, 7, NEW_TOKENS]
    engine = load_engine(resolve(str(checkpoint)), EngineConfig(max_batch=4, max_model_len=256))
    requests = [EngineRequest(i, p, c) for i, (p, c) in enumerate(zip(prompts, caps, strict=True))]
    results = run(engine, requests)
    for i, cap in enumerate(caps):
        assert len(expected[i]) == NEW_TOKENS  # no EOS from these weights: a full comparison
        assert results[i].output_ids == expected[i][:cap]
    assert engine.stats.prefill_calls > 1 and idle(engine)


def test_scoring_is_argmax_of_transformers_logits(checkpoint, reference, prompts):
    choices = [[32, 33, 34, 35], [362, 425, 356, 422], [11, 12]]
    engine = load_engine(resolve(str(checkpoint)), EngineConfig(max_batch=4, max_model_len=256))
    requests = [EngineRequest(i, prompts[i], 0, ids) for i, ids in enumerate(choices)]
    results = run(engine, requests)
    for i, ids in enumerate(choices):
        with torch.no_grad():
            logits = reference(torch.tensor([prompts[i]])).logits[0, -1, ids]
        assert results[i].choice_index == int(logits.argmax())
        ours = prefill_logits(engine, prompts[i])[ids]
        torch.testing.assert_close(ours, logits, rtol=1e-4, atol=1e-5)


# On the GPU: the fused kernels at the real shape.


def real_moe(seed: int = 0) -> tuple[Qwen3MoeConfig, SparseMoE, Qwen3]:
    config = resolve(str(VENDORED_CONFIGS / "qwen3-30b-a3b-instruct-2507"), True).config
    config.num_hidden_layers = 1
    model = random_model(config, "cuda", torch.bfloat16, seed, select_ops(torch.device("cuda")))
    return config, model.layers[0].mlp, model


def rel_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).norm() / reference.float().norm()).item()


@gpu
@pytest.mark.gpu
def test_fused_moe_matches_the_expert_loop_at_the_real_shape():
    config, moe, model = real_moe()
    norms = TritonLayerOps(32, 4, 128, 1e-6, torch.ones(64, device="cuda"))
    weight = torch.ones(config.hidden_size, device="cuda", dtype=torch.bfloat16)
    fused_moe = model.ops.moe
    for tokens in (1, 3, 8, 64, 256, 1000, 4096, 16384):
        x = torch.randn(tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
        h = torch.zeros_like(x)
        expected = TorchMoE()(x, moe, False)
        pairs = fused_moe(x, moe, False)
        error = rel_error(norms.add_rms_norm(h, pairs, weight)[0], expected)
        assert error < 1e-2, (tokens, error)
        counts = fused_moe.expert_counts(moe)
        assert int(counts.sum()) == tokens * config.num_experts_per_tok
        assert torch.equal(fused_moe(x, moe, False), pairs)  # wherever the atomics filed each


@gpu
@pytest.mark.gpu
def test_full_shape_moe_block_close_to_transformers_in_bf16():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config, moe, model = real_moe(seed=3)
    with torch.device("cuda"):
        block = Qwen3MoeSparseMoeBlock(config).to(torch.bfloat16).eval()
    block.gate.weight.data.copy_(moe.router)
    block.experts.gate_up_proj.data.copy_(moe.gate_up)
    block.experts.down_proj.data.copy_(moe.down)
    x = torch.randn(1, 300, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    norms = TritonLayerOps(32, 4, 128, 1e-6, torch.ones(64, device="cuda"))
    h = torch.zeros_like(x[0])
    ours = norms.add_rms_norm(h, model.ops.moe(x[0], moe, False), torch.ones_like(h[0]))[0]
    with torch.no_grad():
        theirs = block(x)[0]
        exact = block.float()(x.float())[0]
    print(f"bf16 vs fp32: ours {rel_error(ours, exact):.4f}, theirs {rel_error(theirs, exact):.4f}")
    assert rel_error(ours, exact) < 1.5 * rel_error(theirs, exact) + 1e-3


def test_the_server_serves_the_moe_checkpoint_end_to_end(checkpoint):
    from tests.server_process import ServerProcess, request

    mcq = (
        "The following is a multiple choice question about medicine.\nWhich organ pumps blood?\n"
        "A. Liver\nB. Heart\nC. Lung\nD. Kidney\nAnswer:"
    )
    with ServerProcess("--model", str(checkpoint)) as server:
        _, health, _ = request(server.url + "/health", method="GET")
        body = {"prompt": ["Write a haiku about rain.", mcq], "max_tokens": 8}
        status, answer, _ = request(server.url + "/v1/completions", body)
    assert health["replicas"][0]["model_type"] == "qwen3_moe"
    assert status == 200
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] >= 8
    assert answer["choices"][1]["text"] in {f"The answer is ({x})." for x in "ABCD"}
