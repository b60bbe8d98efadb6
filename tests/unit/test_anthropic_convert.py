"""Pure translation tests for the Anthropic adapter: :mod:`tail_service.providers.anthropic_request`,
:mod:`~tail_service.providers.anthropic_response` and :mod:`~tail_service.providers.anthropic_stream`."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tail_service.errors import ProviderHTTPError, ProviderStreamCut
from tail_service.providers.anthropic_errors import AnthropicRequestError, AnthropicResponseError
from tail_service.providers.anthropic_request import (
    DEFAULT_MAX_TOKENS,
    JSON_INSTRUCTION,
    completion_to_chat_body,
    to_messages_request,
)
from tail_service.providers.anthropic_response import (
    chat_chunk_to_text_chunk,
    chat_to_text_completion,
    from_messages_response,
)
from tail_service.providers.anthropic_stream import StreamTranslator
from tail_service.providers.upstream_http import SSEDecoder
from tests.fakes.anthropic_upstream import stream_events


def req(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return to_messages_request({"model": "pub", "messages": messages, **extra}, "claude-x")


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


# -- requests -------------------------------------------------------------------------


def test_minimal_request_defaults() -> None:
    out = req([user("hi")])
    assert out == {
        "model": "claude-x",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": DEFAULT_MAX_TOKENS,
    }


def test_system_and_developer_hoisted_and_joined() -> None:
    out = req(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
            user("hi"),
            {"role": "system", "content": "Late note."},
        ]
    )
    assert out["system"] == "Be brief.\n\nUse French.\n\nLate note."
    assert [m["role"] for m in out["messages"]] == ["user"]


def test_multipart_user_and_images() -> None:
    parts = [
        {"type": "text", "text": "What is in"},
        {"type": "text", "text": ""},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    out = req([{"role": "user", "content": parts}])
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "What is in"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


@pytest.mark.parametrize("url", ["data:image/png,notbase64", "ftp://x/y.png", "data:;base64,AAAA"])
def test_bad_image_urls_rejected(url: str) -> None:
    with pytest.raises(AnthropicRequestError) as info:
        req([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
    assert info.value.param == "messages[0].content[0]"


def test_unsupported_part_rejected() -> None:
    part = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    with pytest.raises(AnthropicRequestError, match="input_audio"):
        req([{"role": "user", "content": [part]}])


def test_tool_round_trip_and_turn_merging() -> None:
    messages = [
        user("weather in Paris and Tokyo?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {"id": "call.2", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call.2", "content": [{"type": "text", "text": "25C"}]},
        user("thanks"),
        user("and tomorrow?"),
    ]
    out = req(messages)
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    assert out["messages"][1]["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}},
    ]
    assert out["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
        {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "25C"}]},
        {"type": "text", "text": "thanks"},
        {"type": "text", "text": "and tomorrow?"},
    ]


def test_assistant_text_with_tool_calls_keeps_both() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    out = req([user("x"), {"role": "assistant", "content": "Checking.", "tool_calls": [call]}])
    assert out["messages"][1]["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "c", "name": "f", "input": {}},
    ]


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]"])
def test_invalid_tool_arguments_rejected(arguments: str) -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    with pytest.raises(AnthropicRequestError, match="arguments") as info:
        req([user("x"), {"role": "assistant", "tool_calls": [call]}])
    assert info.value.param == "messages[1].tool_calls[0]"


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "noop"}},
]


def test_tools_mapping() -> None:
    out = req([user("x")], tools=TOOLS)
    assert out["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
        {"name": "noop", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in out


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        ({"type": "function", "function": {"name": "noop"}}, None, {"type": "tool", "name": "noop"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
        (None, True, None),
    ],
)
def test_tool_choice_variants(choice: Any, parallel: Any, expected: Any) -> None:
    out = req([user("x")], tools=TOOLS, tool_choice=choice, parallel_tool_calls=parallel)
    assert out.get("tool_choice") == expected


def test_bad_tool_choice_and_tool_types() -> None:
    with pytest.raises(AnthropicRequestError, match="tool_choice"):
        req([user("x")], tools=TOOLS, tool_choice={"type": "allowed_tools"})
    with pytest.raises(AnthropicRequestError, match="function tools"):
        req([user("x")], tools=[{"type": "custom", "custom": {"name": "x"}}])


def test_sampling_limits_stop_user_stream() -> None:
    out = req(
        [user("x")],
        max_tokens=100,
        max_completion_tokens=50,
        temperature=1.7,
        top_p=0.9,
        stop="END",
        user="u-42",
        stream=True,
        frequency_penalty=1.0,
        logit_bias={"1": 2},
        seed=3,
    )
    assert out["max_tokens"] == 50
    assert out["temperature"] == 1.0
    assert out["top_p"] == 0.9
    assert out["stop_sequences"] == ["END"]
    assert out["metadata"] == {"user_id": "u-42"}
    assert out["stream"] is True
    assert not {"frequency_penalty", "logit_bias", "seed"} & out.keys()
    assert req([user("x")], stop=["a", "b"], max_tokens=7)["stop_sequences"] == ["a", "b"]
    assert req([user("x")], stop=["a", "b"], max_tokens=7)["max_tokens"] == 7
    assert req([user("x")], temperature=0.3)["temperature"] == 0.3


def test_response_format_adds_instruction() -> None:
    out = req([{"role": "system", "content": "S"}, user("x")], response_format={"type": "json_object"})
    assert out["system"] == "S\n\n" + JSON_INSTRUCTION
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    out = req([user("x")], response_format=fmt)
    assert (
        out["system"].startswith(JSON_INSTRUCTION)
        and json.dumps(schema, separators=(",", ":")) in out["system"]
    )
    assert "system" not in req([user("x")], response_format={"type": "text"})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"n": 2}, "n>1 is not supported by anthropic deployments"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "only system"}]}, "messages"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "role"),
    ],
)
def test_invalid_requests(extra: dict[str, Any], message: str) -> None:
    body = {"model": "pub", "messages": [user("x")], **extra}
    with pytest.raises(AnthropicRequestError, match=message.replace(">", ".")):
        to_messages_request(body, "claude-x")


# -- responses ------------------------------------------------------------------------


def test_text_response() -> None:
    resp = {
        "id": "msg_01ABC",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " world"}],
        "stop_reason": "end_turn",
        "usage": {
            "input_tokens": 10,
            "output_tokens": 3,
            "cache_read_input_tokens": 4,
            "cache_creation_input_tokens": 2,
        },
    }
    out = from_messages_response(resp, "public", created=123)
    assert out == {
        "id": "chatcmpl-01ABC",
        "object": "chat.completion",
        "created": 123,
        "model": "public",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello world", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 16,
            "completion_tokens": 3,
            "total_tokens": 19,
            "prompt_tokens_details": {"cached_tokens": 4},
        },
    }


def test_tool_use_response() -> None:
    resp = {
        "id": "msg_1",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 1, "output_tokens": 2},
    }
    choice = from_messages_response(resp, "m")["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {
            "id": "toolu_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        }
    ]


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        (None, "stop"),
    ],
)
def test_stop_reasons(reason: str | None, finish: str) -> None:
    resp: dict[str, Any] = {"id": "msg_1", "content": [], "stop_reason": reason, "usage": {}}
    out = from_messages_response(resp, "m")
    assert out["choices"][0]["finish_reason"] == finish
    assert out["choices"][0]["message"]["content"] == ""


def test_malformed_response() -> None:
    with pytest.raises(AnthropicResponseError):
        from_messages_response({"type": "error", "error": {}}, "m")
    with pytest.raises(AnthropicResponseError):
        from_messages_response({"content": [{"type": "tool_use", "input": {}}]}, "m")


# -- streams --------------------------------------------------------------------------


def translate(events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    t = StreamTranslator("public", created=7)
    out = [chunk for name, data in events for chunk in t.feed(name, data)]
    return out + t.finish()


def message(content: list[dict[str, Any]], stop_reason: str) -> dict[str, Any]:
    usage = {
        "input_tokens": 12,
        "output_tokens": 9,
        "cache_read_input_tokens": 3,
        "cache_creation_input_tokens": 0,
    }
    return {
        "id": "msg_S1",
        "model": "claude",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }


def test_stream_text() -> None:
    chunks = translate(stream_events(message([{"type": "text", "text": "Hi there you"}], "end_turn")))
    assert {(c["id"], c["created"], c["model"], c["object"]) for c in chunks} == {
        ("chatcmpl-S1", 7, "public", "chat.completion.chunk")
    }
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert sum("role" in d for d in deltas) == 1
    assert "".join(d.get("content", "") for d in deltas) == "Hi there you"
    assert deltas[-1] == {}
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(deltas) - 1) + ["stop"]
    assert all(c["choices"][0]["logprobs"] is None and c["choices"][0]["index"] == 0 for c in chunks[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": 15,
        "completion_tokens": 9,
        "total_tokens": 24,
        "prompt_tokens_details": {"cached_tokens": 3},
    }
    assert all("usage" not in c for c in chunks[:-1])


def test_stream_two_parallel_tool_calls() -> None:
    content: list[dict[str, Any]] = [
        {"type": "text", "text": "Checking both."},
        {
            "type": "tool_use",
            "id": "toolu_a",
            "name": "get_weather",
            "input": {"city": "Paris", "unit": "celsius"},
        },
        {"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {"tz": "Asia/Tokyo"}},
    ]
    chunks = translate(stream_events(message(content, "tool_use")))
    calls = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    firsts = [tc for tc in calls if "id" in tc]
    assert firsts == [
        {
            "index": 0,
            "id": "toolu_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        },
        {"index": 1, "id": "toolu_b", "type": "function", "function": {"name": "get_time", "arguments": ""}},
    ]
    rest = [tc for tc in calls if "id" not in tc]
    assert all(set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"} for tc in rest)
    assert len([tc for tc in rest if tc["index"] == 0]) > 2  # streamed in several fragments
    for k, block in enumerate(content[1:]):
        args = "".join(tc["function"]["arguments"] for tc in calls if tc["index"] == k)
        assert json.loads(args) == block["input"]
    assert chunks[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "tool_calls",
    }
    assert chunks[-1]["choices"] == []


def test_stream_tool_without_input_gets_empty_object() -> None:
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"message": {"id": "msg_x", "usage": {"input_tokens": 1}}}),
        (
            "content_block_start",
            {"index": 0, "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}},
        ),
        ("content_block_delta", {"index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}}),
        ("content_block_stop", {"index": 0}),
        ("message_delta", {"delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 4}}),
        ("message_stop", {}),
    ]
    chunks = translate(events)
    args = [
        tc["function"]["arguments"]
        for c in chunks
        if c["choices"]
        for tc in c["choices"][0]["delta"].get("tool_calls", [])
    ]
    assert "".join(args) == "{}"
    assert chunks[-1]["usage"]["completion_tokens"] == 4


def test_stream_usage_is_cumulative_and_unknown_events_ignored() -> None:
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"message": {"id": "msg_x", "usage": {"input_tokens": 5, "output_tokens": 1}}}),
        ("ping", {}),
        ("content_block_start", {"index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
        ("content_block_delta", {"index": 0, "delta": {"type": "thinking_delta", "thinking": "hm"}}),
        ("some_future_event", {}),
        ("message_delta", {"delta": {"stop_reason": None}, "usage": {"output_tokens": 3}}),
        (
            "message_delta",
            {"delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 8, "input_tokens": 6}},
        ),
        ("message_stop", {}),
        ("content_block_start", {"index": 1, "content_block": {"type": "text", "text": "late"}}),
    ]
    chunks = translate(events)
    assert len(chunks) == 3  # role, finish, usage
    assert chunks[1]["choices"][0]["finish_reason"] == "length"
    assert chunks[2]["usage"]["prompt_tokens"] == 6 and chunks[2]["usage"]["completion_tokens"] == 8


def test_stream_without_message_stop_is_cut() -> None:
    t = StreamTranslator("m")
    for name, data in stream_events(message([{"type": "text", "text": "a b"}], "end_turn"))[:-1]:
        t.feed(name, data)
    with pytest.raises(ProviderStreamCut):
        t.finish()


@pytest.mark.parametrize(
    ("kind", "status"), [("overloaded_error", 503), ("rate_limit_error", 429), ("invalid_request_error", 400)]
)
def test_stream_error_event(kind: str, status: int) -> None:
    t = StreamTranslator("m")
    t.feed("message_start", {"message": {"id": "msg_1"}})
    with pytest.raises(ProviderHTTPError) as info:
        t.feed("error", {"type": "error", "error": {"type": kind, "message": "Overloaded"}})
    assert info.value.status == status and info.value.message == "Overloaded"
    assert info.value.retryable is (status != 400)


def test_stream_content_before_start_is_protocol_error() -> None:
    with pytest.raises(AnthropicResponseError):
        StreamTranslator("m").feed(
            "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "x"}}
        )


# -- legacy completions ---------------------------------------------------------------


def test_completion_mapping() -> None:
    chat_body = completion_to_chat_body({"model": "m", "prompt": "Say hi", "logprobs": 2, "temperature": 0.5})
    assert chat_body == {"model": "m", "temperature": 0.5, "messages": [user("Say hi")], "max_tokens": 16}
    for bad in ({"prompt": ["a", "b"]}, {"prompt": "x", "echo": True}, {"prompt": "x", "best_of": 3}):
        with pytest.raises(AnthropicRequestError):
            completion_to_chat_body({"model": "m", **bad})
    chat = from_messages_response(message([{"type": "text", "text": "hi"}], "max_tokens"), "pub", created=5)
    text = chat_to_text_completion(chat)
    assert text["object"] == "text_completion" and text["id"] == "cmpl-S1"
    assert text["choices"] == [{"text": "hi", "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert text["usage"] == chat["usage"]


def test_completion_chunks() -> None:
    chunks = translate(stream_events(message([{"type": "text", "text": "a b"}], "end_turn")))
    out = [c for c in map(chat_chunk_to_text_chunk, chunks) if c is not None]
    assert all(c["object"] == "text_completion" and c["id"] == "cmpl-S1" for c in out)
    assert [c["choices"][0]["text"] for c in out[:-1]] == ["a", " b", ""]
    assert out[-2]["choices"][0]["finish_reason"] == "stop"
    assert out[-1]["choices"] == [] and out[-1]["usage"]["completion_tokens"] == 9


# -- SSE decoding ---------------------------------------------------------------------


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
def test_sse_decoder_line_endings_split_reads(eol: str) -> None:
    text = f': hello{eol}event: a{eol}data: {{"x":{eol}data: 1}}{eol}{eol}'
    text += f"data: plain{eol}id: 3{eol}{eol}event: c{eol}data: tail"
    raw = text.encode()
    for size in (1, 2, 5, len(raw)):
        d = SSEDecoder()
        events = [e for i in range(0, len(raw), size) for e in d.feed(raw[i : i + size])] + d.close()
        assert events == [("a", '{"x":\n1}'), ("message", "plain")]


def test_sse_decoder_trailing_cr_flushed_on_close() -> None:
    d = SSEDecoder()
    assert d.feed(b"data: z\r\r") == []  # the last CR might start a CRLF
    assert d.close() == [("message", "z")]
