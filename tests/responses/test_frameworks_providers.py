"""``POST /v1/responses`` under the agent frameworks on the embedded local chat model.

SmolLM2-135M cannot call tools (the local provider ignores them by design), so each framework
runs its plain agent, no tools: one question, greedy where the framework lets us choose
(temperature 0), a few tokens, streaming and not, through the Responses API (each
framework's default for an OpenAI model). The run's id is a ``resp_`` id, and the gateway
serves the stored response back on ``GET /v1/responses/{id}`` with the same answer.

The tool loops themselves, on an OpenAI-compatible upstream and on an Anthropic deployment,
are in ``test_frameworks.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from agents import Agent, ModelSettings, RunConfig, Runner, set_default_openai_client, set_tracing_disabled
from agents.models import _openai_shared
from agents.models.multi_provider import MultiProvider
from agents.models.openai_responses import OpenAIResponsesModel as AgentsResponsesModel
from agents.stream_events import RawResponsesStreamEvent
from langchain_core.messages import AIMessage, HumanMessage
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI
from pydantic_ai import Agent as PydanticAgent
from pydantic_ai import RunContext
from pydantic_ai.messages import AgentStreamEvent, PartStartEvent, TextPart
from pydantic_ai.models.openai import OpenAIResponsesModel as PydanticResponsesModel

from tail_service.settings import load_settings
from tests.batch.fixtures import run_worker
from tests.conftest import RunningApp, serve_app

pytestmark = pytest.mark.slow

LOCAL_MODEL = "local/smollm2-135m-instruct"
QUESTION = "What is the capital of France?"
MAX_TOKENS = 24

STREAMING = pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])


@dataclass
class LocalGateway:
    app: RunningApp

    @property
    def v1(self) -> str:
        return self.app.v1

    def assert_stored(self, response_id: str | None, answer: str) -> None:
        """The run went through ``/v1/responses``: its response is stored, with this answer."""
        assert response_id is not None and response_id.startswith("resp_"), response_id
        with self.app.client(timeout=30) as client:
            stored = client.responses.retrieve(response_id)
        assert stored.status == "completed" and stored.model == LOCAL_MODEL
        assert stored.output_text == answer
        # the framework's settings came with the request
        assert (stored.temperature, stored.max_output_tokens) == (0, MAX_TOKENS)


@pytest.fixture(scope="module")
def local_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGateway]:
    """One gateway and worker for the module: the worker loads the model once (like ``make_app``'s
    gateways, but no upstream key is involved)."""
    settings = load_settings(
        None,
        models=[{"name": LOCAL_MODEL, "provider": "local", "upstream_model": "smollm2-135m-instruct"}],
        server={"request_timeout": 60, "sse_keepalive": 0},
        auth={"mode": "disabled"},
        ratelimit={"enabled": False},
        state_dir=tmp_path_factory.mktemp("gateway"),
    )
    with serve_app(settings) as app, run_worker(app.settings):
        yield LocalGateway(app)


def assert_answered(answer: Any) -> None:
    """An answer, and the right one: greedy, the model knows it (``tail-service up``'s test checks it too)."""
    assert isinstance(answer, str) and "Paris" in answer, repr(answer)


@STREAMING
async def test_openai_agents_sdk_asks_the_local_model_through_responses(
    local_gateway: LocalGateway, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    client = AsyncOpenAI(base_url=local_gateway.v1, api_key="sk-test", max_retries=0, timeout=60)
    monkeypatch.setattr(_openai_shared, "_default_openai_client", _openai_shared.get_default_openai_client())
    set_default_openai_client(client, use_for_tracing=False)
    set_tracing_disabled(True)
    # "local/..." reads as a provider prefix: the documented switch sends the whole name as the model id
    provider = MultiProvider(unknown_prefix_mode="model_id")
    assert isinstance(provider.get_model(LOCAL_MODEL), AgentsResponsesModel)
    agent = Agent(
        name="assistant",
        model=LOCAL_MODEL,
        model_settings=ModelSettings(temperature=0, max_tokens=MAX_TOKENS),
    )
    config = RunConfig(model_provider=provider)
    try:
        if stream:
            streamed = Runner.run_streamed(agent, QUESTION, run_config=config)
            kinds = [
                e.data.type async for e in streamed.stream_events() if isinstance(e, RawResponsesStreamEvent)
            ]
            assert "response.output_text.delta" in kinds and kinds[-1] == "response.completed", kinds
            output, raw = streamed.final_output, streamed.raw_responses
        else:
            result = await Runner.run(agent, QUESTION, run_config=config)
            output, raw = result.final_output, result.raw_responses
    finally:
        await client.close()
    assert_answered(output)
    [response] = raw
    local_gateway.assert_stored(response.response_id, output)


@STREAMING
async def test_pydantic_ai_asks_the_local_model_through_responses(
    local_gateway: LocalGateway, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", local_gateway.v1)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    agent = PydanticAgent(
        f"openai:{LOCAL_MODEL}", model_settings={"temperature": 0, "max_tokens": MAX_TOKENS}
    )
    assert isinstance(agent.model, PydanticResponsesModel)
    if stream:
        events: list[AgentStreamEvent] = []

        async def collect(ctx: RunContext[Any], stream_events: AsyncIterable[AgentStreamEvent]) -> None:
            async for event in stream_events:
                events.append(event)

        result = await agent.run(QUESTION, event_stream_handler=collect)
        assert any(isinstance(e, PartStartEvent) and isinstance(e.part, TextPart) for e in events), events
    else:
        result = await agent.run(QUESTION)
    assert_answered(result.output)
    local_gateway.assert_stored(result.response.provider_response_id, result.output)


@STREAMING
def test_langchain_asks_the_local_model_through_responses(local_gateway: LocalGateway, stream: bool) -> None:
    llm = ChatOpenAI(
        model=LOCAL_MODEL,
        base_url=local_gateway.v1,
        api_key="sk-test",  # type: ignore[arg-type]
        use_responses_api=True,
        temperature=0,
        max_tokens=MAX_TOKENS,  # type: ignore[call-arg]
        max_retries=0,
        timeout=60,
    )
    # sync, as LangChain keeps one async HTTP client per base URL, bound to the first test's event loop
    messages = [HumanMessage(QUESTION)]
    if stream:
        merged: Any = None
        for chunk in llm.stream(messages):
            merged = chunk if merged is None else merged + chunk
        message = merged
    else:
        message = llm.invoke(messages)
    assert isinstance(message, AIMessage)
    assert_answered(message.text)
    local_gateway.assert_stored(message.response_metadata.get("id"), message.text)
