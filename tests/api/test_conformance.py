"""Black-box conformance of the gateway with the official ``openai`` SDK (contract §1-§7, §12).

Every test talks to the gateway under real uvicorn over loopback, with the fake OpenAI
upstream behind it. Check numbers refer to shared/docs/openai-contract.md §12; "S" checks
use the strict client. Raw ``httpx`` is used only for headers and SSE bytes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pydantic
import pytest

from tests.conftest import RunningApp, model_entry
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.timeout(60)

USER_HI = [{"role": "user", "content": "hi"}]
FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "function_call"}
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
FORCE_WEATHER = {"type": "function", "function": {"name": "get_weather"}}
EMBED_DIM = 32  # the fake upstream's embedding size


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def c(gateway: RunningApp) -> Iterator[openai.OpenAI]:
    """Strict SDK client (S checks)."""
    with gateway.strict_client() as client:
        yield client


@pytest.fixture
def cl(gateway: RunningApp) -> Iterator[openai.OpenAI]:
    """Loose SDK client."""
    with gateway.client() as client:
        yield client


@pytest.fixture
def http(gateway: RunningApp) -> Iterator[httpx.Client]:
    with gateway.http() as client:
        yield client


# ------------------------------------------------------------------------------------------- helpers


def assert_error_envelope(
    resp: httpx.Response,
    status: int,
    *,
    code: Any = ...,
    param: Any = ...,
    type_: str | None = None,
) -> dict[str, Any]:
    """Check 51: status, JSON content type, x-request-id and all four keys of ``error``."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    assert resp.headers.get("x-request-id"), "every response needs x-request-id"
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    if code is not ...:
        assert err["code"] == code, err
    if param is not ...:
        assert err["param"] == param, err
    if type_ is not None:
        assert err["type"] == type_, err
    return err


def sse_events(raw: bytes) -> list[str]:
    """The events of an SSE body, each as its text (lines joined), checking the framing."""
    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), repr(text[-40:])
    events = []
    for block in text.split("\n\n")[:-1]:
        lines = [ln for ln in block.split("\n") if not ln.startswith(":")]  # comments are allowed
        if not lines:
            continue
        for ln in lines:
            assert ln.startswith("data: "), f"only data: lines are allowed, got {ln!r}"
        events.append("\n".join(ln[len("data: ") :] for ln in lines))
    return events


def raw_stream(http: httpx.Client, path: str, body: dict[str, Any]) -> tuple[httpx.Response, bytes]:
    with http.stream("POST", path, json=body) as resp:
        data = resp.read()
    return resp, data


# ------------------------------------------------------------------------------------ 1-3: models


def test_models_list_strict(c: openai.OpenAI) -> None:
    page = c.models.list()
    ids = [m.id for m in page.data]
    assert ids == ["gpt-test", "org/embed-test", "embed-fixed"]
    for m in page.data:
        assert isinstance(m.id, str)
        assert m.object == "model"
        assert isinstance(m.created, int)
        assert isinstance(m.owned_by, str) and m.owned_by


def test_models_retrieve_every_listed_id_including_slash(c: openai.OpenAI) -> None:
    for m in c.models.list().data:
        got = c.models.retrieve(m.id)
        assert got.id == m.id
        assert got.object == "model"
    raw = c.models.with_raw_response.retrieve("org/embed-test")
    assert b"/models/org%2Fembed-test" in raw.http_request.url.raw_path  # the SDK encodes the slash
    assert raw.parse().id == "org/embed-test"


def test_models_retrieve_literal_slash(http: httpx.Client) -> None:
    resp = http.get("/v1/models/org/embed-test")  # what older SDKs and curl send
    assert resp.status_code == 200, resp.text
    assert resp.json()["id"] == "org/embed-test"
    assert resp.json()["object"] == "model"


