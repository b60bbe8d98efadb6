"""``/v1/responses`` on an Anthropic deployment (a wire-level fake), a stream cut upstream,
background responses, and tenants kept apart on every stored-response route."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import sqlalchemy as sa

from tail_service.store import Store
from tail_service.store.schema import agent_runs
from tests.agent.scripted import agent_script
from tests.batch.fixtures import run_worker
from tests.conftest import UPSTREAM_KEY_ENV, RunningApp, model_entry, serve_app
from tests.fakes.anthropic_upstream import FakeAnthropic, start_anthropic_upstream
from tests.fakes.openai_upstream import REJECT_CONTENT, FakeOpenAI
from tests.stack_fixtures import Stack

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}},
}


@pytest.fixture
def anthropic() -> Iterator[FakeAnthropic]:
    """The fake Anthropic API on its own event loop, in a thread."""
    ready = threading.Event()
    box: dict[str, object] = {}
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        async with start_anthropic_upstream(api_key="sk-up-a") as fake:
            box["fake"] = fake
            ready.set()
            stop = asyncio.Event()
            box["stop"] = stop
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    fake = box["fake"]
    assert isinstance(fake, FakeAnthropic)
    try:
        yield fake
    finally:
        stop = box["stop"]
        assert isinstance(stop, asyncio.Event)
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


def test_a_tool_using_turn_on_an_anthropic_deployment(
    make_app: Callable[..., RunningApp], anthropic: FakeAnthropic
) -> None:
    entry = {
        "name": "claude",
        "provider": "anthropic",
        "base_url": anthropic.base_url,
        "upstream_model": "claude-test",
        "api_key_env": UPSTREAM_KEY_ENV,
    }
    app = make_app([entry])
    with run_worker(app.settings):
        client = app.strict_client()
        first = client.responses.create(
            model="claude", input="What is the weather in Paris?", tools=[WEATHER]
        )  # type: ignore[list-item]
        assert first.status == "completed"
        [call] = [o for o in first.output if o.type == "function_call"]
        assert call.name == "get_weather" and '"city": "Paris"' in call.arguments.replace('":"', '": "')
        with client.responses.stream(
            model="claude",
            previous_response_id=first.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
            tools=[WEATHER],  # type: ignore[list-item]
        ) as stream:
            final = stream.get_final_response()
    assert final.output_text == "Tool said: sunny"
    assert final.usage is not None and final.usage.output_tokens > 0


def test_a_stream_cut_upstream_ends_failed_and_the_sdk_raises(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI
) -> None:
    upstream.script = agent_script
    app = make_app([model_entry("gpt-test", upstream, max_retries=0)])
    with run_worker(app.settings):
        client = app.strict_client()
        upstream.cut_stream_next(1, after_chunks=2)
        with (
            pytest.raises(RuntimeError, match=r"response\.completed"),
            client.responses.stream(model="gpt-test", input="one two three four five six seven") as stream,
        ):
            kinds = [e.type for e in stream]
            stream.get_final_response()
        assert kinds[0] == "response.created" and kinds[-1] in ("response.failed", "error"), kinds
        upstream.cut_stream_next(1, after_chunks=2)
        resp = client.responses.create(model="gpt-test", input="one two three four five six seven")
        assert resp.status == "failed" and resp.error is not None and resp.error.code == "server_error"


def _runs_kept(app: RunningApp) -> int:
    """How many agent runs (responses among them) the gateway's store holds."""
    store = Store(app.settings.store, app.settings.state_dir)
    try:
        with store.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(agent_runs)).scalar_one())
    finally:
        store.close()


def test_store_false_responses_are_answered_then_forgotten(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI
) -> None:
    """``store: false``: the answer comes as usual, then nothing of it is kept (no row, no
    steps, no events), it cannot be read back or continued, and it cannot be a background
    response (whose result could never be fetched)."""
    upstream.script = agent_script
    app = make_app([model_entry("gpt-test", upstream)])
    with run_worker(app.settings):
        client = app.strict_client()
        resp = client.responses.create(model="gpt-test", input="keep this quiet", store=False)
        assert resp.status == "completed" and resp.output_text == "Answer: keep this quiet" and not resp.store
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(resp.id)
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(model="gpt-test", input="more", previous_response_id=resp.id)
        assert caught.value.code == "previous_response_not_found"
        with client.responses.stream(model="gpt-test", input="and this", store=False) as stream:
            final = stream.get_final_response()
        assert final.output_text == "Answer: and this"
        assert _runs_kept(app) == 0
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(model="gpt-test", input="later", store=False, background=True)
        assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "store"
        stored = client.responses.create(model="gpt-test", input="keep this")
        assert client.responses.retrieve(stored.id).output_text == "Answer: keep this"
        assert _runs_kept(app) == 1


