"""The whole path to an Anthropic deployment: openai SDK -> gateway -> fake Messages API."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import openai
import pytest

from tests.conftest import RunningApp, model_entry
from tests.fakes.anthropic_upstream import FakeAnthropic, start_anthropic_upstream
from tests.fakes.openai_upstream import FakeOpenAI

ANTHROPIC_KEY_ENV = "TAIL_TEST_ANTHROPIC_KEY"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@contextmanager
def anthropic_in_thread() -> Iterator[FakeAnthropic]:
    """The async fake on its own loop in a daemon thread (the gateway runs in another)."""
    ready = threading.Event()
    box: list[tuple[FakeAnthropic, asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def serve() -> None:
        stop = asyncio.Event()
        async with start_anthropic_upstream() as fake:
            box.append((fake, asyncio.get_running_loop(), stop))
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    fake, loop, stop = box[0]
    try:
        yield fake
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


@pytest.fixture
def anthropic_fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAnthropic]:
    with anthropic_in_thread() as fake:
        monkeypatch.setenv(ANTHROPIC_KEY_ENV, fake.api_key)
        yield fake


def claude_entry(fake: FakeAnthropic, **kw: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": "claude",
        "provider": "anthropic",
        "base_url": fake.base_url,
        "upstream_model": "claude-test-1",
        "api_key_env": ANTHROPIC_KEY_ENV,
        "max_retries": 1,
        "timeout": 10,
    }
    entry.update(kw)
    return entry


def test_chat_json_and_usage(make_app: Callable[..., RunningApp], anthropic_fake: FakeAnthropic) -> None:
    app = make_app([claude_entry(anthropic_fake)])
    r = app.strict_client().chat.completions.create(
        model="claude",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}],
        max_tokens=50,
    )
    assert r.model == "claude"
    assert r.choices[0].message.content == "You said: hello there"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    sent = anthropic_fake.requests[-1].body
    assert sent["model"] == "claude-test-1"
    assert sent["system"] == "Be brief."
    assert sent["max_tokens"] == 50
    assert anthropic_fake.requests[-1].headers["x-api-key"] == anthropic_fake.api_key


def test_stream_helper_text_and_usage(
    make_app: Callable[..., RunningApp], anthropic_fake: FakeAnthropic
) -> None:
    app = make_app([claude_entry(anthropic_fake)])
    client = app.client()
    with client.chat.completions.stream(
        model="claude",
        messages=[{"role": "user", "content": "one two three"}],
        stream_options={"include_usage": True},
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.role == "assistant"
    assert final.choices[0].message.content == "You said: one two three"
    assert final.usage is not None and final.usage.completion_tokens > 0


def test_stream_tool_call(make_app: Callable[..., RunningApp], anthropic_fake: FakeAnthropic) -> None:
    app = make_app([claude_entry(anthropic_fake)])
    with app.client().chat.completions.stream(
        model="claude",
        messages=[{"role": "user", "content": "what is the weather in Paris?"}],
        tools=[WEATHER],  # type: ignore[list-item]
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert isinstance(json.loads(call.function.arguments), dict)  # type: ignore[union-attr]
    assert call.id


def test_overloaded_anthropic_is_retried(
    make_app: Callable[..., RunningApp], anthropic_fake: FakeAnthropic
) -> None:
    app = make_app([claude_entry(anthropic_fake)])
    anthropic_fake.add_fault(status=529, retry_after="0")
    r = app.client().chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "You said: hi"
    assert len(anthropic_fake.requests) == 2


def test_falls_back_from_anthropic_to_openai(
    make_app: Callable[..., RunningApp], anthropic_fake: FakeAnthropic, upstream: FakeOpenAI
) -> None:
    app = make_app(
        [
            claude_entry(anthropic_fake, weight=1e6, max_retries=0),
            model_entry("claude", upstream, weight=1e-6, max_retries=0),
        ]
    )
    anthropic_fake.add_fault(status=500)
    r = app.client().chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "[a] hi"


def test_n_above_one_is_a_400(make_app: Callable[..., RunningApp], anthropic_fake: FakeAnthropic) -> None:
    app = make_app([claude_entry(anthropic_fake)])
    with pytest.raises(openai.BadRequestError):
        app.client().chat.completions.create(model="claude", messages=[{"role": "user", "content": "x"}], n=2)
    assert anthropic_fake.requests == []