def test_models_retrieve_unknown_is_404_model_not_found(c: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as ei:
        c.models.retrieve("no-such-model")
    assert ei.value.code == "model_not_found"
    assert ei.value.type == "invalid_request_error"
    assert_error_envelope(ei.value.response, 404, code="model_not_found")


# ----------------------------------------------------------------------------- 4-15: chat (non-stream)


def test_chat_basic_strict(c: openai.OpenAI) -> None:
    r = c.chat.completions.create(model="gpt-test", messages=USER_HI)
    assert r.object == "chat.completion"
    assert r.id and isinstance(r.created, int)
    assert r.model == "gpt-test"
    assert r.choices[0].index == 0
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "[a] hi"
    assert r.choices[0].finish_reason in FINISH_REASONS
    assert r.usage is not None
    # check 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens > 0


def test_chat_n3(c: openai.OpenAI) -> None:
    one = c.chat.completions.create(model="gpt-test", messages=USER_HI)
    r = c.chat.completions.create(model="gpt-test", messages=USER_HI, n=3)
    assert len(r.choices) == 3
    assert {ch.index for ch in r.choices} == {0, 1, 2}
    assert all(ch.message.content for ch in r.choices)
    assert r.usage is not None and one.usage is not None
    assert r.usage.completion_tokens >= 3 * one.usage.completion_tokens


@pytest.mark.parametrize("limit", ["max_completion_tokens", "max_tokens"])
def test_chat_token_limit_gives_length(c: openai.OpenAI, limit: str) -> None:
    r = c.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "tell me a long story"}], **{limit: 1}
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens <= 1


def test_chat_logprobs(c: openai.OpenAI) -> None:
    r = c.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "count to three"}],
        logprobs=True,
        top_logprobs=2,
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content
    for t in lp.content:
        assert isinstance(t.token, str)
        assert t.logprob <= 0
        assert t.bytes is None or isinstance(t.bytes, list)
        assert len(t.top_logprobs) <= 2
    assert "".join(t.token for t in lp.content) == r.choices[0].message.content


def test_chat_without_logprobs_has_null_logprobs(c: openai.OpenAI) -> None:
    r = c.chat.completions.create(model="gpt-test", messages=USER_HI)
    assert r.choices[0].logprobs is None


def test_chat_forced_tool_call(c: openai.OpenAI) -> None:
    r = c.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[WEATHER_TOOL],
        tool_choice=FORCE_WEATHER,
    )
    calls = r.choices[0].message.tool_calls
    assert calls
    call = calls[0]
    assert call.type == "function"
    assert call.id
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments), dict)
    assert r.choices[0].finish_reason in {"tool_calls", "stop"}


def test_chat_tool_round_trip(c: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = c.chat.completions.create(
        model="gpt-test", messages=messages, tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER
    )
    msg = first.choices[0].message
    assert msg.tool_calls
    messages.append(msg.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "sunny, 21C"})
    second = c.chat.completions.with_raw_response.create(
        model="gpt-test", messages=messages, tools=[WEATHER_TOOL]
    )
    assert second.status_code == 200
    answer = second.parse().choices[0]
    assert answer.message.content and "sunny, 21C" in answer.message.content
    assert answer.finish_reason == "stop"


class Weather(pydantic.BaseModel):
    city: str
    celsius: int


def _upstream_json_answer(upstream: FakeOpenAI, content: str) -> None:
    """Make the fake's next answer a chat completion whose content is ``content``."""
    upstream.fail_next(
        1,
        200,
        body={
            "id": "chatcmpl-json",
            "object": "chat.completion",
            "created": 1700000000,
            "model": "gpt-test",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
        },
    )


