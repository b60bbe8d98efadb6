"""The upstreams behind ``/v1/responses`` in the framework tests, and what they were asked.

The gateway answers every Responses request with one call upstream, so the upstream stands
in for the model. :func:`weather_script` scripts the fake chat upstream: asked by a user with
tools on offer, it calls the first tool once, with :data:`ARGUMENTS` fitted to the tool's
JSON Schema; once the conversation holds a tool result, it answers
``"The weather: " + <the tool results>``. The fake Anthropic API
(:mod:`tests.fakes.anthropic_upstream`) needs no script: asked about the weather with tools
on offer, it calls the weather tool with the same :data:`ARGUMENTS` (after a short text),
and answers ``"Tool said: " + <the tool results>`` once it has them.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.fakes._sse import ChoicePlan, fake_arguments, split_tokens, text_of
from tests.fakes.anthropic_upstream import FakeAnthropic, start_anthropic_upstream
from tests.fakes.openai_upstream import FakeOpenAI

CALL_ID = "call_weather_1"
ANSWER_PREFIX = "The weather: "
#: the call both upstreams make (the one the fake Anthropic API always makes)
ARGUMENTS = {"city": "Paris", "unit": "celsius"}


def weather(city: str) -> str:
    """What every test's ``get_weather`` tool returns."""
    return f"sunny and 21 C in {city}"


def call_arguments(function: dict[str, Any]) -> str:
    """:data:`ARGUMENTS` for the parameters ``function`` has, sample values for the others."""
    fitted = json.loads(fake_arguments(function))
    return json.dumps({name: ARGUMENTS.get(name, value) for name, value in fitted.items()})


def weather_script(body: dict[str, Any]) -> list[ChoicePlan]:
    messages: list[dict[str, Any]] = body["messages"]
    results = [text_of(m.get("content")) for m in messages if m.get("role") == "tool"]
    if results:
        return [ChoicePlan(split_tokens(ANSWER_PREFIX + " ; ".join(results)), [], "stop")]
    tools = [t["function"] for t in body.get("tools") or [] if t.get("type") == "function"]
    if tools and messages[-1].get("role") == "user":
        first = tools[0]
        call = {
            "id": CALL_ID,
            "type": "function",
            "function": {"name": first["name"], "arguments": call_arguments(first)},
        }
        return [ChoicePlan(tool_calls=[call], finish_reason="tool_calls")]
    return [ChoicePlan(split_tokens("No tool was offered."), [], "stop")]


def chat_bodies(upstream: FakeOpenAI) -> list[dict[str, Any]]:
    """The chat-completions requests the upstream received, in order."""
    return [r.json for r in upstream.requests if r.path == "/v1/chat/completions"]


def conversation(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat request's messages without the system/developer ones (the instructions)."""
    return [m for m in body["messages"] if m.get("role") not in ("system", "developer")]


def instructions(body: dict[str, Any]) -> list[str]:
    """The texts of a chat request's system/developer messages."""
    return [text_of(m.get("content")) for m in body["messages"] if m.get("role") in ("system", "developer")]


@contextmanager
def run_anthropic_upstream_in_thread(api_key: str) -> Iterator[FakeAnthropic]:
    """The fake Anthropic API on its own event loop, in a daemon thread."""
    ready = threading.Event()
    box: list[tuple[FakeAnthropic, asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def serve() -> None:
        stop = asyncio.Event()
        try:
            async with start_anthropic_upstream(api_key=api_key) as fake:
                box.append((fake, asyncio.get_running_loop(), stop))
                ready.set()
                await stop.wait()
        finally:
            ready.set()  # a failed start must not leave the caller waiting

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="fake-anthropic", daemon=True)
    thread.start()
    assert ready.wait(10) and box, "the fake Anthropic API did not start"
    fake, loop, stop = box[0]
    try:
        yield fake
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


def message_bodies(fake: FakeAnthropic) -> list[dict[str, Any]]:
    """The Messages API requests the fake Anthropic API received, in order."""
    return [r.body for r in fake.requests if r.path == "/v1/messages"]
