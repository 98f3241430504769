"""4-bit weights (w4a16): the packed layout, `--quantize int4`, the served checkpoint formats.

Checkpoints are tiny dense and MoE Qwen3s packed by tests/int4_checkpoints.py in each format;
transformers cannot load those formats on this CPU (their kernels' packages are not installed),
so its greedy tokens come from each checkpoint's dequantized fp32 twin.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

from replica.engine.engine import Engine
from replica.engine.request import EngineRequest
from replica.loading.config import UnsupportedModel, tiny_random_config
from replica.loading.model import load_model
from replica.loading.quantization import int4_checkpoint
from replica.loading.servable import check_servable
from replica.loading.source import TINY_RANDOM, resolve
from replica.ops.packed import (
    PackedInt4,
    dequantize,
    linear,
    pack,
    pack_nibbles,
    quantize,
    unpack,
    unpack_nibbles,
)
from replica.startup import load_engine
from replica.wire.spec import EngineConfig
from tests.int4_checkpoints import compress_with_library, write_int4
from tests.server_process import ServerProcess, request
from tests.test_engine import prefill_logits
from tests.test_moe import save_tiny_moe
from tests.transformers_oracle import greedy_continuations

PROMPTS = [[9707, 11, 1879, 0, 3555, 374], [16, 17, 18], list(range(1000, 1040))]
NEW_TOKENS = 24
FORMATS = [  # (format, symmetric, a linear kept in 16 bits)
    ("compressed-tensors", True, None),
    ("compressed-tensors", False, None),
    ("awq", False, "o_proj"),
    ("gptq", True, None),
    ("gptq", False, None),
]


def test_nibbles_round_trip_in_column_order():
    q = torch.randint(0, 16, (3, 5, 64))
    words = pack_nibbles(q)  # the checkpoint formats' sequential order
    assert words.shape == (3, 5, 8) and words.dtype == torch.int32
    assert torch.equal(unpack_nibbles(words), q)
    assert (words[0, 0, 0] & 0xF).item() == q[0, 0, 0].item()  # column 0 in the low bits
    assert ((words[0, 0, 0] >> 28) & 0xF).item() == q[0, 0, 7].item()


def test_our_layout_interleaves_each_group():
    q = torch.randint(0, 16, (3, 5, 64))
    words = pack(q, group_size=32)  # 4 words a group: nibble j of word w is column 4j + w
    assert words.shape == (3, 5, 8) and torch.equal(unpack(words, 32), q)
    for w, j in ((0, 0), (1, 0), (3, 2), (2, 7)):
        for group in (0, 1):
            nibble = (words[1, 2, 4 * group + w] >> (4 * j)) & 0xF
            assert nibble.item() == q[1, 2, 32 * group + 4 * j + w].item()


@pytest.mark.parametrize("symmetric", [False, True])
def test_round_to_nearest_lands_within_half_a_step(symmetric):
    w = torch.randn(2, 48, 256) * torch.rand(2, 48, 1)
    packed = quantize(w, group_size=128, symmetric=symmetric, rows=40)  # rows: chunks of rows
    assert packed.shape == w.shape and packed.numel() == w.numel()
    assert packed.scales.shape == (2, 48, 2)
    error = (dequantize(packed, torch.float32) - w).unflatten(-1, (2, 128)).abs().amax(-1)
    assert (error <= packed.scales * 0.5 + 1e-6).all()
    if symmetric:
        assert (packed.zeros == 8).all()
    else:  # every group spans the 16 levels
        q = unpack(packed.qweight, 128).unflatten(-1, (2, 128))
        assert (q.amin(-1) == 0).all() and (q.amax(-1) == 15).all()


def test_linear_is_dequantize_then_matmul_and_experts_index():
    packed = quantize(torch.randn(4, 24, 64), group_size=32)
    x = torch.randn(5, 64)
    expected = x @ dequantize(packed, torch.float32)[2].t()
    torch.testing.assert_close(linear(x, packed[2]), expected, rtol=0, atol=0)
    assert isinstance(packed[2], PackedInt4) and packed[2].shape == (24, 64)


def _dequantized_twin(model) -> None:
    """Every packed projection of `model` replaced by its dequantized fp32 tensor, in place."""
    for layer in model.layers:
        layer.qkv, layer.o_proj = (dequantize(w, torch.float32) for w in (layer.qkv, layer.o_proj))
        mlp = layer.mlp
        mlp.gate_up, mlp.down = (dequantize(w, torch.float32) for w in (mlp.gate_up, mlp.down))


def _quantized_engine(source) -> Engine:
    return load_engine(source, EngineConfig(max_batch=4, max_model_len=256, quantize="int4"))


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_quantized_logits_equal_the_dequantized_model(model, tmp_path):
    source = resolve(TINY_RANDOM) if model == "dense" else resolve(str(save_tiny_moe(tmp_path)))
    ours, twin = _quantized_engine(source), _quantized_engine(source)
    layer = ours.model.layers[0]
    assert isinstance(layer.qkv, PackedInt4) and isinstance(layer.mlp.down, PackedInt4)
    assert not isinstance(getattr(layer.mlp, "router", ours.model.lm_head), PackedInt4)
    _dequantized_twin(twin.model)
    unquantized = load_engine(source, EngineConfig(max_batch=4, max_model_len=256))
    for prompt in PROMPTS:
        logits = prefill_logits(ours, prompt)
        torch.testing.assert_close(logits, prefill_logits(twin, prompt), rtol=0, atol=0)
        assert not torch.allclose(logits, prefill_logits(unquantized, prompt))  # 4-bit it is
    packed_bytes, full_bytes = ours.model.weight_bytes(), unquantized.model.weight_bytes()
    layers = sum(t.numel() * 4 for t in unquantized.model.layers[0].tensors())
    assert packed_bytes < full_bytes - layers  # the layers' projections shrank


def _greedy(engine: Engine) -> list[list[int]]:
    for i, prompt in enumerate(PROMPTS):
        engine.add(EngineRequest(i, prompt, NEW_TOKENS))
    results = {}
    while engine.has_work():
        results.update((r.id, r.output_ids) for r in engine.step())
    return [results[i] for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def sixteen_bit(tmp_path_factory) -> dict[str, Path]:
    dense = tmp_path_factory.mktemp("dense16")
    torch.manual_seed(0)
    Qwen3ForCausalLM(tiny_random_config()).save_pretrained(dense)
    return {"dense": dense, "moe": save_tiny_moe(tmp_path_factory.mktemp("moe16"))}


@pytest.mark.parametrize("model", ["dense", "moe"])
@pytest.mark.parametrize(("method", "symmetric", "keep"), FORMATS)
def test_checkpoint_greedy_tokens_equal_transformers_on_its_dequantized_twin(
    sixteen_bit, tmp_path, model, method, symmetric, keep
):
    packed, twin = write_int4(sixteen_bit[model], tmp_path, method, 32, symmetric, keep)
    source = resolve(str(packed))
    check_servable(source)  # the start-up check: the format's tensor names, nothing unused
    fmt = int4_checkpoint(source.config)
    assert (fmt.method, fmt.group_size, fmt.symmetric) == (method, 32, symmetric)
    engine = load_engine(source, EngineConfig(max_batch=4, max_model_len=256))
    layer = engine.model.layers[1]
    assert isinstance(layer.qkv, PackedInt4) and isinstance(layer.mlp.gate_up, PackedInt4)
    assert isinstance(layer.o_proj, torch.Tensor) == (keep == "o_proj")
    reference = AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32).eval()
    twin_q = reference.model.layers[1].self_attn.q_proj.weight
    torch.testing.assert_close(dequantize(layer.qkv, torch.float32)[:64], twin_q, rtol=0, atol=0)
    assert _greedy(engine) == greedy_continuations(reference, PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize("symmetric", [False, True])
def test_a_checkpoint_the_compressed_tensors_library_wrote_serves_as_transformers_does(
    sixteen_bit, tmp_path, symmetric
):
    """The format's own library packs and configures it (dense only: it quantizes Linear
    modules, and transformers keeps Qwen3-MoE's experts as fused parameters)."""
    packed, twin = compress_with_library(sixteen_bit["dense"], tmp_path, symmetric)
    source = resolve(str(packed))
    check_servable(source)
    fmt = int4_checkpoint(source.config)
    assert (fmt.method, fmt.group_size, fmt.symmetric) == ("compressed-tensors", 32, symmetric)
    engine = load_engine(source, EngineConfig(max_batch=4, max_model_len=256))
    assert isinstance(engine.model.layers[0].qkv, PackedInt4)
    reference = AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32).eval()
    assert _greedy(engine) == greedy_continuations(reference, PROMPTS, NEW_TOKENS)