def test_chat_response_format_json_schema(c: openai.OpenAI, upstream: FakeOpenAI) -> None:
    schema = Weather.model_json_schema()
    schema["additionalProperties"] = False
    rf = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}}
    _upstream_json_answer(upstream, '{"city": "Paris", "celsius": 21}')
    r = c.chat.completions.create(model="gpt-test", messages=USER_HI, response_format=rf)  # type: ignore[arg-type]
    assert upstream.requests[-1].json["response_format"] == rf  # passed through untouched
    assert Weather.model_validate_json(r.choices[0].message.content or "") == Weather(
        city="Paris", celsius=21
    )

    _upstream_json_answer(upstream, '{"city": "Oslo", "celsius": -3}')
    parsed = c.chat.completions.parse(model="gpt-test", messages=USER_HI, response_format=Weather)
    assert parsed.choices[0].message.parsed == Weather(city="Oslo", celsius=-3)
    sent = upstream.requests[-1].json["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["strict"] is True


def test_chat_missing_messages_is_400_not_422(c: openai.OpenAI, upstream: FakeOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        c.post("/chat/completions", cast_to=object, body={"model": "gpt-test"})
    assert not isinstance(ei.value, openai.UnprocessableEntityError)
    assert ei.value.status_code == 400
    assert ei.value.param == "messages"
    assert_error_envelope(ei.value.response, 400, param="messages", type_="invalid_request_error")
    assert upstream.requests == []


@pytest.mark.parametrize(("field", "value"), [("temperature", 5), ("n", 0), ("top_p", 3)])
def test_chat_out_of_range_is_400_with_param(
    c: openai.OpenAI, upstream: FakeOpenAI, field: str, value: Any
) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model="gpt-test", messages=USER_HI, **{field: value})
    assert ei.value.status_code == 400
    assert ei.value.param == field
    assert_error_envelope(ei.value.response, 400, param=field, type_="invalid_request_error")
    assert upstream.requests == []


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"[1, 2, 3]", b'"a string"', b"42"],
    ids=["bad", "empty", "array", "str", "num"],
)
def test_chat_unparseable_or_non_object_body_is_400(http: httpx.Client, content: bytes) -> None:
    resp = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert_error_envelope(resp, 400, type_="invalid_request_error")


def test_chat_unknown_param_passes_through(c: openai.OpenAI, upstream: FakeOpenAI) -> None:
    r = c.chat.completions.create(
        model="gpt-test", messages=USER_HI, extra_body={"vendor_unknown_param": 1, "nested": {"x": [1]}}
    )
    assert r.choices[0].message.content == "[a] hi"
    sent = upstream.requests[-1].json
    assert sent["vendor_unknown_param"] == 1
    assert sent["nested"] == {"x": [1]}


def test_chat_json_content_type_and_request_id(c: openai.OpenAI) -> None:
    raw = c.chat.completions.with_raw_response.create(model="gpt-test", messages=USER_HI)
    assert raw.headers["content-type"].startswith("application/json")
    rid = raw.headers.get("x-request-id")
    assert rid
    assert raw.parse()._request_id == rid


