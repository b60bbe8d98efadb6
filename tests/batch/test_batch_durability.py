"""The batch engine survives ``kill -9``: a worker killed mid-batch resumes when it restarts
(same executor id), another worker takes over one that never comes back, and every line
ends in exactly one record. On SQLite and on a real PostgreSQL (pgserver)."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tail_service.redis_embedded import EmbeddedRedis
from tests.batch.fixtures import chat_line, jsonl, output_lines, run_worker, submit, wait_for
from tests.conftest import RunningApp, model_entry
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.slow

#: slow enough to be killed mid-run: 2 chunks at a time, 20 lines of each in flight
SLOW = {"chunk_lines": 200, "worker_concurrency": 2, "line_concurrency": 20, "heartbeat_interval": 0.5}


def _chat_calls(upstream: FakeOpenAI) -> Counter[str]:
    """Upstream calls per batch line (the line's text is its custom_id)."""
    return Counter(
        r.json["messages"][0]["content"] for r in upstream.requests if r.path == "/v1/chat/completions"
    )


def _check_exactly_once(client: Any, batch: Any, n: int) -> None:
    assert batch.status == "completed", batch
    assert batch.request_counts.total == n
    assert batch.request_counts.completed == n and batch.request_counts.failed == 0
    out = output_lines(client, batch.output_file_id)
    ids = Counter(o["custom_id"] for o in out)
    assert len(out) == n and len(ids) == n and max(ids.values()) == 1
    assert set(ids) == {f"r{i}" for i in range(n)}
    assert batch.error_file_id is None


@pytest.fixture
def slow_gateway(make_app: Callable[..., RunningApp], upstream: FakeOpenAI, db_url: str) -> RunningApp:
    upstream.latency = 0.05
    return make_app([model_entry("gpt-test", upstream)], store={"database_url": db_url})


def test_kill9_mid_batch_then_restart_resumes(slow_gateway: RunningApp, upstream: FakeOpenAI) -> None:
    n = 5000
    client = slow_gateway.strict_client()
    with run_worker(slow_gateway.settings, "worker-a", **SLOW) as first:
        created = submit(client, jsonl([chat_line(f"r{i}", f"r{i}") for i in range(n)]))
        wait_for(
            client, created.id, lambda b: b.request_counts is not None and b.request_counts.completed >= 1000
        )
        first.proc.kill()  # SIGKILL: no clean-up of any kind
        first.proc.wait()
    at_kill = client.batches.retrieve(created.id)
    assert at_kill.status == "in_progress" and at_kill.request_counts is not None
    assert at_kill.request_counts.completed < n
    with run_worker(slow_gateway.settings, "worker-a", **SLOW):
        batch = wait_for(client, created.id, timeout=120)
    _check_exactly_once(client, batch, n)
    calls = _chat_calls(upstream)
    assert set(calls) == {f"r{i}" for i in range(n)}
    # only lines in flight (or not yet stored) at the kill ran twice; stored ones were skipped
    repeated = sum(c - 1 for c in calls.values())
    assert repeated <= SLOW["worker_concurrency"] * SLOW["line_concurrency"] + 200, repeated


def test_a_dead_worker_is_taken_over(slow_gateway: RunningApp, upstream: FakeOpenAI) -> None:
    n = 2000
    client = slow_gateway.strict_client()
    fast_takeover = {**SLOW, "dead_after": 2.0}
    with run_worker(slow_gateway.settings, "worker-gone", **fast_takeover) as gone:
        created = submit(client, jsonl([chat_line(f"r{i}", f"r{i}") for i in range(n)]))
        wait_for(
            client, created.id, lambda b: b.request_counts is not None and b.request_counts.completed >= 300
        )
        gone.proc.kill()
        gone.proc.wait()
    # "worker-gone" never comes back: another worker notices its stale heartbeat
    with run_worker(slow_gateway.settings, "worker-b", **fast_takeover) as other:
        batch = wait_for(client, created.id, timeout=120)
    _check_exactly_once(client, batch, n)
    assert any("took over the work of dead worker worker-gone" in line for line in other.log)


def test_two_workers_run_every_line_once(slow_gateway: RunningApp, upstream: FakeOpenAI) -> None:
    n = 3000
    client = slow_gateway.strict_client()
    settings = slow_gateway.settings
    with run_worker(settings, "worker-1", **SLOW), run_worker(settings, "worker-2", **SLOW) as second:
        batch = wait_for(
            client, submit(client, jsonl([chat_line(f"r{i}", f"r{i}") for i in range(n)])).id, timeout=120
        )
        assert second.proc.poll() is None
    _check_exactly_once(client, batch, n)
    calls = _chat_calls(upstream)
    assert len(calls) == n and max(calls.values()) == 1  # no fault: each line reached the upstream once


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_interactive_calls_keep_their_capacity_while_a_batch_runs(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI, redis_server: EmbeddedRedis, db_url: str
) -> None:
    """Batch lines use only the capacity interactive calls leave spare (batch_headroom)."""
    upstream.latency = 0.05
    model = f"gpt-{uuid.uuid4().hex[:8]}"  # its own rate-limit keys in the shared Redis
    app = make_app(
        [model_entry(model, upstream, rpm=400, max_concurrency=20)],
        ratelimit={"enabled": True, "batch_headroom": 0.25},
        redis={"url": redis_server.url(), "timeout": 1.0},
        store={"database_url": db_url},
    )
    client = app.strict_client()
    lines = [chat_line(f"r{i}", f"r{i}", model=model) for i in range(600)]
    with run_worker(app.settings, "worker-rl", line_concurrency=200, max_backoff=0.5):
        created = submit(client, jsonl(lines))
        wait_for(
            client, created.id, lambda b: b.request_counts is not None and b.request_counts.completed >= 100
        )
        latencies = []
        for i in range(20):
            start = time.monotonic()
            answer = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"i{i}"}]
            )
            latencies.append(time.monotonic() - start)
            assert answer.choices[0].message.content == f"[a] i{i}"
        batch = client.batches.retrieve(created.id)
        assert batch.status == "in_progress"  # the batch was held back by the limit meanwhile
        assert batch.request_counts is not None and batch.request_counts.completed < 600
        client.batches.cancel(created.id)
        wait_for(client, created.id)
    assert sorted(latencies)[len(latencies) // 2] < 1.0, latencies
