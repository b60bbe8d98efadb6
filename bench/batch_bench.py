#!/usr/bin/env python3
"""Batch engine throughput and memory: N chat lines against a fake upstream with 50 ms of
latency per call, through the real service (``tail-service serve``) and one real worker
(``tail-service worker``), on SQLite or on PostgreSQL (pgserver).

    .venv/bin/python bench/batch_bench.py --lines 50000 --store sqlite
    .venv/bin/python bench/batch_bench.py --lines 50000 --store postgresql --ratelimit

Prints one JSON line: lines/s from create to completed (and from in_progress to
completed), the worker's peak RSS (VmHWM) and the HTTP process's. The fake upstream is
``../shared/bench/fake_upstream.py`` (override with ``--fake``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXE = str(Path(sys.executable).with_name("tail-service"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_line(proc: subprocess.Popen[str], text: str, timeout: float = 120) -> None:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        if text in line:
            return
        if time.monotonic() > deadline:
            break
    raise SystemExit(f"no {text!r} from {proc.args}")


def stop_all(procs: list[subprocess.Popen[str]]) -> None:
    """SIGTERM each process (the last started first), then wait; kill what hangs."""
    for proc in reversed(procs):
        proc.send_signal(signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_service(
    state: Path, config: dict[str, object], port: int, procs: list[subprocess.Popen[str]]
) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    """``tail-service serve`` on ``config`` (listening on ``port``) and one ``tail-service
    worker`` beside it, both ready; appended to ``procs``."""
    cfg = state / "bench.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "TAIL_CONFIG": str(cfg)}
    env.pop("TAIL_SETTINGS_JSON", None)
    http = subprocess.Popen([EXE, "serve"], env=env, stderr=subprocess.PIPE, text=True)
    procs.append(http)
    wait_port(port)
    worker = subprocess.Popen(
        [EXE, "worker", "--executor-id", "bench"],
        env={**env, "TAIL_LOG_LEVEL": "info"},
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(worker)
    wait_line(worker, "batch worker ready")
    return http, worker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=50_000)
    ap.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--delay-ms", type=float, default=50)
    ap.add_argument("--ratelimit", action="store_true", help="admission on (an embedded redis-server)")
    ap.add_argument("--fake", default=str(ROOT.parent / "shared" / "bench" / "fake_upstream.py"))
    args = ap.parse_args()

    state = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    procs: list[subprocess.Popen[str]] = []
    pg = redis = None
    try:
        up_port, http_port = free_port(), free_port()
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    args.fake,
                    "--port",
                    str(up_port),
                    "--delay-ms",
                    str(args.delay_ms),
                    "--quiet",
                ],
                text=True,
            )
        )
        wait_port(up_port)
        config: dict[str, object] = {
            "state_dir": str(state),
            "log_level": "warning",
            "server": {"port": http_port},
            "auth": {"mode": "disabled"},
            "models": [
                {
                    "name": "fake-gpt",
                    "provider": "openai",
                    "base_url": f"http://127.0.0.1:{up_port}/v1",
                    "rpm": 0,
                }
            ],
            "ratelimit": {"enabled": False},
        }
        if args.ratelimit:
            from tail_service.redis_embedded import EmbeddedRedis

            redis = EmbeddedRedis(state / "redis").start()
            config["ratelimit"] = {"enabled": True}
            config["redis"] = {"url": redis.url()}
            config["models"] = [{**config["models"][0], "rpm": 10_000_000, "max_concurrency": 100_000}]  # type: ignore[index]
        if args.store == "postgresql":
            import pgserver

            pg = pgserver.get_server(str(state / "pg"), cleanup_mode="stop")
            config["store"] = {"database_url": pg.get_uri()}
        http, worker = start_service(state, config, http_port, procs)

        source = state / "input.jsonl"
        with source.open("wb") as out:
            for i in range(args.lines):
                body = {
                    "model": "fake-gpt",
                    "messages": [{"role": "user", "content": f"question number {i}"}],
                }
                out.write(
                    orjson.dumps(
                        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
                    )
                    + b"\n"
                )
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{http_port}/v1", api_key="x", max_retries=0, timeout=600
        )
        t0 = time.monotonic()
        with source.open("rb") as f:
            upload = client.files.create(file=(source.name, f), purpose="batch")
        t_upload = time.monotonic() - t0
        t1 = time.monotonic()
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.25)
            batch = client.batches.retrieve(batch.id)
        elapsed = time.monotonic() - t1
        counts = batch.request_counts
        assert counts is not None
        running = (batch.finalizing_at or 0) - (batch.in_progress_at or 0)
        print(
            json.dumps(
                {
                    "store": args.store,
                    "ratelimit": args.ratelimit,
                    "lines": args.lines,
                    "input_mb": round(upload.bytes / 1e6, 1),
                    "status": batch.status,
                    "completed": counts.completed,
                    "failed": counts.failed,
                    "upload_s": round(t_upload, 2),
                    "create_to_completed_s": round(elapsed, 2),
                    "lines_per_s": round(args.lines / elapsed),
                    "validating_s": (batch.in_progress_at or 0) - batch.created_at,
                    "in_progress_s": running,
                    "finalizing_s": (batch.completed_at or 0) - (batch.finalizing_at or 0),
                    "worker_peak_rss_mb": round(peak_rss_mb(worker.pid)),
                    "http_peak_rss_mb": round(peak_rss_mb(http.pid)),
                }
            )
        )
    finally:
        stop_all(procs)
        if redis is not None:
            redis.stop()
        if pg is not None:
            pg.cleanup()


if __name__ == "__main__":
    main()