def test_chat_unknown_model_404(c: openai.OpenAI, upstream: FakeOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as ei:
        c.chat.completions.create(model="no-such-model", messages=USER_HI)
    assert ei.value.code == "model_not_found"
    assert_error_envelope(ei.value.response, 404, code="model_not_found", type_="invalid_request_error")
    assert upstream.requests == []


def test_chat_stream_unknown_model_404_at_create(c: openai.OpenAI, upstream: FakeOpenAI) -> None:
    # check 24: an HTTP 404 JSON body, not a 200 SSE stream
    with pytest.raises(openai.NotFoundError) as ei:
        c.chat.completions.create(model="no-such-model", messages=USER_HI, stream=True)
    assert ei.value.code == "model_not_found"
    assert_error_envelope(ei.value.response, 404, code="model_not_found")
    assert upstream.requests == []


# ------------------------------------------------------------------------------------- 16-25: streams


def test_chat_stream_chunks_strict(c: openai.OpenAI) -> None:
    chunks = list(c.chat.completions.create(model="gpt-test", messages=USER_HI, stream=True))
    assert len(chunks) >= 2
    assert {ch.object for ch in chunks} == {"chat.completion.chunk"}
    assert len({ch.id for ch in chunks}) == 1
    assert len({ch.created for ch in chunks}) == 1
    assert {ch.model for ch in chunks} == {"gpt-test"}
    per_choice: dict[int, list[str | None]] = {}
    for ch in chunks:
        for choice in ch.choices:
            per_choice.setdefault(choice.index, []).append(choice.finish_reason)
    assert list(per_choice) == [0]
    finishes = per_choice[0]
    assert [f for f in finishes if f is not None] == ["stop"]
    assert finishes[-1] == "stop"
    text = "".join(choice.delta.content or "" for ch in chunks for choice in ch.choices)
    assert text == "[a] hi"


def test_chat_stream_raw_sse_framing(http: httpx.Client) -> None:
    body = {"model": "gpt-test", "messages": USER_HI, "stream": True}
    resp, data = raw_stream(http, "/v1/chat/completions", body)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers.get("x-request-id")
    assert b"\nevent:" not in data and not data.startswith(b"event:")
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    assert data.endswith(b"data: [DONE]\n\n")
    assert events.count("[DONE]") == 1
    for ev in events[:-1]:
        obj = json.loads(ev)
        assert obj["object"] == "chat.completion.chunk"
        assert "\n" not in ev  # one-line JSON


def test_chat_stream_helper_final_completion(c: openai.OpenAI) -> None:
    deltas: list[str] = []
    with c.chat.completions.stream(
        model="gpt-test", messages=[{"role": "user", "content": "stream me please"}]
    ) as s:
        for event in s:
            if event.type == "chunk":
                deltas.extend(ch.delta.content or "" for ch in event.chunk.choices)
        final = s.get_final_completion()
    msg = final.choices[0].message
    assert msg.role == "assistant"
    assert msg.content == "".join(deltas) == "[a] stream me please"
    assert final.choices[0].finish_reason == "stop"


def test_chat_stream_include_usage(c: openai.OpenAI, upstream: FakeOpenAI) -> None:
    chunks = list(
        c.chat.completions.create(
            model="gpt-test", messages=USER_HI, stream=True, stream_options={"include_usage": True}
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert last.usage.prompt_tokens > 0 and last.usage.completion_tokens > 0
    assert all(ch.usage is None for ch in chunks[:-1])
    assert all(ch.choices for ch in chunks[:-1])
    assert upstream.requests[-1].json["stream_options"]["include_usage"] is True


def test_chat_stream_without_usage_option(
    cl: openai.OpenAI, upstream: FakeOpenAI, http: httpx.Client
) -> None:
    chunks = list(cl.chat.completions.create(model="gpt-test", messages=USER_HI, stream=True))
    assert chunks
    assert all(ch.usage is None for ch in chunks)
    assert all(ch.choices for ch in chunks)
    # The gateway still asks its upstream for usage (to account for it) ...
    sent = upstream.requests[-1].json
    assert sent["stream_options"]["include_usage"] is True
    # ... but the client's raw stream carries no usage at all.
    _, data = raw_stream(
        http, "/v1/chat/completions", {"model": "gpt-test", "messages": USER_HI, "stream": True}
    )
    for ev in sse_events(data)[:-1]:
        obj = json.loads(ev)
        assert obj.get("usage") is None
        assert obj["choices"]


def test_chat_stream_tool_calls(c: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    chunks = list(
        c.chat.completions.create(
            model="gpt-test", messages=messages, tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER, stream=True
        )
    )
    seen: set[int] = set()
    fragments = 0
    for ch in chunks:
        for choice in ch.choices:
            for tc in choice.delta.tool_calls or ():
                fragments += 1
                assert tc.index is not None
                if tc.index not in seen:
                    seen.add(tc.index)
                    assert tc.id
                    assert tc.type == "function"
                    assert tc.function is not None and tc.function.name == "get_weather"
                else:
                    assert tc.id is None and tc.type is None
                    assert tc.function is not None and tc.function.name is None
                    assert tc.function.arguments is not None
    assert seen == {0} and fragments >= 2
    finishes = [choice.finish_reason for ch in chunks for choice in ch.choices if choice.finish_reason]
    assert finishes == ["tool_calls"]

    first_id = None
    with c.chat.completions.stream(
        model="gpt-test", messages=messages, tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER
    ) as s:
        for event in s:
            if event.type == "chunk":
                for choice in event.chunk.choices:
                    for tc in choice.delta.tool_calls or ():
                        first_id = first_id or tc.id
        final = s.get_final_completion()
    call = (final.choices[0].message.tool_calls or [])[0]
    assert call.id == first_id  # not duplicated by the accumulator
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.choices[0].message.role == "assistant"


def test_chat_stream_n2(c: openai.OpenAI) -> None:
    chunks = list(c.chat.completions.create(model="gpt-test", messages=USER_HI, n=2, stream=True))
    assert 0 in {choice.index for choice in chunks[0].choices}
    order: list[int] = []
    for ch in chunks:
        for choice in ch.choices:
            if choice.index not in order:
                order.append(choice.index)
    assert order == [0, 1]
    with c.chat.completions.stream(model="gpt-test", messages=USER_HI, n=2) as s:
        final = s.get_final_completion()
    assert len(final.choices) == 2
    for i, choice in enumerate(final.choices):
        assert choice.index == i
        assert choice.message.content
        assert choice.finish_reason == "stop"
        assert choice.message.role == "assistant"


def test_chat_stream_logprobs(c: openai.OpenAI) -> None:
    chunks = list(
        c.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "say some words"}],
            stream=True,
            logprobs=True,
            top_logprobs=1,
        )
    )
    with_content = 0
    for ch in chunks:
        for choice in ch.choices:
            if choice.delta.content:
                with_content += 1
                assert choice.logprobs is not None and choice.logprobs.content
                assert "".join(t.token for t in choice.logprobs.content) == choice.delta.content
                for t in choice.logprobs.content:
                    assert t.logprob <= 0 and len(t.top_logprobs) <= 1
    assert with_content >= 2


def test_chat_stream_mid_stream_error_raises_api_error(c: openai.OpenAI, upstream: FakeOpenAI) -> None:
    # check 25: an error after 200 headers arrives in-band and the SDK raises during iteration
    upstream.error_event_next(1, after_chunks=3)
    stream = c.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "one two three four"}], stream=True
    )
    got: list[str] = []
    with pytest.raises(openai.APIError) as ei:
        for ch in stream:
            got.extend(choice.delta.content or "" for choice in ch.choices)
    assert ei.value.message
    assert got  # content arrived before the failure
    assert not isinstance(ei.value, openai.APIStatusError)


