#!/usr/bin/env bash
# The benchmark with authentication on: Tail Service under `tail-service up` (auth-service,
# secret-service and redis-server as children) and a real API key (no limits unless
# BENCH_KEY_ARGS gives some).
#   bash bench/run-auth.sh [extra run_baseline.py flags]
# BENCH_CONFIG picks another config (bench/tail-bench-usage.yaml: prices, budgets, access log).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE=${BENCH_STATE:-/tmp/tail-bench-state}
TS="$ROOT/.venv/bin/tail-service"
CONFIG=${BENCH_CONFIG:-$ROOT/bench/tail-bench-auth.yaml}
rm -rf "$STATE"
# Start the stack once to create the state directory and a key, then stop it.
BENCH_UPSTREAM=http://127.0.0.1:9/v1 BENCH_UPSTREAM_KEY=x \
  "$TS" up --config "$CONFIG" --port 0 --state-dir "$STATE" 2>"$STATE.log" &
UP=$!
for _ in $(seq 100); do grep -q "listening on" "$STATE.log" 2>/dev/null && break; sleep 0.2; done
# BENCH_KEY_ARGS, e.g. "--rpm 100000000 --tpm 100000000000 --max-concurrency 100000",
# puts the key under (never tripping) rate limits, so every request takes the Redis path.
# shellcheck disable=SC2086
KEY=$("$TS" keys create --name bench --state-dir "$STATE" ${BENCH_KEY_ARGS:-} | tail -n 1)
kill -TERM $UP; wait $UP || true
export GATEWAY_KEY=$KEY
export GATEWAY_NAME=${GATEWAY_NAME:-tail-auth}
export GATEWAY_URL='http://127.0.0.1:{port}/v1'
export GATEWAY_ENV="BENCH_UPSTREAM={upstream_base}||BENCH_UPSTREAM_KEY=sk-fake-upstream"
export GATEWAY_CMD="$TS up --config $CONFIG --port {port} --state-dir $STATE"
exec "$ROOT/../shared/bench/run_baseline.sh" --out "$ROOT/bench-results/auth-$(date +%Y%m%d-%H%M%S)" "$@"
