"""AnthropicProvider against the fake Anthropic server over real loopback sockets."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from tail_service.core.types import Deployment, Endpoint, UpstreamCall
from tail_service.errors import (
    ProviderConnectionError,
    ProviderError,
    ProviderHTTPError,
    ProviderProtocolError,
    ProviderStreamCut,
    ProviderTimeoutError,
    ProviderUnsupportedError,
)
from tail_service.providers.anthropic import AnthropicProvider
from tests.fakes.anthropic_upstream import FakeAnthropic, Fault, start_anthropic_upstream

KEY = "sk-ant-api03-SECRET-test-key-0123456789"
NOW = 1_700_000_000.0
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with start_anthropic_upstream(api_key=KEY) as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def provider(session: aiohttp.ClientSession) -> AnthropicProvider:
    return AnthropicProvider(session, clock=lambda: NOW)


def make_call(
    base_url: str, body: dict[str, Any], *, key: str | None = KEY, timeout: float = 10.0
) -> UpstreamCall:
    deployment = Deployment(
        id="claude#0",
        model="claude-public",
        provider="anthropic",
        base_url=base_url,
        upstream_model="claude-test-1",
        endpoints=frozenset({Endpoint.CHAT, Endpoint.COMPLETION}),
        connect_timeout=2.0,
        headers=(("anthropic-beta", "tools-2024-05-16"), ("x-api-key", "config-must-not-win")),
    )
    return UpstreamCall(
        deployment=deployment,
        body={"model": "claude-test-1", **body},
        api_key=key,
        request_id="req-abc",
        timeout=timeout,
        forward_headers=(("x-trace-id", "t-1"), ("authorization", "Bearer client-token")),
    )


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": text}],
        **extra,
    }


async def collect(gen: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [chunk async for chunk in gen]


def accumulate(chunks: list[dict[str, Any]], tools: list[Any] | None = None) -> Any:
    """Feed chunks through the openai SDK's own accumulator (catches repeated role/id/name)."""
    state: Any = ChatCompletionStreamState(input_tools=tools) if tools else ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    return state.get_final_completion()


def assert_no_key(exc: BaseException) -> None:
    for text in (str(exc), repr(exc), repr(getattr(exc, "body", None)), repr(exc.args)):
        assert KEY not in text


# -- happy paths ----------------------------------------------------------------------


