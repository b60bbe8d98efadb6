"""The Responses API's translation to and from chat completions, without I/O."""

from __future__ import annotations

import pytest

from tail_service.core import responses as rx
from tail_service.errors import InvalidRequestError


def test_input_items_become_chat_messages() -> None:
    messages, cont = rx.input_messages(
        [
            {"role": "developer", "content": "be terse"},
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "what is in "},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
                ],
            },
            {
                "type": "message",
                "role": "assistant",
                "id": "msg_1",
                "status": "completed",
                "content": [{"type": "output_text", "text": "a cat", "annotations": []}],
            },
            {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": '{"a":1}'},
            {"type": "function_call_output", "call_id": "c1", "output": "one"},
            {
                "type": "function_call_output",
                "call_id": "c2",
                "output": [{"type": "input_text", "text": "two"}],
            },
            {"type": "function_call_output", "call_id": "elsewhere", "output": "for the previous response"},
            {
                "type": "mcp_approval_response",
                "approval_request_id": "mcpr_x",
                "approve": False,
                "reason": "no",
            },
            {"type": "reasoning", "id": "rs_1", "summary": []},
        ]
    )
    assert messages == [
        {"role": "system", "content": "be terse"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is in "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
            ],
        },
        {"role": "assistant", "content": "a cat"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": '{"a":1}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]
    assert cont.outputs == {"elsewhere": "for the previous response"}
    assert cont.approvals == {"mcpr_x": (False, "no")}
    assert rx.input_messages("hi")[0] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ([{"role": "robot", "content": "x"}], "input[0].role"),
        ([{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}], "input[0].content[0].type"),
        ([{"type": "function_call", "name": "f"}], "input[0].call_id"),
        ([{"type": "mcp_approval_response", "approval_request_id": "a"}], "input[0].approve"),
        ([{"type": "item_reference", "id": "nope"}], "input[0].id"),
        ([{"type": "computer_call_output"}], "input[0].type"),
        (42, "input"),
        ([{"role": "user", "content": "x"}] * 10_001, "input"),
    ],
)
def test_bad_items_name_their_param(raw: object, param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        rx.input_messages(raw)
    assert caught.value.param == param


def test_tools_tool_choice_and_text_format() -> None:
    tools = rx.agent_tools(
        [
            {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True},
            {
                "type": "mcp",
                "server_label": "facts",
                "allowed_tools": {"tool_names": ["add"]},
                "require_approval": "never",
            },
            {"type": "builtin", "name": "calculator"},
        ]
    )
    assert tools == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": True}},
        {"type": "mcp", "server": "facts", "allowed_tools": ["add"], "require_approval": "never"},
        {"type": "builtin", "name": "calculator"},
    ]
    for bad, code in (
        ({"type": "mcp", "server_label": "x", "server_url": "http://x"}, "mcp_server_location_not_allowed"),
        ({"type": "web_search"}, "unsupported_tool"),
    ):
        with pytest.raises(InvalidRequestError) as caught:
            rx.agent_tools([bad])
        assert caught.value.code == code
    assert rx.tool_choice({"type": "function", "name": "f"}) == {
        "type": "function",
        "function": {"name": "f"},
    }
    assert rx.tool_choice("required") == "required"
    assert rx.response_format({"format": {"type": "text"}}) is None
    assert rx.response_format({"format": {"type": "json_object"}}) == {"type": "json_object"}
    assert rx.response_format(
        {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}}
    ) == {
        "type": "json_schema",
        "json_schema": {"name": "n", "schema": {"type": "object"}},
    }


def test_message_ids_name_their_response_and_step() -> None:
    item = rx.message_item("resp_abc", 3, "hi")
    assert rx.parse_message_id(item["id"]) == ("resp_abc", 3)
    assert rx.parse_message_id("msg_x") is None and rx.parse_message_id("fc_abc_1") is None
    assert rx.usage(10, 5, cached=4, reasoning=2) == {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 2},
        "total_tokens": 15,
    }
    assert rx.incomplete_details("max_steps", "incomplete") == {"reason": None}
    assert rx.incomplete_details("max_total_tokens", "incomplete") == {"reason": "max_output_tokens"}
    assert rx.error_object({"code": "rate_limit_exceeded", "message": "slow down"}) == {
        "code": "rate_limit_exceeded",
        "message": "slow down",
    }
