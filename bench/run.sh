#!/usr/bin/env bash
# Tail Service beside direct, LiteLLM and Portkey in one run of the shared harness.
#   bash bench/run.sh [extra run_baseline.py flags]     (results in ./bench-results/<timestamp>/)
# Needs ../shared/bench (the harness) and its setup (wrk, LiteLLM and Portkey installs).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HARNESS=${HARNESS:-$ROOT/../shared/bench}
export GATEWAY_NAME=tail
export GATEWAY_URL='http://127.0.0.1:{port}/v1'
export GATEWAY_KEY=${GATEWAY_KEY:-unused}
export GATEWAY_ENV="BENCH_UPSTREAM={upstream_base}||BENCH_UPSTREAM_KEY=sk-fake-upstream${GATEWAY_EXTRA_ENV:+||$GATEWAY_EXTRA_ENV}"
export GATEWAY_CMD="$ROOT/.venv/bin/tail-service serve --config ${BENCH_CONFIG:-$ROOT/bench/tail-bench.yaml} --port {port}"
exec "$HARNESS/run_baseline.sh" --out "$ROOT/bench-results/$(date +%Y%m%d-%H%M%S)" "$@"