def _with_quantization(tmp_path: Path, sixteen_bit: Path, config: dict) -> Path:
    packed, _ = write_int4(sixteen_bit, tmp_path, "gptq", 32, True)
    raw = json.loads((packed / "config.json").read_text())
    (packed / "config.json").write_text(json.dumps({**raw, "quantization_config": config}))
    return packed


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"quant_method": "gptq", "bits": 8, "group_size": 32}, "GPTQ 8-bit"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True}, "act-order"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "quantization 'fp8'"),
        ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, "AWQ 4-bit gemv"),
        ({"quant_method": "awq", "bits": 4, "group_size": -1}, "group size -1"),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "pack-quantized",
                "config_groups": {
                    "g": {"weights": {"num_bits": 8, "type": "int", "strategy": "group"}}
                },
            },
            "not W4A16",
        ),
        ({"quant_method": "compressed-tensors", "format": "float-quantized"}, "float-quantized"),
    ],
)
def test_unserved_quantization_is_refused_at_start_up_in_one_line(
    sixteen_bit, tmp_path, config, says
):
    checkpoint = _with_quantization(tmp_path, sixteen_bit["dense"], config)
    with pytest.raises(UnsupportedModel, match=says):
        check_servable(resolve(str(checkpoint)))


def test_the_refusal_is_one_line_and_exit_status_2(sixteen_bit, tmp_path):
    """The start-up check as the server runs it, in its own process (once: every refusal
    above goes through the same UnsupportedModel line)."""
    fp8 = {"quant_method": "compressed-tensors", "format": "float-quantized"}
    checkpoint = _with_quantization(tmp_path, sixteen_bit["dense"], fp8)
    check = subprocess.run(
        [sys.executable, "-m", "replica.loading.servable", str(checkpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 2 and len(check.stderr.strip().splitlines()) == 1
    assert "float-quantized" in check.stderr


def test_act_order_g_idx_is_refused_when_loading(sixteen_bit, tmp_path):
    packed, _ = write_int4(sixteen_bit["dense"], tmp_path, "gptq", 32, True)
    from safetensors.torch import load_file, save_file

    tensors = load_file(packed / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, packed / "model.safetensors")
    with pytest.raises(UnsupportedModel, match="act-order"):
        load_model(resolve(str(packed)), "cpu", torch.float32)


def test_quantize_refuses_a_checkpoint_already_4_bit(sixteen_bit, tmp_path):
    packed, _ = write_int4(sixteen_bit["dense"], tmp_path, "awq", 32)
    with pytest.raises(UnsupportedModel, match="already quantized"):
        check_servable(resolve(str(packed)), "int4")


@pytest.mark.slow
def test_server_serves_tiny_random_quantized_end_to_end():
    with ServerProcess("--quantize", "int4") as server:
        server.wait_ready()
        status, body, _ = request(
            server.url + "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8,
             "temperature": 0},
        )  # fmt: skip
    assert status == 200
    assert body["usage"]["completion_tokens"] == 8


def test_a_gemv_grid_past_cuda_limit_is_refused_before_launch():
    """A program a pair: 65,536 pairs would not fit a grid's third axis (CUDA: invalid argument
    at launch); the launcher says so instead. The served tables take it under a quarter pair an
    expert only."""
    pytest.importorskip("triton")
    from replica.kernels.int4_gemv import MAX_GRID_Z, GemvTile, w4a16_gemv

    pairs = MAX_GRID_Z + 1
    experts = torch.zeros(pairs, dtype=torch.int32)
    weight = quantize(torch.randn(8, 128))
    with pytest.raises(ValueError, match="at most 65535"):
        w4a16_gemv(torch.zeros(1, 128), weight, GemvTile(8, 8, 4), experts=experts,
                   outputs_per_token=pairs)  # fmt: skip


def test_the_benchmarks_ratios_leave_scoring_out_where_an_engine_did_not_score():
    """`--requests 0` measures decode steps alone: no scoring ratio, the step ratios as ever."""
    from benchmarks.bench_int4 import ratios

    def engine(ms: float, scored: float | None) -> dict:
        result = {"step_ms": {"1": ms}, "floor_fraction": {"1": 0.5}, "rows_of_1000_tokens": 9}
        return result | ({"scoring": {"prompts_per_s": scored}} if scored else {})

    both = ratios(engine(4.0, 200.0), engine(2.4, 180.0), "dense")
    assert both["dense_step_ratio"] == {"1": 0.6} and both["dense_scoring_ratio"] == 0.9
    steps = ratios(engine(4.0, None), engine(2.4, None), "dense")
    assert steps["dense_step_ratio"] == {"1": 0.6} and "dense_scoring_ratio" not in steps
