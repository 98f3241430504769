"""System 3 thinking: a Thinking-2507 model of the 30B-A3B's shape (random weights, so every
thought runs to its budget: the worst case) serving the course schedule, sped up.

    python -m benchmarks.bench_reasoning --votes 1 --out OUT/votes-1 [--speed 4]
    python -m benchmarks.bench_reasoning --combine OUT/votes-1 OUT/votes-3 --out FILE.json

A run builds the model directory (the Instruct-2507 sibling's config, the vendored tokenizer,
the Thinking-2507 chat template, its generation_config.json sampling), serves it through
loadtest/serve_and_load.sh under the accuracy profile with `--mcq-votes`, and writes
`summary.json`: every batch answered or not, latency p50/p99, tokens a prompt. `--combine`
joins the runs' summaries into one JSON with an ISO date (docs/perf/reasoning-<device>.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
INSTRUCT_CONFIG = ROOT / "vendor" / "configs" / "qwen3-30b-a3b-instruct-2507"
THINKING_TEMPLATE = ROOT / "vendor" / "qwen3-thinking-2507-template" / "tokenizer_config.json"
# Qwen3-30B-A3B-Thinking-2507's generation_config.json sampling (its model card's settings)
THINKING_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
GOLD = ROOT / "vendor" / "data" / "dev_requests_gold.jsonl"


def thinking_model_dir(target: Path) -> Path:
    """A config-only Thinking-2507 directory for --random-weights."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(INSTRUCT_CONFIG / "config.json", target / "config.json")
    for piece in (ROOT / "vendor" / "qwen3-tokenizer").iterdir():
        shutil.copy(piece, target / piece.name)
    shutil.copy(THINKING_TEMPLATE, target / "tokenizer_config.json")
    (target / "generation_config.json").write_text(json.dumps(THINKING_SAMPLING))
    return target


def serve_schedule(out: Path, votes: int, speed: float, lengths: str, server_args: str) -> None:
    model = thinking_model_dir(Path(tempfile.mkdtemp()) / "qwen3-30b-a3b-thinking-2507")
    flags = f"--profile accuracy --mcq-votes {votes} {server_args}"
    env = {**os.environ, "CONFIG": str(model), "SERVER_ARGS": flags}
    command = ["loadtest/serve_and_load.sh", "0", str(out), "replay", "--speed", str(speed)]
    command += ["--lengths", lengths, "--gold", str(GOLD), "--seed", "1"]
    subprocess.run(command, cwd=ROOT, env=env, check=True)


def metric(text: str, name: str) -> float:
    """A counter's value in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def summary(out: Path, votes: int) -> dict[str, Any]:
    report = json.loads((out / "report.json").read_text())
    metrics = (out / "metrics.txt").read_text()
    served = report["prompts_served"]
    return {
        "votes": votes,
        "settings": report["settings"],
        "batches_sent": report["http_requests_sent"],
        "batches_answered": report["http_requests_served"],
        "batch_errors": report["http_request_errors"],
        "prompts_served": served,
        "latency_s": {k: report["latency_s"][k] for k in ("p50", "p99", "max")},
        "latency_s_by_task": {
            task: {k: stats["latency_s"][k] for k in ("p50", "p99")}
            for task, stats in report["per_task"].items()
        },
        "tokens_out_per_prompt": metric(metrics, "tokens_out_total") / max(served, 1),
        "tokens_in_per_prompt": metric(metrics, "tokens_in_total") / max(served, 1),
        "window_s": report["window_s"],
        "health": json.loads((out / "health.json").read_text()),
    }


def combine(runs: list[Path], target: Path, device: str) -> None:
    parts = [json.loads((run / "summary.json").read_text()) for run in runs]
    result = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "model": "Qwen3-30B-A3B shape, Thinking-2507 template, random weights",
        "runs": {
            f"votes_{part['votes']}_{part['settings']['lengths']}": {
                k: v for k, v in part.items() if k != "health"
            }
            for part in parts
        },
    }
    target.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--votes", type=int, default=1)
    parser.add_argument("--speed", type=float, default=4.0)
    parser.add_argument(
        "--lengths",
        choices=("fixed", "realistic"),
        default="fixed",
        help="fixed: the course's max_tokens 2048 on every request, so every thought reaches "
        "its budget; realistic: the load test's drawn caps, which cut thoughts short",
    )
    parser.add_argument("--server-args", default="--gpu-memory-gb 79")
    parser.add_argument("--combine", type=Path, nargs="+")
    parser.add_argument("--device", default="unknown", help="the GPU, for --combine")
    args = parser.parse_args()
    if args.combine:
        combine(args.combine, args.out, args.device)
        return
    serve_schedule(args.out, args.votes, args.speed, args.lengths, args.server_args)
    found = summary(args.out, args.votes)
    (args.out / "summary.json").write_text(json.dumps(found, indent=2) + "\n")
    print(json.dumps({k: v for k, v in found.items() if k != "health"}, indent=2))


if __name__ == "__main__":
    main()
