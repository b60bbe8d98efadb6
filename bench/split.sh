#!/usr/bin/env bash
# CPU per request of each process of `tail-service up` (HTTP service, auth-service,
# secret-service, redis-server) under wrk, everything pinned like the shared harness pins it
# (the stack on core 0, the fake upstream and wrk on core 1).
#   bash bench/split.sh [concurrency] [seconds]
# Environment: KEY_ARGS  limits for the API key (default: limits that never trip; " " for none)
#              DELAY     fake upstream delay in ms (default 0)
#              REDIS_CPU move redis-server to this core after start-up (default: stay on 0)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TS="$ROOT/.venv/bin/tail-service"
CONC=${1:-1}
SECS=${2:-10}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tail-split.XXXXXX")
STATE="$WORK/state"
BENCH_PY=${BENCH_PYTHON:-/tmp/venv-bench/bin/python}
"$BENCH_PY" "$ROOT/../shared/bench/fake_upstream.py" --host 127.0.0.1 --port 18000 --workers 1 \
  --delay-ms "${DELAY:-0}" >/dev/null 2>&1 &
UPS=$!
export BENCH_UPSTREAM=http://127.0.0.1:18000/v1 BENCH_UPSTREAM_KEY=sk-fake-upstream
taskset -c 0 "$TS" up --config "$ROOT/bench/tail-bench-auth.yaml" --port 18080 --state-dir "$STATE" \
  2>"$WORK/up.log" &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null; kill $UPS 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 300); do grep -q "tail-service listening on" "$WORK/up.log" 2>/dev/null && break; sleep 0.1; done
# shellcheck disable=SC2086
KEY=$("$TS" keys create --name split --state-dir "$STATE" \
  ${KEY_ARGS:---rpm 100000000 --tpm 100000000000 --max-concurrency 100000} 2>/dev/null | tail -n 1)
if [ -n "${REDIS_CPU:-}" ]; then taskset -pc "$REDIS_CPU" "$(pgrep -f "redis-server.*$WORK")" >/dev/null; fi
printf '%s' '{"model":"fake-gpt","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":32,"temperature":0}' \
  >"$WORK/body.json"
load() {
  WRK_BODY_FILE="$WORK/body.json" WRK_AUTH="Bearer $KEY" taskset -c 1 wrk -t1 -c"$CONC" -d"$1" --latency \
    -s "$ROOT/../shared/bench/wrk_post.lua" http://127.0.0.1:18080/v1/chat/completions
}
snap() { for p in $(pgrep -P $UP) $UP; do echo "$p $(cat /proc/$p/comm) $(awk '{print $14+$15}' /proc/$p/stat)"; done; }
load 2s >/dev/null # warm-up
snap >"$WORK/a"
load "${SECS}s" >"$WORK/wrk.out"
snap >"$WORK/b"
REQS=$(awk '/requests in/ {print $1}' "$WORK/wrk.out")
grep -q "Non-2xx" "$WORK/wrk.out" && { echo "errors:"; grep "Non-2xx" "$WORK/wrk.out"; }
echo "requests: $REQS at concurrency $CONC"
grep -A4 "Latency Distribution" "$WORK/wrk.out" | tr -s ' \n' ' '; echo
TICK=$(getconf CLK_TCK)
join "$WORK/a" "$WORK/b" | awk -v n="$REQS" -v t="$TICK" '{printf "%-14s %.3f ms CPU per request\n", $2, ($5-$3)*1000/t/n}'