# ------------------------------------------------------------------------------- 26-29: legacy


def test_legacy_completion_strict(c: openai.OpenAI) -> None:
    r = c.completions.create(model="gpt-test", prompt="Say hi", max_tokens=5)
    assert r.object == "text_completion"
    assert r.model == "gpt-test"
    assert isinstance(r.choices[0].text, str) and r.choices[0].text
    assert r.choices[0].finish_reason in {"stop", "length"}
    assert r.usage is not None and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_legacy_prompt_list_and_echo(c: openai.OpenAI) -> None:
    r = c.completions.create(model="gpt-test", prompt=["a", "b"], max_tokens=5)
    assert len(r.choices) == 2
    assert {ch.index for ch in r.choices} == {0, 1}
    e = c.completions.create(model="gpt-test", prompt="Say hi", max_tokens=5, echo=True)
    assert e.choices[0].text.startswith("Say hi")


def test_legacy_logprobs(c: openai.OpenAI) -> None:
    r = c.completions.create(model="gpt-test", prompt="Say hi there", max_tokens=5, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp is not None
    assert lp.tokens and lp.token_logprobs and lp.text_offset and lp.top_logprobs
    n = len(lp.tokens)
    assert len(lp.token_logprobs) == len(lp.text_offset) == len(lp.top_logprobs) == n
    assert all(len(t) <= 2 for t in lp.top_logprobs)


def test_legacy_stream(cl: openai.OpenAI, http: httpx.Client) -> None:
    chunks = list(cl.completions.create(model="gpt-test", prompt="Say hi", max_tokens=5, stream=True))
    assert chunks and {ch.object for ch in chunks} == {"text_completion"}
    assert {ch.model for ch in chunks} == {"gpt-test"}
    finishes = [ch.choices[0].finish_reason for ch in chunks]
    assert all(f is None for f in finishes[:-1])
    assert finishes[-1] in {"stop", "length"}
    assert "".join(ch.choices[0].text for ch in chunks) == "[a] Say hi"

    body = {"model": "gpt-test", "prompt": "Say hi", "max_tokens": 5, "stream": True}
    resp, data = raw_stream(http, "/v1/completions", body)
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    assert all(json.loads(ev).get("usage") is None for ev in events[:-1])

    with_usage = list(
        cl.completions.create(
            model="gpt-test",
            prompt="Say hi",
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert with_usage[-1].choices == []
    assert with_usage[-1].usage is not None and with_usage[-1].usage.prompt_tokens > 0
    assert all(ch.choices and ch.usage is None for ch in with_usage[:-1])


# ----------------------------------------------------------------------------- 30-36: embeddings


def test_embeddings_float_strict(c: openai.OpenAI) -> None:
    r = c.embeddings.create(model="org/embed-test", input="hello", encoding_format="float")
    assert r.object == "list"
    assert r.model == "org/embed-test"
    assert r.data[0].object == "embedding"
    assert r.data[0].index == 0
    vec = r.data[0].embedding
    assert isinstance(vec, list) and len(vec) == EMBED_DIM
    assert all(isinstance(v, float) for v in vec)
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0


# The strict client validates the raw body against ``List[float]`` before the SDK decodes
# base64 (also against api.openai.com), so base64 answers are read with the loose client.


def test_embeddings_sdk_default_base64_equals_float(
    c: openai.OpenAI, cl: openai.OpenAI, upstream: FakeOpenAI
) -> None:
    floats = c.embeddings.create(model="org/embed-test", input="hello", encoding_format="float")
    default = cl.embeddings.create(model="org/embed-test", input="hello")
    assert upstream.requests[-1].json["encoding_format"] == "base64"  # what the SDK sent
    a, b = np.asarray(floats.data[0].embedding), np.asarray(default.data[0].embedding)
    assert a.shape == b.shape == (EMBED_DIM,)
    assert np.max(np.abs(a - b)) < 1e-6


def test_embeddings_explicit_base64(c: openai.OpenAI, cl: openai.OpenAI) -> None:
    floats = c.embeddings.create(model="org/embed-test", input="hello", encoding_format="float")
    r = cl.embeddings.create(model="org/embed-test", input="hello", encoding_format="base64")
    s = r.data[0].embedding
    assert isinstance(s, str)
    raw = base64.b64decode(s, validate=True)
    assert len(raw) == 4 * EMBED_DIM
    decoded = np.frombuffer(raw, "<f4")
    assert np.max(np.abs(decoded - np.asarray(floats.data[0].embedding))) < 1e-6


def test_embeddings_batch_in_order(c: openai.OpenAI) -> None:
    r = c.embeddings.create(model="org/embed-test", input=["a", "b", "c"], encoding_format="float")
    assert [d.index for d in r.data] == [0, 1, 2]
    singles = [c.embeddings.create(model="org/embed-test", input=x, encoding_format="float") for x in "abc"]
    for d, single in zip(r.data, singles, strict=True):
        assert np.allclose(d.embedding, single.data[0].embedding, atol=1e-6)


def test_embeddings_token_inputs(c: openai.OpenAI, cl: openai.OpenAI) -> None:
    one = c.embeddings.create(model="org/embed-test", input=[1, 2, 3], encoding_format="float")
    assert len(one.data) == 1
    two = c.embeddings.create(model="org/embed-test", input=[[1, 2], [3, 4]], encoding_format="float")
    assert [d.index for d in two.data] == [0, 1]
    b64 = cl.embeddings.create(model="org/embed-test", input=[[1, 2], [3, 4]])
    assert len(b64.data) == 2


def test_embeddings_dimensions(c: openai.OpenAI, cl: openai.OpenAI, upstream: FakeOpenAI) -> None:
    r = c.embeddings.create(model="org/embed-test", input="hello", dimensions=8, encoding_format="float")
    assert len(r.data[0].embedding) == 8
    assert upstream.requests[-1].json["dimensions"] == 8
    r64 = cl.embeddings.create(model="org/embed-test", input="hello", dimensions=8)
    assert len(r64.data[0].embedding) == 8
    count = len(upstream.requests)
    with pytest.raises(openai.BadRequestError) as ei:
        c.embeddings.create(model="embed-fixed", input="hello", dimensions=8)
    assert ei.value.param == "dimensions"
    assert_error_envelope(ei.value.response, 400, param="dimensions")
    assert len(upstream.requests) == count


@pytest.mark.parametrize(
    ("bad", "param"),
    [("", "input"), ([], "input"), ([""], "input[0]"), ([[]], "input[0]")],
    ids=["empty-str", "empty-list", "empty-item", "empty-tokens"],
)
def test_embeddings_empty_input_is_400(c: openai.OpenAI, upstream: FakeOpenAI, bad: Any, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        c.embeddings.create(model="org/embed-test", input=bad)
    assert ei.value.param == param
    assert_error_envelope(ei.value.response, 400, param=param, type_="invalid_request_error")
    assert upstream.requests == []


# ---------------------------------------------------------------- public model name vs upstream name


@pytest.fixture
def aliased(make_app: Callable[..., RunningApp], upstream: FakeOpenAI) -> RunningApp:
    return make_app(
        [
            model_entry("public-chat", upstream, upstream_model="gpt-4o-mini"),
            model_entry("acme/public-embed", upstream, upstream_model="text-embedding-3-small"),
        ]
    )


def test_response_model_is_public_name(aliased: RunningApp, upstream: FakeOpenAI) -> None:
    with aliased.strict_client() as c, aliased.client() as cl:
        r = c.chat.completions.create(model="public-chat", messages=USER_HI)
        assert r.model == "public-chat"
        assert upstream.requests[-1].json["model"] == "gpt-4o-mini"

        chunks = list(
            c.chat.completions.create(
                model="public-chat", messages=USER_HI, stream=True, stream_options={"include_usage": True}
            )
        )
        assert {ch.model for ch in chunks} == {"public-chat"}
        assert upstream.requests[-1].json["model"] == "gpt-4o-mini"

        legacy = c.completions.create(model="public-chat", prompt="hi", max_tokens=3)
        assert legacy.model == "public-chat"
        legacy_chunks = list(
            cl.completions.create(model="public-chat", prompt="hi", max_tokens=3, stream=True)
        )
        assert {ch.model for ch in legacy_chunks} == {"public-chat"}
        assert upstream.requests[-1].json["model"] == "gpt-4o-mini"

        emb = cl.embeddings.create(model="acme/public-embed", input="hello")
        assert emb.model == "acme/public-embed"
        assert upstream.requests[-1].json["model"] == "text-embedding-3-small"

        assert [m.id for m in c.models.list().data] == ["public-chat", "acme/public-embed"]


# ------------------------------------------------------------------------------------- x-request-id


def test_request_id_on_every_response_and_unique(
    c: openai.OpenAI, http: httpx.Client, upstream: FakeOpenAI
) -> None:
    ids: list[str] = []

    raw = c.chat.completions.with_raw_response.create(model="gpt-test", messages=USER_HI)
    ids.append(raw.headers["x-request-id"])
    assert raw.parse()._request_id == ids[-1]
    # the gateway's id is the one it sends upstream
    assert upstream.requests[-1].headers["x-request-id"] == ids[-1]

    emb = c.embeddings.with_raw_response.create(model="org/embed-test", input="x", encoding_format="float")
    ids.append(emb.headers["x-request-id"])
    assert emb.parse()._request_id == ids[-1]

    models = c.models.with_raw_response.list()
    ids.append(models.headers["x-request-id"])

    with c.chat.completions.create(model="gpt-test", messages=USER_HI, stream=True) as stream:
        ids.append(stream.response.headers["x-request-id"])
        list(stream)

    for call in (
        lambda: c.chat.completions.create(model="nope", messages=USER_HI),
        lambda: c.chat.completions.create(model="gpt-test", messages=USER_HI, temperature=9),
        lambda: c.post("/nope", cast_to=object, body={}),
    ):
        with pytest.raises(openai.APIStatusError) as ei:
            call()
        assert ei.value.request_id
        assert ei.value.request_id == ei.value.response.headers["x-request-id"]
        ids.append(ei.value.request_id)

    upstream.fail_next(2, 500)  # the gateway fixture retries once, then gives up with a 5xx
    with pytest.raises(openai.InternalServerError) as e5:
        c.chat.completions.create(model="gpt-test", messages=USER_HI)
    assert e5.value.status_code == 502
    assert e5.value.request_id == e5.value.response.headers["x-request-id"]
    ids.append(e5.value.request_id or "")
    assert_error_envelope(e5.value.response, 502)

    for path in ("/health", "/livez", "/openapi.json"):
        ids.append(http.get(path).headers["x-request-id"])
    assert all(ids), ids
    assert len(set(ids)) == len(ids), ids


def test_incoming_request_id_is_echoed_and_forwarded(c: openai.OpenAI, upstream: FakeOpenAI) -> None:
    raw = c.chat.completions.with_raw_response.create(
        model="gpt-test", messages=USER_HI, extra_headers={"x-request-id": "gw-123"}
    )
    assert raw.headers["x-request-id"] == "gw-123"
    assert raw.parse()._request_id == "gw-123"
    assert upstream.requests[-1].headers["x-request-id"] == "gw-123"

    with c.chat.completions.create(
        model="gpt-test", messages=USER_HI, stream=True, extra_headers={"x-request-id": "gw-456"}
    ) as stream:
        assert stream.response.headers["x-request-id"] == "gw-456"
        list(stream)
    assert upstream.requests[-1].headers["x-request-id"] == "gw-456"

    with pytest.raises(openai.NotFoundError) as ei:
        c.chat.completions.create(model="nope", messages=USER_HI, extra_headers={"x-request-id": "gw-789"})
    assert ei.value.request_id == "gw-789"

    # an unusable incoming id (spaces, too long) is replaced by a fresh one
    for bad in ("has spaces in it", "x" * 300):
        raw = c.chat.completions.with_raw_response.create(
            model="gpt-test", messages=USER_HI, extra_headers={"x-request-id": bad}
        )
        rid = raw.headers["x-request-id"]
        assert rid and rid != bad
        assert upstream.requests[-1].headers["x-request-id"] == rid


# ----------------------------------------------------------------------------------- limits, routes


def test_body_over_limit_is_413(make_app: Callable[..., RunningApp], upstream: FakeOpenAI) -> None:
    app = make_app([model_entry("gpt-test", upstream)], server={"max_body_bytes": 2048})
    big = [{"role": "user", "content": "x" * 4000}]
    with app.client() as cl, app.http() as http:
        ok = cl.chat.completions.create(model="gpt-test", messages=USER_HI)
        assert ok.choices[0].message.content == "[a] hi"
        with pytest.raises(openai.APIStatusError) as ei:
            cl.chat.completions.create(model="gpt-test", messages=big)
        assert ei.value.status_code == 413
        assert_error_envelope(ei.value.response, 413, code="request_too_large")

        # no Content-Length (chunked upload): the limit still holds while streaming the body
        payload = json.dumps({"model": "gpt-test", "messages": big}).encode()
        pieces = iter([payload[i : i + 512] for i in range(0, len(payload), 512)])
        resp = http.post("/v1/chat/completions", content=pieces, headers={"content-type": "application/json"})
        assert "content-length" not in resp.request.headers
        assert_error_envelope(resp, 413, code="request_too_large")
    assert len(upstream.requests) == 1


def test_unknown_route_404_envelope(c: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.NotFoundError) as ei:
        c.post("/nope", cast_to=object, body={})
    assert_error_envelope(ei.value.response, 404, type_="invalid_request_error")
    resp = http.post("/v1/chat/completions/chat/completions", json={})
    err = assert_error_envelope(resp, 404, type_="invalid_request_error")
    assert "/v1/chat/completions/chat/completions" in err["message"]
    assert_error_envelope(http.get("/nope"), 404)


def test_wrong_method_405_envelope(http: httpx.Client) -> None:
    assert_error_envelope(http.get("/v1/chat/completions"), 405, type_="invalid_request_error")
    assert_error_envelope(http.delete("/v1/embeddings"), 405)
    assert_error_envelope(http.post("/v1/models", json={}), 405)


def test_openapi_docs_and_health(http: httpx.Client) -> None:
    resp = http.get("/openapi.json")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    doc = resp.json()
    assert doc["openapi"].startswith("3.")
    assert "/v1/chat/completions" in doc["paths"]
    assert "post" in doc["paths"]["/v1/chat/completions"]
    assert "/v1/embeddings" in doc["paths"] and "/v1/models" in doc["paths"]

    docs = http.get("/docs")
    assert docs.status_code == 200
    assert docs.headers["content-type"].startswith("text/html")
    assert "<html" in docs.text.lower()

    health = http.get("/health")
    assert health.status_code == 200
    h = health.json()
    assert h["status"] == "ok"
    assert isinstance(h["dependencies"], dict) and h["dependencies"]
    for path in ("/livez", "/readyz"):
        r = http.get(path)
        assert r.status_code == 200, path
        assert r.json()["status"] == "ok"


def test_sdk_headers_are_accepted(c: openai.OpenAI) -> None:
    r = c.chat.completions.create(
        model="gpt-test",
        messages=USER_HI,
        extra_headers={"OpenAI-Organization": "org-x", "OpenAI-Project": "proj-y", "x-unknown": "1"},
    )
    assert r.choices[0].message.content == "[a] hi"
