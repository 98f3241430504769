"""How long the serving code path takes to load a real-size checkpoint from disk, and its peak.

    python -m benchmarks.bench_load DIR [--config vendor/configs/qwen3-30b-a3b-instruct-2507]

Writes random weights of the config's shape into DIR in the Hub's layout (per-expert tensors,
one safetensors file a layer; skipped if DIR already holds them), drops the page cache when
allowed (root), then times the start-up check and `replica.loading.model.load_model` and prints a JSON
line: load time, GB/s, peak GPU memory allocated against the final weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from replica.loading.model import load_model, random_model
from replica.loading.servable import check_servable
from replica.loading.source import VENDORED_CONFIGS, resolve


def write_random_checkpoint(config_dir: Path, target: Path, device: str = "cuda") -> None:
    """One safetensors file per layer plus one for embeddings, head and final norm."""
    source = resolve(str(config_dir), random_weights=True)
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text((config_dir / "config.json").read_text())
    config = source.config
    for i in range(config.num_hidden_layers):
        layer_config = type(config).from_dict({**config.to_dict(), "num_hidden_layers": 1})
        layer = random_model(layer_config, device, torch.bfloat16, i).layers[0]
        save_file(
            _hub_tensors(layer, f"model.layers.{i}."), str(target / f"layer-{i:05d}.safetensors")
        )
    model_config = type(config).from_dict({**config.to_dict(), "num_hidden_layers": 0})
    head = random_model(model_config, device, torch.bfloat16, 0)
    rest = {"model.embed_tokens.weight": head.embed, "model.norm.weight": head.final_norm}
    if not config.tie_word_embeddings:
        rest["lm_head.weight"] = head.lm_head
    save_file({k: v.cpu().contiguous() for k, v in rest.items()}, str(target / "rest.safetensors"))


def _hub_tensors(layer, p: str) -> dict[str, torch.Tensor]:
    """A layer's fused tensors split back into the Hugging Face names they were made of."""
    attn, mlp = p + "self_attn.", p + "mlp."
    q_rows = layer.o_proj.shape[1]
    kv_rows = (layer.qkv.shape[0] - q_rows) // 2
    q, k, v = layer.qkv.split((q_rows, kv_rows, kv_rows))
    out = {
        p + "input_layernorm.weight": layer.input_norm,
        p + "post_attention_layernorm.weight": layer.post_norm,
        attn + "q_proj.weight": q,
        attn + "k_proj.weight": k,
        attn + "v_proj.weight": v,
        attn + "o_proj.weight": layer.o_proj,
        attn + "q_norm.weight": layer.q_norm,
        attn + "k_norm.weight": layer.k_norm,
        mlp + "gate.weight": layer.mlp.router,
    }
    for e in range(layer.mlp.num_experts):
        gate, up = layer.mlp.gate_up[e].chunk(2)
        out[f"{mlp}experts.{e}.gate_proj.weight"] = gate
        out[f"{mlp}experts.{e}.up_proj.weight"] = up
        out[f"{mlp}experts.{e}.down_proj.weight"] = layer.mlp.down[e]
    return {name: t.cpu().contiguous() for name, t in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument(
        "--config", type=Path, default=VENDORED_CONFIGS / "qwen3-30b-a3b-instruct-2507"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not (args.dir / "rest.safetensors").exists():
        write_random_checkpoint(args.config, args.dir)
    os.sync()
    size = sum(f.stat().st_size for f in args.dir.glob("*.safetensors"))
    dropped = subprocess.run("echo 3 > /proc/sys/vm/drop_caches", shell=True, check=False)
    start = time.perf_counter()
    check_servable(resolve(str(args.dir)))
    check_s = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = load_model(resolve(str(args.dir)), "cuda", torch.bfloat16)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    report = {
        "device": torch.cuda.get_device_name(),
        "checkpoint_gb": round(size / 1e9, 2),
        "page_cache_dropped": dropped.returncode == 0,
        "check_s": round(check_s, 2),
        "load_s": round(load_s, 2),
        "load_gb_s": round(size / 1e9 / load_s, 2),
        "weights_gb": round(model.weight_bytes() / 1e9, 2),
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
    }
    print(json.dumps(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
