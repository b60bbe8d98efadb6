"""``POST /v1/responses`` end to end under the agent frameworks, each on its default settings,
which use the Responses API: the OpenAI Agents SDK, pydantic-ai and LangChain run a tool-using
agent against the gateway (a real worker process), whose model is either a scripted fake chat
upstream (OpenAI-compatible) or an Anthropic deployment on the wire-level fake Anthropic API.

Each run is two Responses requests, none with ``previous_response_id``: the first gets a
``function_call`` output item, the framework runs the tool, and the second sends the whole
history back as input items (the user message, the ``function_call`` item, a
``function_call_output``; the Agents SDK and LangChain replay the item with its ``id`` and
``status``). The gateway answers each with one call upstream (chat completions, or Anthropic
Messages), so the second upstream request must hold the full conversation.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from agents import Agent, Runner, function_tool, set_default_openai_client, set_tracing_disabled
from agents.models import _openai_shared
from agents.models.multi_provider import MultiProvider
from agents.models.openai_responses import OpenAIResponsesModel as AgentsResponsesModel
from agents.stream_events import RawResponsesStreamEvent
from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.runnables import Runnable
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI
from pydantic_ai import Agent as PydanticAgent
from pydantic_ai import RunContext
from pydantic_ai.messages import AgentStreamEvent, FunctionToolCallEvent, PartStartEvent, TextPart
from pydantic_ai.models.openai import OpenAIResponsesModel as PydanticResponsesModel

from tests.batch.fixtures import run_worker
from tests.conftest import UPSTREAM_KEY_ENV, RunningApp, model_entry
from tests.fakes._sse import text_of
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.anthropic_upstream import text_of as block_text
from tests.fakes.openai_upstream import FakeOpenAI
from tests.responses.scripted import (
    ANSWER_PREFIX,
    ARGUMENTS,
    chat_bodies,
    conversation,
    instructions,
    message_bodies,
    run_anthropic_upstream_in_thread,
    weather,
    weather_script,
)

pytestmark = pytest.mark.slow

PROMPT = "What is the weather in Paris?"
INSTRUCTIONS = "You answer questions about the weather in one sentence."
RESULT = weather("Paris")
#: what the tool is called with (by both upstreams), as ``get_weather``'s arguments
CALL = ("Paris", "celsius")
# the Responses stream events every framework here (and the Vercel AI SDK) builds text and tool calls from
STREAM_EVENTS = {
    "response.created",
    "response.output_item.added",
    "response.function_call_arguments.delta",
    "response.output_text.delta",
    "response.output_item.done",
    "response.completed",
}

STREAMING = pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])


@dataclass
class Gateway:
    """A gateway whose one model calls the weather tool once, then answers with its output."""

    app: RunningApp
    model: str
    #: the model's final answer once the tool's output is in
    answer: str
    #: asserts what the upstream saw: the question with the tool offered, then the whole history
    check_upstream: Callable[[], None]

    @property
    def v1(self) -> str:
        return self.app.v1

    def assert_upstream_saw_one_tool_round_trip(self) -> None:
        self.check_upstream()


def assert_chat_round_trip(upstream: FakeOpenAI) -> None:
    """Two chat calls upstream: the question with the tool offered, then the whole history."""
    bodies = chat_bodies(upstream)
    assert len(bodies) == 2, [b["messages"] for b in bodies]
    first, second = bodies
    assert [t["function"]["name"] for t in first.get("tools") or []] == ["get_weather"]
    assert [(m["role"], text_of(m.get("content"))) for m in conversation(first)] == [("user", PROMPT)]
    history = conversation(second)
    assert [m["role"] for m in history] == ["user", "assistant", "tool"], second["messages"]
    user, assistant, result = history
    assert text_of(user.get("content")) == PROMPT
    [call] = assistant["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == ARGUMENTS
    assert result["tool_call_id"] == call["id"]
    assert text_of(result.get("content")) == RESULT
    # the instructions (LangChain: its system message) reach the model on every call
    assert all(instructions(body) == [INSTRUCTIONS] for body in bodies), [b["messages"] for b in bodies]


def assert_messages_round_trip(fake: FakeAnthropic) -> None:
    """Two Messages calls upstream: the question with the tool offered, then the whole history
    (the assistant turn with its ``tool_use``, and a user turn with the ``tool_result``)."""
    bodies = message_bodies(fake)
    assert len(bodies) == 2, [b["messages"] for b in bodies]
    first, second = bodies
    assert [t["name"] for t in first.get("tools") or []] == ["get_weather"]
    assert [(m["role"], block_text(m["content"])) for m in first["messages"]] == [("user", PROMPT)]
    history = second["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"], history
    user, assistant, results = history
    assert block_text(user["content"]) == PROMPT
    # the model's turn comes back whole: its words before the call (the fake's), then the call
    assert block_text(assistant["content"]) == "Let me check the weather."
    [use] = [b for b in assistant["content"] if b["type"] == "tool_use"]
    assert use["name"] == "get_weather" and use["input"] == ARGUMENTS
    [result] = [b for b in results["content"] if b["type"] == "tool_result"]
    assert result["tool_use_id"] == use["id"]
    assert block_text(result["content"]) == RESULT
    # the instructions (LangChain: its system message) reach the model on every call
    assert all(block_text(body.get("system") or "") == INSTRUCTIONS for body in bodies), bodies


@pytest.fixture
def anthropic_upstream(upstream_key: str) -> Iterator[FakeAnthropic]:
    """The fake Anthropic API, taking the key the gateway sends upstream."""
    with run_anthropic_upstream_in_thread(upstream_key) as fake:
        yield fake


@pytest.fixture(params=["openai-scripted", "anthropic"])
def responses_gateway(
    request: pytest.FixtureRequest, make_app: Callable[..., RunningApp]
) -> Iterator[Gateway]:
    if request.param == "anthropic":
        fake: FakeAnthropic = request.getfixturevalue("anthropic_upstream")
        entry = {
            "name": "claude-test",
            "provider": "anthropic",
            "base_url": fake.base_url,
            "upstream_model": "claude-test",
            "api_key_env": UPSTREAM_KEY_ENV,
            "max_retries": 1,
            "timeout": 10,
        }
        app = make_app([entry])
        gateway = Gateway(
            app, "claude-test", "Tool said: " + RESULT, lambda: assert_messages_round_trip(fake)
        )
    else:
        upstream: FakeOpenAI = request.getfixturevalue("upstream")
        upstream.script = weather_script
        app = make_app([model_entry("gpt-test", upstream)])
        gateway = Gateway(app, "gpt-test", ANSWER_PREFIX + RESULT, lambda: assert_chat_round_trip(upstream))
    with run_worker(app.settings):
        yield gateway


# ------------------------------------------------------------------------------ OpenAI Agents SDK


@STREAMING
async def test_openai_agents_sdk_runs_a_function_tool_through_responses(
    responses_gateway: Gateway, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    calls: list[tuple[str, str | None]] = []

    @function_tool
    def get_weather(city: str, unit: str | None = None) -> str:
        """Get the current weather in a city."""
        calls.append((city, unit))
        return weather(city)

    client = AsyncOpenAI(base_url=responses_gateway.v1, api_key="sk-test", max_retries=0, timeout=30)
    # the SDK keeps its default client in a module global: put the previous one back at teardown
    monkeypatch.setattr(_openai_shared, "_default_openai_client", _openai_shared.get_default_openai_client())
    set_default_openai_client(client, use_for_tracing=False)
    set_tracing_disabled(True)  # no trace export to api.openai.com
    # a model name resolves to the Responses model (not chat completions) by default
    assert isinstance(MultiProvider().get_model(responses_gateway.model), AgentsResponsesModel)
    agent = Agent(
        name="forecaster", instructions=INSTRUCTIONS, model=responses_gateway.model, tools=[get_weather]
    )
    try:
        if stream:
            streamed = Runner.run_streamed(agent, PROMPT)
            seen = set()
            async for event in streamed.stream_events():
                if isinstance(event, RawResponsesStreamEvent):
                    seen.add(event.data.type)
            assert not STREAM_EVENTS - seen, f"missing stream events: {STREAM_EVENTS - seen}"
            output = streamed.final_output
            raw = streamed.raw_responses
        else:
            result = await Runner.run(agent, PROMPT)
            output = result.final_output
            raw = result.raw_responses
    finally:
        await client.close()
    assert output == responses_gateway.answer
    assert calls == [CALL]
    assert len(raw) == 2 and all(r.response_id for r in raw)
    responses_gateway.assert_upstream_saw_one_tool_round_trip()


# ------------------------------------------------------------------------------------- pydantic-ai


@STREAMING
async def test_pydantic_ai_runs_a_tool_through_responses(
    responses_gateway: Gateway, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", responses_gateway.v1)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    agent = PydanticAgent(f"openai:{responses_gateway.model}", instructions=INSTRUCTIONS)
    # "openai:" is the Responses model in pydantic-ai ("openai-chat:" is chat completions)
    assert isinstance(agent.model, PydanticResponsesModel)
    calls: list[tuple[str, str | None]] = []

    @agent.tool_plain
    def get_weather(city: str, unit: str | None = None) -> str:
        """Get the current weather in a city."""
        calls.append((city, unit))
        return weather(city)

    if stream:
        events: list[AgentStreamEvent] = []

        async def collect(ctx: RunContext[Any], stream_events: AsyncIterable[AgentStreamEvent]) -> None:
            async for event in stream_events:
                events.append(event)

        # with an event stream handler every model request of the run streams
        result = await agent.run(PROMPT, event_stream_handler=collect)
        assert any(isinstance(e, FunctionToolCallEvent) for e in events)
        assert any(isinstance(e, PartStartEvent) and isinstance(e.part, TextPart) for e in events)
    else:
        result = await agent.run(PROMPT)
    assert result.output == responses_gateway.answer
    assert calls == [CALL]
    responses_gateway.assert_upstream_saw_one_tool_round_trip()


# --------------------------------------------------------------------------------------- LangChain


def ask(
    model: Runnable[LanguageModelInput, BaseMessage], messages: list[BaseMessage], stream: bool
) -> AIMessage:
    if not stream:
        message = model.invoke(messages)
        assert isinstance(message, AIMessage)
        return message
    merged: Any = None
    for chunk in model.stream(messages):
        merged = chunk if merged is None else merged + chunk
    assert isinstance(merged, AIMessage)
    return merged


@STREAMING
def test_langchain_runs_a_tool_loop_through_responses(responses_gateway: Gateway, stream: bool) -> None:
    calls: list[tuple[str, str | None]] = []

    @tool
    def get_weather(city: str, unit: str | None = None) -> str:
        """Get the current weather in a city."""
        calls.append((city, unit))
        return weather(city)

    llm = ChatOpenAI(
        model=responses_gateway.model,
        base_url=responses_gateway.v1,
        api_key="sk-test",  # type: ignore[arg-type]
        use_responses_api=True,
        max_retries=0,
        timeout=30,
    )
    model = llm.bind_tools([get_weather])
    messages: list[BaseMessage] = [SystemMessage(INSTRUCTIONS), HumanMessage(PROMPT)]
    first = ask(model, messages, stream)
    assert [(c["name"], c["args"]) for c in first.tool_calls] == [("get_weather", ARGUMENTS)]
    messages.append(first)
    for call in first.tool_calls:
        messages.append(get_weather.invoke(call))  # a ToolMessage answering the call
    final = ask(model, messages, stream)
    assert final.tool_calls == []
    assert final.text == responses_gateway.answer
    assert calls == [CALL]
    responses_gateway.assert_upstream_saw_one_tool_round_trip()
