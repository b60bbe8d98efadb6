"""The workers' notices about agent runs (Redis pub/sub), and the end of an event stream
that outlives the request timeout.

The HTTP side looks at the store on a timer; a worker's ``PUBLISH`` of the run's id after
each write wakes the waits and streams of that run at once. Here the timer is set to 30 s,
so a run answered in a few seconds was answered by the notices."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest
import redis

from tail_service.clients.redis_pubsub import RunWatch
from tail_service.core.agent import RUN_EVENTS_CHANNEL
from tail_service.redis_embedded import EmbeddedRedis
from tests.agent.scripted import agent_script, sse_events
from tests.batch.fixtures import run_worker
from tests.conftest import RunningApp, model_entry
from tests.fakes.mcp_server import RunningMcpServer
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.slow

MCP = {"type": "mcp", "server": "facts", "require_approval": "never"}


async def _watch_notices(url: str) -> None:
    watch = RunWatch(url, RUN_EVENTS_CHANNEL)
    watch.start()
    publisher = redis.Redis.from_url(url)
    try:
        with watch.watch("run_a") as pause:
            # the listener subscribes in the background: publish until it hears one
            async def heard() -> None:
                while True:
                    publisher.publish(RUN_EVENTS_CHANNEL, "run_a")
                    try:
                        await asyncio.wait_for(pause(60), 0.2)
                        return
                    except TimeoutError:
                        continue

            await asyncio.wait_for(heard(), 10)
            # a notice about another run wakes nobody here
            publisher.publish(RUN_EVENTS_CHANNEL, "run_b")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(pause(60), 0.5)
            # a notice that comes before the pause (while the caller looks at the store) counts
            publisher.publish(RUN_EVENTS_CHANNEL, "run_a")
            await asyncio.sleep(0.3)
            await asyncio.wait_for(pause(60), 5)
            # and is used up by it
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(pause(60), 0.5)
            # the timer alone ends a pause
            await asyncio.wait_for(pause(0.05), 5)
        assert not watch._waiters  # nothing stays behind a finished watch
    finally:
        publisher.close()
        await watch.aclose()


def test_run_watch_wakes_on_its_runs_notices(redis_server: EmbeddedRedis) -> None:
    asyncio.run(_watch_notices(redis_server.url()))


def test_waits_and_streams_are_woken_by_the_workers_notices(
    make_app: Callable[..., RunningApp],
    upstream: FakeOpenAI,
    redis_server: EmbeddedRedis,
) -> None:
    upstream.script = agent_script
    app = make_app(
        [model_entry("gpt-test", upstream)],
        redis={"url": redis_server.url(), "timeout": 1.0},
        # the store is looked at only this often (and new runs found only this often)
        agent={"watch_poll": 30, "start_poll": 30},
    )
    body = {
        "model": "gpt-test",
        "input": 'CALL calculator {"expression": "6*7"}',
        "tools": [{"type": "builtin", "name": "calculator"}],
    }
    listener = redis.Redis.from_url(redis_server.url()).pubsub()
    listener.subscribe(RUN_EVENTS_CHANNEL)
    with run_worker(app.settings), httpx.Client(base_url=app.base_url, timeout=60) as http:
        started = time.monotonic()
        run = http.post("/v1/agentic", json=body).json()
        assert run["status"] == "completed" and run["output_text"] == "Answer: 42", run
        assert time.monotonic() - started < 15  # not one 30 s look at the store was waited for
        r = http.post("/v1/agentic", json={**body, "stream": True})
        kinds = [k for k, _ in sse_events(r.text)]
        assert kinds[0] == "run.created" and kinds[-1] == "run.completed", kinds
    # the worker told of each write, by the run's id
    notices: list[bytes] = []
    quiet_until = time.monotonic() + 1.0
    while time.monotonic() < quiet_until:  # None also stands for the subscribe confirmation
        message = listener.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if message is not None:
            notices.append(message["data"])
    listener.close()
    assert notices.count(run["id"].encode()) >= 5, notices  # begin, model, tool, join, model


def test_a_stream_that_outlives_the_request_timeout_ends_with_an_error_and_resumes(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI
) -> None:
    """A stream is held at most ``server.request_timeout``: then it ends with an ``error``
    event saying the run goes on (never a silent end), and ``after=N`` picks it up."""
    upstream.script = agent_script
    with RunningMcpServer() as mcp:
        app = make_app(
            [model_entry("gpt-test", upstream)],
            mcp_servers=[{"name": "facts", "url": mcp.url}],
            server={"request_timeout": 2},
            agent={"tool_timeout": 10},
        )
        body = {"model": "gpt-test", "input": 'CALL slow {"seconds": 4}', "tools": [MCP], "stream": True}
        with run_worker(app.settings), httpx.Client(base_url=app.base_url, timeout=60) as http:
            first = sse_events(http.post("/v1/agentic", json=body).text)
            kind, error = first[-1]
            assert kind == "error" and error["error"]["code"] == "stream_timeout", first
            assert "the run goes on" in error["error"]["message"]
            seen = [d for k, d in first if k != "error"]
            run_id, last = seen[0]["run_id"], seen[-1]["sequence_number"]
            rest: list[tuple[str, dict[str, object]]] = []
            deadline = time.monotonic() + 30
            while not rest or rest[-1][0] != "run.completed":
                assert time.monotonic() < deadline, rest
                page = sse_events(http.get(f"/v1/agentic/{run_id}/events", params={"after": last}).text)
                rest += [(k, d) for k, d in page if k != "error"]
                if rest:
                    last = int(rest[-1][1]["sequence_number"])  # type: ignore[call-overload]
        numbers = [d["sequence_number"] for d in seen] + [d["sequence_number"] for _, d in rest]
        assert numbers == list(range(len(numbers)))  # every event once, in order
        assert rest[-1][1]["run"]["output_text"] == "Answer: slept 4"  # type: ignore[index]
