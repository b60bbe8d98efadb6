"""The agent loop's rules without I/O: limits, the tool catalogue, approvals, the model-call
body, and the bounds on what a request's tools may make the server do."""

from __future__ import annotations

import pytest

from tail_service.core.agent import (
    CatalogError,
    Limits,
    build_catalog,
    model_body,
    needs_approval,
    resolve_limits,
)
from tail_service.core.tools import (
    MAX_SCHEMA_BYTES,
    ToolError,
    ToolSpec,
    check_schema,
    cut_text,
    parse_arguments,
)
from tail_service.errors import InvalidRequestError

POLICY = {
    "max_steps": (10, 100),
    "max_tool_calls": (32, 512),
    "max_time_s": (600, 3600),
    "max_total_tokens": (1000, 5000),
}


def test_limits_default_and_cap() -> None:
    limits = resolve_limits({"max_steps": 3, "max_tool_calls": None}, POLICY)
    assert limits == Limits(3, 32, 600, 1000)
    assert Limits.from_dict(limits.to_dict()) == limits
    with pytest.raises(InvalidRequestError) as caught:
        resolve_limits({"max_total_tokens": 5001}, POLICY)
    assert caught.value.param == "max_total_tokens" and "5000" in caught.value.message


def test_approval_policies() -> None:
    assert needs_approval("always", "x") and not needs_approval("never", "x")
    policy = {"never": {"tool_names": ["read"]}, "always": {"tool_names": ["write"]}}
    assert not needs_approval(policy, "read")
    assert needs_approval(policy, "write") and needs_approval(policy, "other")  # unlisted: ask


def test_catalog_keeps_request_order_filters_mcp_tools_and_refuses_duplicates() -> None:
    builtins = {"calculator": ToolSpec("calculator", "math")}
    listed = {"facts": [ToolSpec("add", "a"), ToolSpec("lookup", "l"), ToolSpec("secret", "s")]}
    requested = [
        {"type": "function", "function": {"name": "get_weather"}},
        {
            "type": "mcp",
            "server": "facts",
            "allowed_tools": ["add", "lookup"],
            "require_approval": {"never": {"tool_names": ["lookup"]}},
        },
        {"type": "builtin", "name": "calculator"},
    ]
    catalog = build_catalog(requested, builtins, listed, max_tools=10)
    assert [(t.name, t.kind, t.server, t.approval) for t in catalog] == [
        ("get_weather", "function", None, False),
        ("add", "mcp", "facts", True),
        ("lookup", "mcp", "facts", False),
        ("calculator", "builtin", None, False),
    ]
    clash = [{"type": "function", "function": {"name": "add"}}, {"type": "mcp", "server": "facts"}]
    with pytest.raises(CatalogError, match="Two tools are named 'add'"):
        build_catalog(clash, builtins, listed, max_tools=10)
    with pytest.raises(CatalogError, match="at most 2"):
        build_catalog([{"type": "mcp", "server": "facts"}], builtins, listed, max_tools=2)


def test_model_body_caps_the_completion_to_the_tokens_left_and_forces_a_tool_once() -> None:
    catalog = build_catalog(
        [{"type": "builtin", "name": "calculator"}], {"calculator": ToolSpec("calculator", "m")}, {}, 5
    )
    request = {"sampling": {"temperature": 0, "max_tokens": 500}, "tool_choice": "required"}
    msgs = [{"role": "user", "content": "hi"}]
    first = model_body(request, "m", msgs, catalog, first_call=True, tokens_left=100, default_max_tokens=1024)
    assert first["tool_choice"] == "required" and first["stream"] is True
    assert first["stream_options"] == {"include_usage": True}
    assert first["max_completion_tokens"] == 100 and "max_tokens" not in first
    later = model_body(
        request, "m", msgs, catalog, first_call=False, tokens_left=10_000, default_max_tokens=1024
    )
    assert "tool_choice" not in later and later["max_tokens"] == 500
    plain = model_body(
        {"sampling": {}}, "m", msgs, [], first_call=True, tokens_left=10_000, default_max_tokens=1024
    )
    assert "max_completion_tokens" not in plain and "tools" not in plain


def test_arguments_and_schemas_are_bounded() -> None:
    with pytest.raises(ValueError, match="at most"):
        check_schema({"type": "object", "description": "x" * MAX_SCHEMA_BYTES})
    with pytest.raises(ToolError, match="cannot be applied"):
        parse_arguments({"$ref": "https://example.invalid/schema.json"}, '{"a": 1}')
    with pytest.raises(ToolError, match="JSON object"):
        parse_arguments({"type": "object"}, "[1]")
    assert cut_text("abc", 3) == "abc"
    assert cut_text("é" * 4, 3) == "é\n[output truncated: 6 bytes omitted]"
