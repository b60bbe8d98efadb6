"""The fake OpenAI upstream itself, checked with the official `openai` SDK and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.fakes.openai_upstream import (
    FakeOpenAI,
    fake_embedding,
    run_openai_upstream_in_thread,
    start_openai_upstream,
)

MSG: Any = [{"role": "user", "content": "hello there"}]
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_stock_price",
            "parameters": {"type": "object", "properties": {"ticker": {}}},
        },
    },
]


@pytest.fixture
async def up() -> AsyncIterator[FakeOpenAI]:
    async with start_openai_upstream(name="a", api_key="sk-up-a") as fake:
        yield fake


@pytest.fixture
async def client(up: FakeOpenAI) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=up.base_url, api_key="sk-up-a", max_retries=0) as c:
        yield c


async def raw_events(up: FakeOpenAI, path: str, body: dict[str, Any]) -> list[bytes]:
    """POST and return the `data:` payloads (raises if the body is cut)."""
    async with (
        httpx.AsyncClient(base_url=up.base_url, headers={"Authorization": "Bearer sk-up-a"}) as http,
        http.stream("POST", path, json=body) as resp,
    ):
        assert resp.headers["content-type"].startswith("text/event-stream")
        return [line[6:].encode() async for line in resp.aiter_lines() if line.startswith("data: ")]


async def test_chat_json(up: FakeOpenAI, client: AsyncOpenAI) -> None:
    r = await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert r.choices[0].message.content == "[a] hello there"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (2, 3, 5)
    rec = up.requests[-1]
    assert (rec.method, rec.path, rec.json["model"]) == ("POST", "/v1/chat/completions", "gpt-4o-mini")
    assert rec.headers["authorization"] == "Bearer sk-up-a"

    r = await client.chat.completions.create(
        model="m",
        messages=MSG,
        n=2,
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
    )
    assert [c.message.content for c in r.choices] == ["[a] hello there", "[a] hello there"]
    assert [c.finish_reason for c in r.choices] == ["stop", "length"]
    assert r.usage is not None and r.usage.completion_tokens == 6
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content is not None
    assert [t.token for t in lp.content] == ["[a]", " hello", " there"]
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in lp.content)
    r = await client.chat.completions.create(model="m", messages=MSG, n=2)
    assert r.choices[1].message.content == "[a] hello there #1"


async def test_chat_stream_helper_matches_json(up: FakeOpenAI, client: AsyncOpenAI) -> None:
    kwargs: Any = {"model": "m", "messages": MSG, "n": 3, "logprobs": True}
    plain = await client.chat.completions.create(**kwargs)
    async with client.chat.completions.stream(**kwargs, stream_options={"include_usage": True}) as s:
        final = await s.get_final_completion()
    assert [c.message.content for c in final.choices] == [c.message.content for c in plain.choices]
    assert [c.message.role for c in final.choices] == ["assistant"] * 3
    assert final.usage == plain.usage


async def test_raw_chat_stream_wire_format(up: FakeOpenAI) -> None:
    body = {"model": "m", "messages": MSG, "stream": True, "stream_options": {"include_usage": True}}
    events = await raw_events(up, "/chat/completions", body)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:4]] == ["[a]", " hello", " there"]
    assert chunks[4]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert chunks[5]["choices"] == [] and chunks[5]["usage"]["total_tokens"] == 5
    assert len({(c["id"], c["created"], c["model"], c["object"]) for c in chunks}) == 1
    del body["stream_options"]
    events = await raw_events(up, "/chat/completions", body)
    assert not any(b'"usage"' in e for e in events) and len(events) == 6


async def test_tool_calls_stream_and_tool_turn(client: AsyncOpenAI) -> None:
    ask: Any = [{"role": "user", "content": "weather and stock please"}]
    async with client.chat.completions.stream(model="m", messages=ask, tools=TOOLS) as s:
        final = await s.get_final_completion()
    choice = final.choices[0]
    calls = choice.message.tool_calls or []
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [c.function.name for c in calls] == ["get_weather", "get_stock_price"]
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}, {"ticker": "AAPL"}]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id

    forced = await client.chat.completions.create(
        model="m",
        messages=MSG,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_stock_price"}},
    )
    forced_calls: Any = forced.choices[0].message.tool_calls
    assert [c.function.name for c in forced_calls] == ["get_stock_price"]
    required = await client.chat.completions.create(
        model="m", messages=MSG, tools=TOOLS, tool_choice="required"
    )
    assert required.choices[0].finish_reason == "tool_calls"
    turn: Any = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump()]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny 21C"},
    ]
    after = await client.chat.completions.create(model="m", messages=turn, tools=TOOLS)
    assert after.choices[0].message.content == "[a] sunny 21C"


async def test_raw_tool_call_fragments(up: FakeOpenAI) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "weather"}],
        "tools": TOOLS,
        "stream": True,
    }
    deltas = [
        orjson.loads(e)["choices"][0]["delta"] for e in (await raw_events(up, "/chat/completions", body))[:-1]
    ]
    frags = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert frags[0]["function"] == {"name": "get_weather", "arguments": ""} and frags[0]["id"].startswith(
        "call_"
    )
    assert len(frags) >= 4 and all(set(f) == {"index", "function"} for f in frags[1:])
    assert "".join(f["function"]["arguments"] for f in frags) == '{"city": "Paris"}'


async def test_embeddings(up: FakeOpenAI, client: AsyncOpenAI) -> None:
    b64 = await client.embeddings.create(model="e", input=["hi", "there"])  # SDK asks base64, decodes
    flt = await client.embeddings.create(model="e", input=["hi", "there"], encoding_format="float")
    assert up.requests[-2].json["encoding_format"] == "base64"
    assert [d.embedding for d in b64.data] == [d.embedding for d in flt.data]
    assert flt.data[0].embedding == fake_embedding("hi", 32) and [d.index for d in flt.data] == [0, 1]
    short = await client.embeddings.create(model="e", input="hi", dimensions=8, encoding_format="float")
    assert short.data[0].embedding == fake_embedding("hi", 32)[:8]
    toks = await client.embeddings.create(model="e", input=[[1, 2, 3], [4]], encoding_format="float")
    assert toks.usage.prompt_tokens == 4 and toks.data[1].embedding == fake_embedding([4], 32)
    with pytest.raises(openai.BadRequestError):
        await client.embeddings.create(model="e", input="hi", extra_body={"junk": 1})


async def test_legacy_completions(up: FakeOpenAI, client: AsyncOpenAI) -> None:
    r = await client.completions.create(model="i", prompt=["one two", "three"], echo=True, logprobs=2)
    assert [c.text for c in r.choices] == ["one two[a] one two", "three[a] three"]
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None
    assert (
        len(lp.tokens)
        == len(lp.token_logprobs or [])
        == len(lp.top_logprobs or [])
        == len(lp.text_offset or [])
    )
    r = await client.completions.create(model="i", prompt="a b c d e", max_tokens=2)
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("[a] a", "length")
    stream = await client.completions.create(
        model="i", prompt="hi", stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "[a] hi"
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None, None, "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 3


async def test_models_and_auth(up: FakeOpenAI, client: AsyncOpenAI) -> None:
    assert "gpt-4o-mini" in [m.id async for m in client.models.list()]
    async with AsyncOpenAI(base_url=up.base_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as exc:
            await bad.chat.completions.create(model="m", messages=MSG)
    assert exc.value.code == "invalid_api_key" and up.requests[-1].headers["authorization"] == "Bearer wrong"


async def test_fail_next_then_retry(up: FakeOpenAI) -> None:
    up.fail_next(1, status=429, headers={"retry-after-ms": "10"})
    async with AsyncOpenAI(base_url=up.base_url, api_key="sk-up-a", max_retries=1) as c:
        r = await c.chat.completions.create(model="m", messages=MSG)
        assert r.choices[0].message.content == "[a] hello there"
        up.fail_next(1, status=500, headers={"x-should-retry": "false"})
        with pytest.raises(openai.InternalServerError) as exc:
            await c.chat.completions.create(model="m", messages=MSG)
    assert exc.value.type == "server_error"
    assert [r.fault for r in up.requests] == ["fail", None, "fail"] and up.pending_faults == 0


async def test_delay_next_and_client_timeout_cancels(up: FakeOpenAI, client: AsyncOpenAI) -> None:
    up.delay_next(1, seconds=0.3)
    t0 = time.monotonic()
    await client.chat.completions.create(model="m", messages=MSG)
    assert time.monotonic() - t0 >= 0.3
    up.delay_next(1, seconds=5)
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="m", messages=MSG, timeout=0.2)
    await asyncio.wait_for(up.cancel_seen.wait(), 5)
    assert up.cancelled == [up.requests[-1]] and up.requests[-1].cancelled


async def test_reset_next(up: FakeOpenAI, client: AsyncOpenAI) -> None:
    up.reset_next(1)
    with pytest.raises(openai.APIConnectionError):
        await client.embeddings.create(model="e", input="x")
    assert up.requests[-1].fault == "reset" and up.requests[-1].closed_by_server and not up.cancelled


async def test_cut_stream_next(up: FakeOpenAI) -> None:
    up.cut_stream_next(1, after_chunks=2)
    with pytest.raises(httpx.RemoteProtocolError):
        await raw_events(up, "/chat/completions", {"model": "m", "messages": MSG, "stream": True})
    assert up.requests[-1].fault == "cut" and not up.cancelled


async def test_error_event_next(client: AsyncOpenAI, up: FakeOpenAI) -> None:
    up.error_event_next(1, after_chunks=2)
    stream = await client.chat.completions.create(model="m", messages=MSG, stream=True)
    seen = []
    with pytest.raises(openai.APIError, match="server had an error"):
        async for chunk in stream:
            seen.append(chunk)
    assert len(seen) == 2


async def test_omit_usage(up: FakeOpenAI, client: AsyncOpenAI) -> None:
    up.omit_usage = True
    kwargs: Any = {"model": "m", "messages": MSG, "stream_options": {"include_usage": True}}
    async with client.chat.completions.stream(**kwargs) as s:
        final = await s.get_final_completion()
    assert final.usage is None and final.choices[0].message.content == "[a] hello there"


async def test_client_disconnect_mid_stream(up: FakeOpenAI) -> None:
    body = {"model": "m", "messages": MSG, "stream": True}
    headers = {"Authorization": "Bearer sk-up-a", "x-fake-chunk-delay": "0.2"}
    async with httpx.AsyncClient(base_url=up.base_url, headers=headers) as http:
        async with http.stream("POST", "/chat/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    break
        await asyncio.wait_for(up.cancel_seen.wait(), 5)
    assert len(up.cancelled) == 1 and up.cancelled[0].path == "/v1/chat/completions"


def test_thread_variant_sync_client() -> None:
    with run_openai_upstream_in_thread(name="b", api_key="sk-b", chunk_delay=0.05) as up:
        up.fail_next(1, status=503)
        c = OpenAI(base_url=up.base_url, api_key="sk-b", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            c.chat.completions.create(model="m", messages=MSG)
        stream = c.chat.completions.create(model="m", messages=MSG, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == "[b] hello there"
        with c.chat.completions.create(model="m", messages=MSG, stream=True) as s:
            next(iter(s))
        assert up.cancel_seen_sync.wait(5) and len(up.cancelled) == 1
        c.close()