def test_a_request_the_upstream_refuses_is_a_400_and_leaves_no_response(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI
) -> None:
    """As from OpenAI: a request refused outright is a ``BadRequestError`` (not a ``failed``
    response the SDK returns as a success), and nothing is stored under an id the client
    never got. Streamed, it is ``response.failed`` with the spec's ``invalid_prompt`` code."""
    app = make_app([model_entry("gpt-test", upstream, max_retries=0)])
    with run_worker(app.settings):
        client = app.strict_client()
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(model="gpt-test", input=REJECT_CONTENT)
        error = caught.value.body
        assert isinstance(error, dict) and error["param"] == "messages" and error["code"] == "invalid_value"
        assert "rejects this request" in error["message"]
        assert _runs_kept(app) == 0
        with client.responses.stream(model="gpt-test", input=REJECT_CONTENT) as stream:
            events = list(stream)
        failed = events[-1]
        assert failed.type == "response.failed", [e.type for e in events]
        assert failed.response.error is not None and failed.response.error.code == "invalid_prompt"


def test_background_response_and_cancel(make_app: Callable[..., RunningApp], upstream: FakeOpenAI) -> None:
    upstream.script = agent_script
    upstream.latency = 1.0
    app = make_app([model_entry("gpt-test", upstream)])
    with run_worker(app.settings):
        client = app.strict_client()
        resp = client.responses.create(model="gpt-test", input="hi", background=True)
        assert resp.status == "queued" and resp.background is True
        deadline = time.monotonic() + 30
        while (got := client.responses.retrieve(resp.id)).status != "completed":
            assert time.monotonic() < deadline, got.status
            time.sleep(0.1)
        assert got.output_text == "Answer: hi"
        slow = client.responses.create(
            model="gpt-test",
            input='CALL calculator {"expression": "1+1"}\nCALL calculator {"expression": "2+2"}',
            tools=[{"type": "builtin", "name": "calculator"}],
            background=True,
        )  # type: ignore[list-item]
        cancelled = client.responses.cancel(slow.id)
        assert cancelled.status in ("cancelled", "queued", "in_progress")
        deadline = time.monotonic() + 30
        while (got := client.responses.retrieve(slow.id)).status not in ("cancelled", "completed"):
            assert time.monotonic() < deadline, got.status
            time.sleep(0.1)
        assert got.status == "cancelled"
        with pytest.raises(openai.BadRequestError):
            client.responses.cancel(client.responses.create(model="gpt-test", input="x").id)
        # deleting a response while it runs ends its work quietly; the worker goes on
        doomed = client.responses.create(model="gpt-test", input="doomed", background=True)
        client.responses.delete(doomed.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(doomed.id)
        assert (
            client.responses.create(model="gpt-test", input="still here").output_text == "Answer: still here"
        )


def test_stored_responses_are_private_to_the_tenant(
    stack: Stack, upstream: FakeOpenAI, upstream_key: str, tmp_path: Path
) -> None:
    upstream.script = agent_script
    settings = stack.gateway_settings([model_entry("gpt-test", upstream)], state_dir=tmp_path)
    owner, stranger = stack.create_key(tenant="acme"), stack.create_key(tenant="globex")
    with serve_app(settings) as app, run_worker(settings):
        mine = app.client(api_key=owner, _strict_response_validation=True)
        theirs = app.client(api_key=stranger)
        resp = mine.responses.create(model="gpt-test", input="secret plans")
        for call in (
            lambda: theirs.responses.retrieve(resp.id),
            lambda: theirs.responses.delete(resp.id),
            lambda: theirs.responses.cancel(resp.id),
            lambda: theirs.responses.input_items.list(resp.id),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
        with pytest.raises(openai.BadRequestError) as caught:
            theirs.responses.create(model="gpt-test", input="and?", previous_response_id=resp.id)
        assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]
        with httpx.Client(base_url=app.base_url, timeout=30) as http:
            r = http.get(f"/v1/agentic/{resp.id}", headers={"Authorization": f"Bearer {stranger}"})
            assert r.status_code == 404
        assert mine.responses.retrieve(resp.id).output_text == "Answer: secret plans"
