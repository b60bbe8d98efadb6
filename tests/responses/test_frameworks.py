"""``POST /v1/responses`` end to end under the agent frameworks, each on its default settings,
which use the Responses API: the OpenAI Agents SDK, pydantic-ai and LangChain run a tool-using
agent against the gateway (a real worker process, a scripted fake chat upstream).

Each run is two Responses requests, none with ``previous_response_id``: the first gets a
``function_call`` output item, the framework runs the tool, and the second sends the whole
history back as input items (the user message, the ``function_call`` item, a
``function_call_output``; the Agents SDK and LangChain replay the item with its ``id`` and
``status``). The gateway answers each with one chat-completions call upstream, so the second
chat request must hold the full conversation.
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
from tests.conftest import RunningApp, model_entry
from tests.fakes._sse import text_of
from tests.fakes.openai_upstream import FakeOpenAI
from tests.responses.scripted import (
    ANSWER_PREFIX,
    chat_bodies,
    conversation,
    instructions,
    weather,
    weather_script,
)

pytestmark = pytest.mark.slow

MODEL = "gpt-test"
PROMPT = "What is the weather in Paris?"
INSTRUCTIONS = "You answer questions about the weather in one sentence."
RESULT = weather("Paris")
ANSWER = ANSWER_PREFIX + RESULT
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
    app: RunningApp
    upstream: FakeOpenAI

    @property
    def v1(self) -> str:
        return self.app.v1

    def assert_upstream_saw_one_tool_round_trip(self) -> None:
        """Two chat calls upstream: the question with the tool offered, then the whole history."""
        bodies = chat_bodies(self.upstream)
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
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        assert result["tool_call_id"] == call["id"]
        assert text_of(result.get("content")) == RESULT
        # the instructions (LangChain: its system message) reach the model on every call
        assert all(instructions(body) == [INSTRUCTIONS] for body in bodies), [b["messages"] for b in bodies]


@pytest.fixture
def responses_gateway(make_app: Callable[..., RunningApp], upstream: FakeOpenAI) -> Iterator[Gateway]:
    upstream.script = weather_script
    app = make_app([model_entry(MODEL, upstream)])
    with run_worker(app.settings):
        yield Gateway(app, upstream)


# ------------------------------------------------------------------------------ OpenAI Agents SDK


@STREAMING
async def test_openai_agents_sdk_runs_a_function_tool_through_responses(
    responses_gateway: Gateway, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return weather(city)

    client = AsyncOpenAI(base_url=responses_gateway.v1, api_key="sk-test", max_retries=0, timeout=30)
    # the SDK keeps its default client in a module global: put the previous one back at teardown
    monkeypatch.setattr(_openai_shared, "_default_openai_client", _openai_shared.get_default_openai_client())
    set_default_openai_client(client, use_for_tracing=False)
    set_tracing_disabled(True)  # no trace export to api.openai.com
    # a model name resolves to the Responses model (not chat completions) by default
    assert isinstance(MultiProvider().get_model(MODEL), AgentsResponsesModel)
    agent = Agent(name="forecaster", instructions=INSTRUCTIONS, model=MODEL, tools=[get_weather])
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
    assert output == ANSWER
    assert calls == ["Paris"]
    assert len(raw) == 2 and all(r.response_id for r in raw)
    responses_gateway.assert_upstream_saw_one_tool_round_trip()


# ------------------------------------------------------------------------------------- pydantic-ai


@STREAMING
async def test_pydantic_ai_runs_a_tool_through_responses(
    responses_gateway: Gateway, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", responses_gateway.v1)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    agent = PydanticAgent(f"openai:{MODEL}", instructions=INSTRUCTIONS)
    # "openai:" is the Responses model in pydantic-ai ("openai-chat:" is chat completions)
    assert isinstance(agent.model, PydanticResponsesModel)
    calls: list[str] = []

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return weather(city)

    if stream:
        events: list[AgentStreamEvent] = []

        async def collect(ctx: RunContext[None], stream_events: AsyncIterable[AgentStreamEvent]) -> None:
            async for event in stream_events:
                events.append(event)

        # with an event stream handler every model request of the run streams
        result = await agent.run(PROMPT, event_stream_handler=collect)
        assert any(isinstance(e, FunctionToolCallEvent) for e in events)
        assert any(isinstance(e, PartStartEvent) and isinstance(e.part, TextPart) for e in events)
    else:
        result = await agent.run(PROMPT)
    assert result.output == ANSWER
    assert calls == ["Paris"]
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
    calls: list[str] = []

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return weather(city)

    llm = ChatOpenAI(
        model=MODEL,
        base_url=responses_gateway.v1,
        api_key="sk-test",  # type: ignore[arg-type]
        use_responses_api=True,
        max_retries=0,
        timeout=30,
    )
    model = llm.bind_tools([get_weather])
    messages: list[BaseMessage] = [SystemMessage(INSTRUCTIONS), HumanMessage(PROMPT)]
    first = ask(model, messages, stream)
    assert [(c["name"], c["args"]) for c in first.tool_calls] == [("get_weather", {"city": "Paris"})]
    messages.append(first)
    for call in first.tool_calls:
        messages.append(get_weather.invoke(call))  # a ToolMessage answering the call
    final = ask(model, messages, stream)
    assert final.tool_calls == []
    assert final.text == ANSWER
    assert calls == ["Paris"]
    responses_gateway.assert_upstream_saw_one_tool_round_trip()
