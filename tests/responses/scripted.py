"""A scripted weather model for the fake chat upstream behind ``/v1/responses``.

The gateway answers every Responses request with chat-completions calls to its upstream, so
this chat script stands in for the model: asked by a user with tools on offer, it calls the
first tool once, with arguments that fit the tool's JSON Schema (``{"city": "Paris"}`` for a
weather tool); once the conversation holds a tool result, it answers
``"The weather: " + <the tool results>``.
"""

from __future__ import annotations

from typing import Any

from tests.fakes._sse import ChoicePlan, fake_arguments, split_tokens, text_of
from tests.fakes.openai_upstream import FakeOpenAI

CALL_ID = "call_weather_1"
ANSWER_PREFIX = "The weather: "


def weather(city: str) -> str:
    """What every test's ``get_weather`` tool returns."""
    return f"sunny and 21 C in {city}"


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
            "function": {"name": first["name"], "arguments": fake_arguments(first)},
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