async def test_chat_text_and_wire_request(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    out = await provider.chat(make_call(fake.base_url, chat_body("hello there", temperature=1.5, stop="zzz")))
    assert out["id"] == "chatcmpl-fake0001"
    assert (
        out["object"] == "chat.completion" and out["created"] == int(NOW) and out["model"] == "claude-public"
    )
    assert out["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "You said: hello there", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert (
        out["usage"]["completion_tokens"] == 4
        and out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 4
    )

    [seen] = fake.requests
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == KEY
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.headers["x-request-id"] == "req-abc"
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["anthropic-beta"] == "tools-2024-05-16"
    assert seen.headers["x-trace-id"] == "t-1"
    assert "authorization" not in seen.headers
    assert seen.body == {
        "model": "claude-test-1",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
        "max_tokens": 4096,
        "system": "Be nice.",
        "temperature": 1.0,
        "stop_sequences": ["zzz"],
    }


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
async def test_base_url_forms(fake: FakeAnthropic, provider: AnthropicProvider, suffix: str) -> None:
    await provider.chat(make_call(fake.base_url + suffix, chat_body("hi")))
    assert fake.requests[-1].path == "/v1/messages"


async def test_chat_max_tokens_and_cache_usage(session: aiohttp.ClientSession) -> None:
    async with start_anthropic_upstream(api_key=KEY, cache_read_tokens=30, cache_creation_tokens=5) as server:
        provider = AnthropicProvider(session)
        out = await provider.chat(make_call(server.base_url, chat_body("one two three four", max_tokens=2)))
    assert out["choices"][0]["message"]["content"] == "You said:"
    assert out["choices"][0]["finish_reason"] == "length"
    usage = out["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 30}
    assert usage["prompt_tokens"] == 2 + 4 + 30 + 5  # system + user words, cache reads and writes
    assert usage["completion_tokens"] == 2


async def test_chat_tool_round_trip(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What's the weather in Paris?"}]
    out = await provider.chat(make_call(fake.base_url, {"messages": messages, "tools": [WEATHER_TOOL]}))
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check the weather."
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}

    messages += [choice["message"], {"role": "tool", "tool_call_id": call["id"], "content": "18C and sunny"}]
    out = await provider.chat(make_call(fake.base_url, {"messages": messages, "tools": [WEATHER_TOOL]}))
    assert out["choices"][0]["message"]["content"] == "Tool said: 18C and sunny"
    assert out["choices"][0]["finish_reason"] == "stop"


async def test_forced_tool_choice(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = chat_body("hi", tools=[WEATHER_TOOL], tool_choice=choice, parallel_tool_calls=False)
    out = await provider.chat(make_call(fake.base_url, body))
    assert out["choices"][0]["message"]["content"] is None
    assert fake.requests[0].body["tool_choice"] == {
        "type": "tool",
        "name": "get_weather",
        "disable_parallel_tool_use": True,
    }


async def test_stream_text(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    chunks = await collect(provider.chat_stream(make_call(fake.base_url, chat_body("stream me please"))))
    assert fake.requests[0].body["stream"] is True
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    final = accumulate(chunks)
    assert final.choices[0].message.role == "assistant"
    assert final.choices[0].message.content == "You said: stream me please"
    assert fake.completed_streams == 1
    # the pooled connection is still usable afterwards
    again = await provider.chat(make_call(fake.base_url, chat_body("again")))
    assert again["choices"][0]["message"]["content"] == "You said: again"


async def test_stream_parallel_tool_calls(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    body = chat_body("weather in Paris and Tokyo, in parallel", tools=[WEATHER_TOOL])
    chunks = await collect(provider.chat_stream(make_call(fake.base_url, body)))
    fragments = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [tc["index"] for tc in fragments if "id" in tc] == [0, 1]
    assert all("id" not in tc and "name" not in tc["function"] for tc in fragments if "type" not in tc)
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    final = accumulate(chunks, [WEATHER_TOOL])
    calls = final.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_weather"]
    assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Paris", "Tokyo"]
    assert final.choices[0].message.content == "Let me check the weather."
    assert final.usage is not None and final.usage.completion_tokens > 0


@pytest.mark.parametrize(
    "opts",
    [
        {"line_ending": "\r\n", "chunk_size": 3, "comments": True},
        {"line_ending": "\r", "chunk_size": 1},
        {"line_ending": "\n", "chunk_size": 7, "comments": True},
    ],
)
async def test_stream_sse_framing_variants(session: aiohttp.ClientSession, opts: dict[str, Any]) -> None:
    async with start_anthropic_upstream(api_key=KEY, **opts) as server:
        provider = AnthropicProvider(session)
        chunks = await collect(provider.chat_stream(make_call(server.base_url, chat_body("a b c"))))
    assert accumulate(chunks).choices[0].message.content == "You said: a b c"


async def test_completion_and_completion_stream(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    call = make_call(fake.base_url, {"prompt": "Say this is a test"})
    out = await provider.completion(call)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert out["choices"][0]["text"] == "You said: Say this is a test"
    assert out["choices"][0]["finish_reason"] == "stop"
    assert fake.requests[0].body["max_tokens"] == 16  # OpenAI's legacy default
    assert fake.requests[0].body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Say this is a test"}]}
    ]

    chunks = await collect(
        provider.completion_stream(make_call(fake.base_url, {"prompt": "hi", "max_tokens": 50}))
    )
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "You said: hi"
    assert chunks[-1]["choices"] == [] and "usage" in chunks[-1]

    with pytest.raises(ProviderHTTPError) as info:
        await provider.completion(make_call(fake.base_url, {"prompt": ["a", "b"]}))
    assert info.value.status == 400


async def test_embeddings_unsupported(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    with pytest.raises(ProviderUnsupportedError):
        await provider.embeddings(make_call(fake.base_url, {"input": "x"}))
    await provider.aclose()


# -- failures -------------------------------------------------------------------------


async def test_429_with_retry_after(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    fake.add_fault(
        status=429, message="Number of request tokens has exceeded your rate limit", retry_after="7"
    )
    with pytest.raises(ProviderHTTPError) as info:
        await provider.chat(make_call(fake.base_url, chat_body("hi")))
    err = info.value
    assert (err.status, err.retry_after, err.retryable, err.failover) == (429, 7.0, True, True)
    assert err.message == "Number of request tokens has exceeded your rate limit"
    assert err.body["error"]["type"] == "rate_limit_error"

    fake.add_fault(status=429, retry_after_ms="1500", retry_after="9")
    with pytest.raises(ProviderHTTPError) as info:
        await anext(provider.chat_stream(make_call(fake.base_url, chat_body("hi"))))
    assert info.value.retry_after == 1.5


async def test_529_overloaded_is_retryable_503(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    fake.add_fault(status=529, message="Overloaded", times=2)
    for attempt in (
        provider.chat(make_call(fake.base_url, chat_body("hi"))),
        anext(provider.chat_stream(make_call(fake.base_url, chat_body("hi")))),
    ):
        with pytest.raises(ProviderHTTPError) as info:
            await attempt
        assert (info.value.status, info.value.retryable, info.value.failover) == (503, True, True)
        assert info.value.message == "Overloaded"
    assert len(fake.requests) == 2


async def test_400_is_not_retryable(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    fake.add_fault(status=400, message="messages: text content blocks must be non-empty")
    with pytest.raises(ProviderHTTPError) as info:
        await provider.chat(make_call(fake.base_url, chat_body("hi")))
    assert (info.value.status, info.value.retryable, info.value.failover) == (400, False, False)
    assert info.value.message == "messages: text content blocks must be non-empty"


async def test_untranslatable_request_is_400_without_upstream_call(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    gen = provider.chat_stream(make_call(fake.base_url, chat_body("hi", n=2)))
    with pytest.raises(ProviderHTTPError) as info:
        await anext(gen)
    assert info.value.status == 400 and info.value.message == "n>1 is not supported by anthropic deployments"
    assert (
        info.value.body["error"]["type"] == "invalid_request_error"
        and info.value.body["error"]["param"] == "n"
    )
    assert not info.value.retryable and not info.value.failover
    assert fake.requests == []


async def test_bad_key_is_401_and_never_leaks(session: aiohttp.ClientSession) -> None:
    async with start_anthropic_upstream(api_key="another-key", echo_key_in_errors=True) as server:
        provider = AnthropicProvider(session)
        for attempt in (
            provider.chat(make_call(server.base_url, chat_body("hi"))),
            anext(provider.chat_stream(make_call(server.base_url, chat_body("hi")))),
        ):
            with pytest.raises(ProviderHTTPError) as info:
                await attempt
            assert (info.value.status, info.value.retryable, info.value.failover) == (401, False, True)
            assert "invalid x-api-key ***" in info.value.message
            assert_no_key(info.value)
    assert KEY not in repr(make_call("http://x", {}))


async def test_stream_cut_mid_way(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    for fault in (Fault(cut_after=5), Fault(end_after=6)):
        fake.add_fault(fault)
        got: list[dict[str, Any]] = []
        with pytest.raises(ProviderStreamCut) as info:
            async for chunk in provider.chat_stream(
                make_call(fake.base_url, chat_body("one two three four"))
            ):
                got.append(chunk)
        assert got and got[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all(c["choices"] and c["choices"][0]["finish_reason"] is None for c in got)
        assert info.value.retryable
        assert_no_key(info.value)


async def test_error_event_mid_stream(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    fake.add_fault(error_event_after=4)
    got: list[dict[str, Any]] = []
    with pytest.raises(ProviderHTTPError) as info:
        async for chunk in provider.chat_stream(make_call(fake.base_url, chat_body("one two three"))):
            got.append(chunk)
    assert got
    assert (info.value.status, info.value.retryable, info.value.message) == (503, True, "Overloaded")


async def test_early_close_drops_upstream_connection(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    fake.add_fault(event_delay=0.03)
    gen = provider.chat_stream(make_call(fake.base_url, chat_body(" ".join(["word"] * 200))))
    first = [await anext(gen) for _ in range(3)]
    assert first[1]["choices"][0]["delta"] == {"content": "You"}
    await gen.aclose()
    await fake.wait_disconnect(within=3.0)
    assert fake.disconnects == 1 and fake.completed_streams == 0


async def test_timeouts(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    fake.add_fault(delay=2.0, times=2)
    with pytest.raises(ProviderTimeoutError):
        await provider.chat(make_call(fake.base_url, chat_body("hi"), timeout=0.3))
    with pytest.raises(ProviderTimeoutError):  # first-byte deadline
        await anext(provider.chat_stream(make_call(fake.base_url, chat_body("hi"), timeout=0.3)))

    fake.add_fault(keepalive_for=1.5)  # bytes keep coming, but no chunk within the deadline
    with pytest.raises(ProviderTimeoutError):
        await anext(provider.chat_stream(make_call(fake.base_url, chat_body("hi"), timeout=0.3)))

    fake.add_fault(stall_after=4)  # idle timeout once streaming
    got: list[dict[str, Any]] = []
    with pytest.raises(ProviderTimeoutError) as info:
        async for chunk in provider.chat_stream(
            make_call(fake.base_url, chat_body("a b c d e"), timeout=0.3)
        ):
            got.append(chunk)
    assert got and info.value.retryable
    assert_no_key(info.value)


async def test_slow_but_steady_stream_is_not_capped(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    fake.add_fault(event_delay=0.05)  # ~1 s in total, every gap well under the 0.4 s idle timeout
    call = make_call(fake.base_url, chat_body("a b c d e f g h i j k"), timeout=0.4)
    chunks = await collect(provider.chat_stream(call))
    assert accumulate(chunks).choices[0].message.content == "You said: a b c d e f g h i j k"


async def test_connection_reset_and_refused(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    fake.add_fault(reset=True, times=2)
    with pytest.raises(ProviderConnectionError) as info:
        await provider.chat(make_call(fake.base_url, chat_body("hi")))
    assert_no_key(info.value)
    with pytest.raises(ProviderConnectionError):
        await anext(provider.chat_stream(make_call(fake.base_url, chat_body("hi"))))

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for attempt in (
        provider.chat(make_call(f"http://127.0.0.1:{port}", chat_body("hi"))),
        anext(provider.chat_stream(make_call(f"http://127.0.0.1:{port}", chat_body("hi")))),
    ):
        with pytest.raises(ProviderConnectionError) as info:
            await attempt
        assert info.value.retryable and info.value.failover
        assert_no_key(info.value)


async def test_non_json_answers_are_protocol_errors(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    fake.add_fault(status=200, body="<html>gateway</html>", times=2)
    with pytest.raises(ProviderProtocolError):
        await provider.chat(make_call(fake.base_url, chat_body("hi")))
    with pytest.raises(ProviderProtocolError):  # application/json instead of an event stream
        await anext(provider.chat_stream(make_call(fake.base_url, chat_body("hi"))))


async def test_500_without_json_body(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    fake.add_fault(status=500, body="upstream exploded")
    with pytest.raises(ProviderError) as info:
        await provider.chat(make_call(fake.base_url, chat_body("hi")))
    assert isinstance(info.value, ProviderHTTPError)
    assert (info.value.status, info.value.retryable, info.value.body) == (500, True, "upstream exploded")
    assert info.value.message == "anthropic answered HTTP 500"
