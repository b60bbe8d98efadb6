"""``/v1/responses`` with the official SDK (strict response validation), against a gateway,
a real worker, a scripted fake model upstream and a real MCP server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.agent.scripted import agent_script
from tests.batch.fixtures import run_worker
from tests.conftest import RunningApp, model_entry
from tests.fakes.mcp_server import RunningMcpServer
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture
def mcp() -> Iterator[RunningMcpServer]:
    with RunningMcpServer() as server:
        yield server


@pytest.fixture
def app(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI, mcp: RunningMcpServer
) -> Iterator[RunningApp]:
    upstream.script = agent_script
    running = make_app([model_entry("gpt-test", upstream)], mcp_servers=[{"name": "facts", "url": mcp.url}])
    with run_worker(running.settings):
        yield running


def chat_bodies(upstream: FakeOpenAI) -> list[dict[str, Any]]:
    return [r.json for r in upstream.requests if r.path == "/v1/chat/completions"]


def test_text_response_retrieve_input_items_and_delete(app: RunningApp, upstream: FakeOpenAI) -> None:
    client = app.strict_client()
    resp = client.responses.create(
        model="gpt-test", input="hello there", instructions="Be brief.", metadata={"k": "v"}
    )
    assert resp.id.startswith("resp_") and resp.object == "response"
    assert resp.status == "completed" and resp.error is None
    assert resp.output_text == "Answer: hello there"
    assert resp.instructions == "Be brief." and resp.metadata == {"k": "v"}
    assert resp.text is not None and resp.text.format.type == "text"
    assert resp.usage is not None and resp.usage.input_tokens > 0 and resp.usage.output_tokens > 0
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    [body] = chat_bodies(upstream)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
    ]
    again = client.responses.retrieve(resp.id)
    assert again.model_dump() == resp.model_dump()
    items = client.responses.input_items.list(resp.id)
    assert [(i.type, i.role) for i in items.data] == [("message", "user")]  # type: ignore[union-attr]
    deleted = client.responses.delete(resp.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)


def test_json_schema_format_reaches_the_upstream_as_response_format(
    app: RunningApp, upstream: FakeOpenAI
) -> None:
    client = app.strict_client()
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    resp = client.responses.create(
        model="gpt-test",
        input="json please",
        text={"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}},
        max_output_tokens=50,
        temperature=0.5,
    )
    assert resp.status == "completed"
    [body] = chat_bodies(upstream)
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "thing", "schema": schema, "strict": True},
    }
    assert body["max_completion_tokens"] == 50 and body["temperature"] == 0.5
    assert resp.text is not None and resp.text.format.type == "json_schema"


def test_function_call_then_previous_response_id_with_its_output(
    app: RunningApp, upstream: FakeOpenAI
) -> None:
    client = app.strict_client()
    first = client.responses.create(
        model="gpt-test", input='CALL get_weather {"city": "Paris"}', tools=[WEATHER]
    )  # type: ignore[list-item]
    assert first.status == "completed"
    [call] = [o for o in first.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.arguments == '{"city": "Paris"}' and call.call_id
    second = client.responses.create(
        model="gpt-test",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=[WEATHER],  # type: ignore[list-item]
    )
    assert second.status == "completed" and second.previous_response_id == first.id
    assert second.output_text == "Answer: sunny"
    last = chat_bodies(upstream)[-1]
    assert [m["role"] for m in last["messages"]] == ["user", "assistant", "tool"]
    assert last["messages"][1]["tool_calls"][0]["id"] == call.call_id
    assert last["messages"][2] == {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}
    # a third turn carries the whole conversation
    third = client.responses.create(model="gpt-test", previous_response_id=second.id, input="thanks")
    assert [m["role"] for m in chat_bodies(upstream)[-1]["messages"]] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
    ]
    assert third.status == "completed"


def test_stateless_history_with_function_call_items(app: RunningApp, upstream: FakeOpenAI) -> None:
    client = app.strict_client()
    resp = client.responses.create(
        model="gpt-test",
        input=[
            {"role": "user", "content": 'CALL get_weather {"city": "Oslo"}'},
            {
                "type": "function_call",
                "call_id": "call_x",
                "name": "get_weather",
                "arguments": '{"city": "Oslo"}',
            },
            {"type": "function_call_output", "call_id": "call_x", "output": "snow"},
        ],
        tools=[WEATHER],  # type: ignore[list-item]
    )
    assert resp.output_text == "Answer: snow"


def test_stream_events_in_order_to_completed(app: RunningApp) -> None:
    client = app.strict_client()
    with client.responses.stream(
        model="gpt-test", input='CALL get_weather {"city": "Rome"}', tools=[WEATHER]
    ) as stream:  # type: ignore[list-item]
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ], kinds
    [call] = [o for o in final.output if o.type == "function_call"]
    with client.responses.stream(
        model="gpt-test",
        previous_response_id=final.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "warm"}],
    ) as stream:
        second = list(stream)
        done = stream.get_final_response()
    text = "".join(e.delta for e in second if e.type == "response.output_text.delta")
    assert text == "Answer: warm" == done.output_text
    assert [e.type for e in second if not e.type.endswith(".delta")] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]


def test_mcp_tool_with_approval_through_responses(app: RunningApp, mcp: RunningMcpServer) -> None:
    client = app.strict_client()
    tool = {
        "type": "mcp",
        "server_label": "facts",
        "require_approval": "always",
        "server_description": "facts",
    }
    first = client.responses.create(model="gpt-test", input='CALL add {"a": 2, "b": 40}', tools=[tool])  # type: ignore[list-item]
    kinds = [o.type for o in first.output]
    assert kinds == ["mcp_list_tools", "mcp_approval_request"], kinds
    request = first.output[1]
    assert request.type == "mcp_approval_request" and request.name == "add"
    assert mcp.counts() == {}
    second = client.responses.create(
        model="gpt-test",
        previous_response_id=first.id,
        input=[{"type": "mcp_approval_response", "approval_request_id": request.id, "approve": True}],
        tools=[tool],  # type: ignore[list-item]
    )
    assert second.status == "completed", second
    calls = [o for o in second.output if o.type == "mcp_call"]
    assert len(calls) == 1 and calls[0].output == "42" and calls[0].approval_request_id == request.id
    assert second.output_text == "Answer: 42"
    assert mcp.counts() == {"add": 1}


def test_refusals(app: RunningApp) -> None:
    with httpx.Client(base_url=app.base_url, timeout=30) as http:
        for tool, param in (
            (
                {"type": "mcp", "server_label": "facts", "server_url": "http://169.254.169.254/"},
                "tools[0].server_url",
            ),
            ({"type": "web_search"}, "tools[0].type"),
        ):
            r = http.post("/v1/responses", json={"model": "gpt-test", "input": "hi", "tools": [tool]})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        r = http.post(
            "/v1/responses", json={"model": "gpt-test", "input": "hi", "previous_response_id": "resp_nope"}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
        assert http.post("/v1/responses", json={"model": "gpt-test"}).status_code == 400
        # a huge history is refused before any work (item lookups, translation)
        refs = [{"type": "item_reference", "id": f"msg_x_{i}"} for i in range(10_001)]
        r = http.post("/v1/responses", json={"model": "gpt-test", "input": refs})
        assert r.status_code == 400 and r.json()["error"]["code"] == "array_above_max_length", r.text
        assert http.get("/v1/responses/resp_nope").status_code == 404


def test_item_references_and_unknown_fields_pass_through(app: RunningApp, upstream: FakeOpenAI) -> None:
    """The Vercel AI SDK sends an earlier answer back as an ``item_reference``; other
    clients' vendor fields go on to the model as on the other endpoints."""
    client = app.strict_client()
    first = client.responses.create(model="gpt-test", input="first question")
    [message] = [o for o in first.output if o.type == "message"]
    with httpx.Client(base_url=app.base_url, timeout=30) as http:
        body = {
            "model": "gpt-test",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "first question"}]},
                {"type": "item_reference", "id": message.id},
                {"role": "user", "content": "second question"},
            ],
            "seed": 7,
        }
        r = http.post("/v1/responses", json=body)
        assert r.status_code == 200, r.text
        sent = chat_bodies(upstream)[-1]
        assert sent["seed"] == 7
        assert sent["messages"] == [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "Answer: first question"},
            {"role": "user", "content": "second question"},
        ]
        body["input"][1]["id"] = "msg_nope_1"  # type: ignore[index]
        r = http.post("/v1/responses", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "input[1].id", r.text


def test_a_stored_response_replays_its_stream(app: RunningApp) -> None:
    client = app.strict_client()
    with client.responses.stream(model="gpt-test", input="replay me") as stream:
        live = [e.type for e in stream]
        final = stream.get_final_response()
    with httpx.Client(base_url=app.base_url, timeout=30) as http:
        r = http.get(f"/v1/responses/{final.id}", params={"stream": "true"})
    assert r.headers["content-type"].startswith("text/event-stream")
    replayed = [line[len("event: ") :] for line in r.text.splitlines() if line.startswith("event: ")]
    assert replayed == live and live[-1] == "response.completed"
    # a client that lost the stream after event N picks it up there (the SDK's way)
    with client.responses.stream(response_id=final.id, starting_after=3) as resumed:
        rest = list(resumed)
        assert resumed.get_final_response().output_text == final.output_text
    assert [e.sequence_number for e in rest] == list(range(4, len(live)))
    assert [e.type for e in rest] == live[4:]
    with httpx.Client(base_url=app.base_url, timeout=30) as http:
        for bad in ("x", "-5", "1.5"):
            r = http.get(f"/v1/responses/{final.id}", params={"stream": "true", "starting_after": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "starting_after", r.text
