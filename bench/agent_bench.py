#!/usr/bin/env python3
"""Agent-run overhead and throughput: runs of ``model call -> calculator -> model call``
against a scripted fake model (``tests/fakes``, ``--latency-ms`` per call), through the
real service (``tail-service serve``) and one real worker (``tail-service worker``), on
SQLite.

    .venv/bin/python bench/agent_bench.py --runs 20 --concurrent 200

Prints one JSON line: the p50/p95 latency of a synchronous run against two sequential
chat completions through the same gateway (the difference is what the durable loop
costs: store writes, DBOS checkpoints, the worker's pickup and the HTTP side's watch),
and runs/s and model calls/s for ``--concurrent`` background runs at once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.batch_bench import free_port, peak_rss_mb, start_service, stop_all  # noqa: E402
from tests.agent.scripted import agent_script  # noqa: E402
from tests.fakes.openai_upstream import run_openai_upstream_in_thread  # noqa: E402

SCRIPT = 'CALL calculator {"expression": "6*7"}'
BODY = {"model": "fake-gpt", "input": SCRIPT, "tools": [{"type": "builtin", "name": "calculator"}]}


def pct(values: list[float], q: float) -> float:
    return round(sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="sequential runs for the latency numbers")
    ap.add_argument("--concurrent", type=int, default=200, help="background runs at once")
    ap.add_argument("--latency-ms", type=float, default=0)
    ap.add_argument("--redis", action="store_true", help="an embedded redis-server: runs start on its notice")
    args = ap.parse_args()

    state = Path(tempfile.mkdtemp(prefix="agent-bench-"))
    procs: list[subprocess.Popen[str]] = []
    redis = None
    with run_openai_upstream_in_thread("a", api_key=None) as upstream:
        upstream.script = agent_script
        upstream.latency = args.latency_ms / 1000
        try:
            http_port = free_port()
            config = {
                "state_dir": str(state),
                "log_level": "warning",
                "server": {"port": http_port},
                "auth": {"mode": "disabled"},
                "ratelimit": {"enabled": False},
                "models": [{"name": "fake-gpt", "provider": "openai", "base_url": upstream.base_url}],
            }
            if args.redis:
                from tail_service.redis_embedded import EmbeddedRedis

                redis = EmbeddedRedis(state / "redis").start()
                config["redis"] = {"url": redis.url()}
            _, worker = start_service(state, config, http_port, procs)
            base = f"http://127.0.0.1:{http_port}/v1"
            with httpx.Client(base_url=base, timeout=120) as client:
                chat = {"model": "fake-gpt", "messages": [{"role": "user", "content": SCRIPT}]}
                client.post("/agentic", json=BODY).raise_for_status()  # warm up
                pairs, runs, pickup, work, notice = [], [], [], [], []
                for _ in range(args.runs):
                    t0 = time.monotonic()
                    client.post("/chat/completions", json=chat).raise_for_status()
                    client.post("/chat/completions", json=chat).raise_for_status()
                    pairs.append(time.monotonic() - t0)
                    t0, w0 = time.monotonic(), time.time()
                    run = client.post("/agentic", json=BODY).json()
                    runs.append(time.monotonic() - t0)
                    steps = run["steps"]
                    pickup.append(steps[0]["started_at"] - w0)
                    work.append(steps[-1]["completed_at"] - steps[0]["started_at"])
                    notice.append(time.time() - steps[-1]["completed_at"])
                    assert run["status"] == "completed" and run["output_text"] == "Answer: 42", run

                def first_text(path: str, body: dict[str, object], marker: bytes) -> float:
                    """Seconds from the request to the first line of streamed text."""
                    t0, first = time.monotonic(), None
                    with client.stream("POST", path, json=body) as r:
                        for line in r.iter_lines():
                            if first is None and marker in line.encode():
                                first = time.monotonic() - t0
                    if first is not None:
                        return first
                    raise SystemExit(f"no streamed text from {path}")

                hello = {"model": "fake-gpt", "messages": [{"role": "user", "content": "hello there"}]}
                chat_ttft, responses_ttft = [], []
                for _ in range(args.runs):
                    chat_ttft.append(
                        first_text("/chat/completions", {**hello, "stream": True}, b'"content":"')
                    )
                    responses_ttft.append(
                        first_text(
                            "/responses",
                            {"model": "fake-gpt", "input": "hello there", "stream": True},
                            b"response.output_text.delta",
                        )
                    )

                def start(_: int) -> str:
                    return str(client.post("/agentic", json={**BODY, "background": True}).json()["id"])

                t0 = time.time()
                with ThreadPoolExecutor(32) as pool:
                    ids = list(pool.map(start, range(args.concurrent)))
                created_s = time.time() - t0
                pending, finished = set(ids), 0.0
                while pending:
                    time.sleep(0.5)
                    for run_id in list(pending):
                        run = client.get(f"/agentic/{run_id}").json()
                        if run["status"] == "completed":
                            pending.discard(run_id)
                            finished = max(finished, run["steps"][-1]["completed_at"])
                elapsed = finished - t0  # by the worker's clock, not this loop's
            print(
                json.dumps(
                    {
                        "upstream_latency_ms": args.latency_ms,
                        "redis": args.redis,
                        "two_chat_calls_p50_ms": pct(pairs, 0.5),
                        "agent_run_p50_ms": pct(runs, 0.5),
                        "agent_run_p95_ms": pct(runs, 0.95),
                        "overhead_p50_ms": round(pct(runs, 0.5) - pct(pairs, 0.5), 1),
                        "mean_run_ms": round(statistics.mean(runs) * 1000, 1),
                        "pickup_p50_ms": pct(pickup, 0.5),
                        "steps_p50_ms": pct(work, 0.5),
                        "answer_after_last_step_p50_ms": pct(notice, 0.5),
                        "chat_stream_first_text_p50_ms": pct(chat_ttft, 0.5),
                        "responses_stream_first_text_p50_ms": pct(responses_ttft, 0.5),
                        "concurrent_runs": args.concurrent,
                        "concurrent_created_s": round(created_s, 2),
                        "concurrent_elapsed_s": round(elapsed, 2),
                        "runs_per_s": round(args.concurrent / elapsed, 1),
                        "model_calls_per_s": round(2 * args.concurrent / elapsed, 1),
                        "worker_peak_rss_mb": round(peak_rss_mb(worker.pid)),
                    }
                )
            )
        finally:
            stop_all(procs)
            if redis is not None:
                redis.stop()


if __name__ == "__main__":
    main()
