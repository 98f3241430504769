#!/usr/bin/env bash
# Serve random-weight Qwen3-4B on the given GPUs, run one loadtest against it, then stop it.
# For GPU load measurements (docs/PERF.md). Traffic goes to 127.0.0.1 only.
# usage: loadtest/serve_and_load.sh GPUS OUT_DIR LOADTEST_ARGS...
#   e.g. loadtest/serve_and_load.sh 0,1 out/closed2 closed --clients 300 --seconds 150 --lengths realistic
# CONFIG picks the model config (default: the 4B), SERVER_ARGS adds server flags, e.g.
#   CONFIG=vendor/configs/qwen3-30b-a3b-instruct-2507 SERVER_ARGS="--profile accuracy" ...
set -euo pipefail
gpus=$1 out=$2
shift 2
port=${PORT:-8000}
config=${CONFIG:-vendor/configs/qwen3-4b-instruct-2507}
mkdir -p "$out"
python3 server.py --model "$config" --random-weights --gpus "$gpus" --port "$port" \
  --host 127.0.0.1 ${SERVER_ARGS:-} >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
started=$(date +%s)
until curl -sf "http://127.0.0.1:$port/ready" >/dev/null; do  # every replica loaded
  kill -0 $server 2>/dev/null || { tail -30 "$out/server.log"; exit 1; }
  sleep 1
done
echo "server on GPUs $gpus ready after $(($(date +%s) - started)) s"
curl -s "http://127.0.0.1:$port/health" >"$out/health.json"
python3 -m loadtest "$@" --url "http://127.0.0.1:$port/v1/completions" --out "$out"
curl -s "http://127.0.0.1:$port/metrics" >"$out/metrics.txt"
