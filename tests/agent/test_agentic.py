"""``/v1/agentic`` end to end: a gateway, a real worker process (DBOS on SQLite), a scripted
fake model upstream, and a real MCP server (the ``mcp`` SDK) on loopback."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from tail_service.proto import auth_pb2
from tail_service.redis_embedded import EmbeddedRedis
from tests.agent.scripted import agent_script, sse_events, wait_run
from tests.batch.fixtures import run_worker
from tests.conftest import RunningApp, model_entry, serve_app
from tests.fakes._sse import chat_usage
from tests.fakes.mcp_server import RunningMcpServer
from tests.fakes.openai_upstream import FakeOpenAI
from tests.processes import Running
from tests.stack_fixtures import Stack

pytestmark = pytest.mark.slow

MCP = {"type": "mcp", "server": "facts", "require_approval": "never"}
CALC = {"type": "builtin", "name": "calculator"}


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mcp"


@dataclass
class Agents:
    app: RunningApp
    upstream: FakeOpenAI
    mcp: RunningMcpServer
    worker: Running

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.app.base_url, timeout=60)

    def run(self, http: httpx.Client, script: str, tools: list[Any], **body: Any) -> dict[str, Any]:
        r = http.post("/v1/agentic", json={"model": "gpt-test", "input": script, "tools": tools, **body})
        assert r.status_code == 200, r.text
        run: dict[str, Any] = r.json()
        return run

    def chat_bodies(self) -> list[dict[str, Any]]:
        return [r.json for r in self.upstream.requests if r.path == "/v1/chat/completions"]


@pytest.fixture
def mcp() -> Iterator[RunningMcpServer]:
    with RunningMcpServer() as server:
        yield server


@pytest.fixture
def agents(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI, mcp: RunningMcpServer
) -> Iterator[Agents]:
    upstream.script = agent_script
    servers = [{"name": "facts", "url": mcp.url}, {"name": "down", "url": dead_url()}]
    app = make_app([model_entry("gpt-test", upstream)], mcp_servers=servers, agent={"tool_timeout": 5})
    with run_worker(app.settings) as worker:
        yield Agents(app, upstream, mcp, worker)


def test_mcp_and_builtin_tools_flow_back_and_steps_and_usage_are_exact(agents: Agents) -> None:
    script = 'CALL lookup {"city": "Paris"} | calculator {"expression": "6*7"}\nCALL add {"a": 2, "b": 3}'
    # one call of the official SDK, as a new user would make it
    client = agents.app.client()
    run: dict[str, Any] = client.post(
        "/agentic",
        cast_to=object,
        body={"model": "gpt-test", "input": script, "tools": [MCP, CALC], "metadata": {"who": "test"}},
    )
    assert run["object"] == "agentic.run" and run["id"].startswith("run_")
    assert run["status"] == "completed", run
    assert run["output"] == {"role": "assistant", "content": "Answer: Paris has 2100000 inhabitants ; 42 ; 5"}
    assert run["output_text"] == run["output"]["content"]
    assert run["metadata"] == {"who": "test"} and run["error"] is None and run["required_action"] is None
    steps = run["steps"]
    assert [(s["type"], s.get("name")) for s in steps] == [
        ("model_call", None),
        ("tool_call", "lookup"),
        ("tool_call", "calculator"),
        ("model_call", None),
        ("tool_call", "add"),
        ("model_call", None),
    ]
    assert [s["index"] for s in steps] == list(range(6))
    assert all(s["status"] == "completed" for s in steps)
    assert [s["output"] for s in steps if s["type"] == "tool_call"] == [
        "Paris has 2100000 inhabitants",
        "42",
        "5",
    ]
    assert [(s["tool"], s["server"]) for s in steps if s["type"] == "tool_call"] == [
        ("mcp", "facts"),
        ("builtin", None),
        ("mcp", "facts"),
    ]
    for s in steps:
        assert s["completed_at"] >= s["started_at"] and s["duration_ms"] >= 0
    # usage: each step's is what the upstream reported for that call; the run's is their sum
    bodies = agents.chat_bodies()
    assert len(bodies) == 3 and all(b["stream"] is True for b in bodies)
    reported = [chat_usage(b, agent_script(b)) for b in bodies]
    model_steps = [s for s in steps if s["type"] == "model_call"]
    assert [s["usage"] for s in model_steps] == reported
    assert run["usage"] == {
        k: sum(u[k] for u in reported) for k in ("prompt_tokens", "completion_tokens", "total_tokens")
    }
    assert (run["model_calls"], run["tool_calls"]) == (3, 3)
    # the model saw the tools, then the results of its calls, in its order
    assert {t["function"]["name"] for t in bodies[0]["tools"]} == {
        "add",
        "lookup",
        "slow",
        "fail",
        "big",
        "calculator",
    }
    assert [m["content"] for m in bodies[1]["messages"] if m["role"] == "tool"] == [
        "Paris has 2100000 inhabitants",
        "42",
    ]
    assert agents.mcp.counts() == {"lookup": 1, "add": 1}
    with agents.http() as http:
        again = http.get(f"/v1/agentic/{run['id']}").json()
    assert again == run


def test_client_function_tool_pauses_and_submit_continues(agents: Agents) -> None:
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    with agents.http() as http:
        run = agents.run(
            http, 'CALL get_weather {"city": "Oslo"} | calculator {"expression": "1+1"}', [weather, CALC]
        )
        assert run["status"] == "requires_action"
        action = run["required_action"]
        assert action["type"] == "submit" and action["approvals"] == []
        assert action["tool_calls"] == [
            {
                "id": "call_0_0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            }
        ]
        # the server-side call of the same round already ran
        calc = next(s for s in run["steps"] if s.get("name") == "calculator")
        assert calc["status"] == "completed" and calc["output"] == "2"
        bad = [
            ({"tool_outputs": [{"tool_call_id": "nope", "output": "x"}]}, "tool_outputs[0].tool_call_id"),
            ({"tool_outputs": []}, "tool_outputs"),
            ({"tool_outputs": [{"tool_call_id": "call_0_0"}]}, "tool_outputs[0].output"),
            ({"approvals": [{"tool_call_id": "call_0_0", "approve": True}]}, "approvals[0].tool_call_id"),
        ]
        for body, param in bad:
            r = http.post(f"/v1/agentic/{run['id']}/submit", json=body)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == param
        r = http.post(
            f"/v1/agentic/{run['id']}/submit",
            json={"tool_outputs": [{"tool_call_id": "call_0_0", "output": "sunny"}]},
        )
        assert r.status_code == 200, r.text
        done = r.json()
        assert done["status"] == "completed", done
        assert done["output_text"] == "Answer: sunny ; 2"
        # a run that no longer waits takes no submission
        r = http.post(
            f"/v1/agentic/{run['id']}/submit",
            json={"tool_outputs": [{"tool_call_id": "call_0_0", "output": "x"}]},
        )
        assert r.status_code == 409 and r.json()["error"]["code"] == "run_not_waiting"


def test_approval_always_pauses_and_a_denial_reaches_the_model(agents: Agents) -> None:
    strict = {"type": "mcp", "server": "facts", "require_approval": "always"}
    with agents.http() as http:
        run = agents.run(http, 'CALL add {"a": 1, "b": 1}\nCALL add {"a": 2, "b": 2}', [strict])
        assert run["status"] == "requires_action"
        assert run["required_action"]["approvals"] == [
            {"tool_call_id": "call_0_0", "server": "facts", "name": "add", "arguments": '{"a": 1, "b": 1}'}
        ]
        assert agents.mcp.counts() == {}  # nothing ran before the approval
        r = http.post(
            f"/v1/agentic/{run['id']}/submit",
            json={"approvals": [{"tool_call_id": "call_0_0", "approve": False, "reason": "not today"}]},
        )
        second = r.json()
        assert second["status"] == "requires_action", second
        r = http.post(
            f"/v1/agentic/{run['id']}/submit",
            json={"approvals": [{"tool_call_id": "call_1_0", "approve": True}]},
        )
        done = r.json()
    assert done["status"] == "completed", done
    assert done["output_text"] == "Answer: Error: The user denied this tool call: not today ; 4"
    assert agents.mcp.counts() == {"add": 1}
    denied = next(s for s in done["steps"] if s.get("tool_call_id") == "call_0_0")
    assert denied["status"] == "denied" and denied["approved"] is False


@pytest.mark.parametrize(
    ("script", "limits", "reason", "model_calls"),
    [
        (
            'CALL add {"a": 1, "b": 1}\nCALL add {"a": 1, "b": 1}\nCALL add {"a": 1, "b": 1}',
            {"max_steps": 2},
            "max_steps",
            2,
        ),
        ('CALL add {"a": 1, "b": 1} | add {"a": 2, "b": 2}', {"max_tool_calls": 1}, "max_tool_calls", 1),
        ('CALL slow {"seconds": 1.5}\nCALL add {"a": 1, "b": 1}', {"max_time_s": 1}, "max_time", 1),
        (
            'CALL add {"a": 1, "b": 1}\nCALL add {"a": 1, "b": 1}',
            {"max_total_tokens": 10},
            "max_total_tokens",
            1,
        ),
        (
            "Answer at length please " + "with many more words " * 10,
            {"max_total_tokens": 12},
            "max_total_tokens",
            1,
        ),
    ],
)
def test_limits_end_the_run_incomplete(
    agents: Agents, script: str, limits: dict[str, int], reason: str, model_calls: int
) -> None:
    with agents.http() as http:
        run = agents.run(http, script, [MCP], **limits)
    assert run["status"] == "incomplete", run
    assert run["incomplete_details"] == {"reason": reason}
    assert run["model_calls"] == model_calls
    assert run["limits"][next(iter(limits))] == next(iter(limits.values()))
    if reason == "max_total_tokens" and model_calls == 1 and "CALL" not in script:
        # the completion was capped to what the run had left
        assert agents.chat_bodies()[0]["max_completion_tokens"] == 12
        assert run["usage"]["completion_tokens"] == 12


def test_limits_above_the_server_cap_are_refused(agents: Agents) -> None:
    with agents.http() as http:
        for name, value in (
            ("max_steps", 101),
            ("max_tool_calls", 10_000),
            ("max_time_s", 99_999),
            ("max_total_tokens", 10**9),
        ):
            r = http.post("/v1/agentic", json={"model": "gpt-test", "input": "hi", name: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text
        # at most 128 tools (OpenAI's cap), on both front ends of the engine
        tools = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]
        r = http.post("/v1/agentic", json={"model": "gpt-test", "input": "hi", "tools": tools})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
        flat = [{"type": "function", "name": f"f{i}"} for i in range(129)]
        r = http.post("/v1/responses", json={"model": "gpt-test", "input": "hi", "tools": flat})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
        r = http.post("/v1/agentic", json={"model": "gpt-test", "input": "hi", "tools": tools[:128]})
        assert r.status_code == 200, r.text


def test_tool_failures_reach_the_model_and_the_run_ends_cleanly(agents: Agents) -> None:
    down = {"type": "mcp", "server": "down", "allowed_tools": ["ping"], "require_approval": "never"}
    script = (
        'CALL fail {} | calculator {"expr": 1} | nosuch {} | ping {}'
        ' | lookup {"city": "Atlantis"} | calculator {"expression": "1/0"}'
    )
    with agents.http() as http:
        run = agents.run(http, script, [MCP, CALC, down])
    assert run["status"] == "completed", run
    tools = [s for s in run["steps"] if s["type"] == "tool_call"]
    assert [s["status"] for s in tools] == ["failed"] * 6
    errors = [s["error"] for s in tools]
    assert "fail always fails" in errors[0]
    assert errors[1].startswith("Invalid arguments")
    assert errors[2] == "There is no tool named 'nosuch'."
    assert errors[3] == "MCP server 'down' is unreachable"
    assert "unknown city Atlantis" in errors[4]
    assert "division by zero" in errors[5].lower()
    answer = run["output_text"]
    assert answer.count("Error: ") == 6
    assert "127.0.0.1" not in str(run)  # no server location in what the client sees


def test_requests_may_not_name_an_mcp_location(agents: Agents) -> None:
    with agents.http() as http:
        for field, value in (
            ("server_url", "http://169.254.169.254/"),
            ("url", "http://x"),
            ("command", ["sh"]),
        ):
            tool = {"type": "mcp", "server": "facts", field: value}
            r = http.post("/v1/agentic", json={"model": "gpt-test", "input": "hi", "tools": [tool]})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "mcp_server_location_not_allowed"
            assert r.json()["error"]["param"] == f"tools[0].{field}"
        r = http.post(
            "/v1/agentic",
            json={"model": "gpt-test", "input": "hi", "tools": [{"type": "mcp", "server": "nope"}]},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_mcp_server"
        for body, param in (
            ({"model": "gpt-test"}, "input"),
            (
                {"model": "gpt-test", "input": "hi", "messages": [{"role": "user", "content": "x"}]},
                "messages",
            ),
            (
                {"model": "gpt-test", "input": "hi", "tools": [{"type": "builtin", "name": "shell"}]},
                "tools[0].name",
            ),
            ({"model": "gpt-test", "input": "hi", "temperature": 9}, "temperature"),
            ({"model": "gpt-test", "input": "hi", "max_stepz": 1}, "max_stepz"),
            ({"model": "nope", "input": "hi"}, "model"),
        ):
            r = http.post("/v1/agentic", json=body)
            assert r.status_code in (400, 404), r.text
            assert r.json()["error"]["param"] == param, r.text
        assert http.get("/v1/agentic/run_nope").status_code == 404


def test_streaming_event_order_and_resume_after_n(agents: Agents) -> None:
    script = 'CALL add {"a": 2, "b": 3}'
    with agents.http() as http:
        r = http.post(
            "/v1/agentic", json={"model": "gpt-test", "input": script, "tools": [MCP], "stream": True}
        )
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.text)
        kinds = [k for k, _ in events]
        assert kinds == [
            "run.created",
            "run.in_progress",
            "step.started",
            "step.completed",
            "tool_call.started",
            "tool_call.completed",
            "step.started",
            *["message.delta"] * kinds.count("message.delta"),
            "step.completed",
            "run.completed",
        ], kinds
        assert kinds.count("message.delta") >= 1
        assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
        assert all(d["type"] == k for k, d in events)
        run_id = events[0][1]["run_id"]
        assert "".join(d["delta"] for k, d in events if k == "message.delta") == "Answer: 5"
        assert events[-1][1]["run"]["status"] == "completed"
        # a client that saw up to N gets the rest, exactly once
        n = 4
        rest = sse_events(http.get(f"/v1/agentic/{run_id}/events", params={"after": n}).text)
        assert rest == events[n + 1 :]
        assert sse_events(http.get(f"/v1/agentic/{run_id}/events").text) == events
        # nothing after the end
        last = events[-1][1]["sequence_number"]
        assert http.get(f"/v1/agentic/{run_id}/events", params={"after": last}).text == ""
        huge = http.get(f"/v1/agentic/{run_id}/events", params={"after": "9" * 30})
        assert huge.status_code == 200 and huge.text == ""
        assert http.get(f"/v1/agentic/{run_id}/events", params={"after": "x"}).status_code == 400


def test_background_run_returns_at_once_and_cancel_stops_it(agents: Agents) -> None:
    with agents.http() as http:
        run = agents.run(http, 'CALL slow {"seconds": 1}\nCALL add {"a": 1, "b": 1}', [MCP], background=True)
        assert run["status"] == "queued" and run["background"] is True and run["steps"] == []
        wait_run(http, run["id"], {"in_progress"})
        r = http.post(f"/v1/agentic/{run['id']}/cancel")
        assert r.status_code == 200
        done = wait_run(http, run["id"])
        assert done["status"] == "cancelled", done
        assert http.post(f"/v1/agentic/{run['id']}/cancel").json()["status"] == "cancelled"
        # a paused run is cancelled at once
        paused = agents.run(http, 'CALL add {"a": 1, "b": 1}', [{**MCP, "require_approval": "always"}])
        assert paused["status"] == "requires_action"
        assert http.post(f"/v1/agentic/{paused['id']}/cancel").json()["status"] == "cancelled"
        finished = agents.run(http, "hi", [])
        r = http.post(f"/v1/agentic/{finished['id']}/cancel")
        assert r.status_code == 409 and r.json()["error"]["code"] == "run_not_cancellable"
    assert agents.mcp.counts().get("add", 0) == 0


def test_cancel_stops_a_model_answer_in_the_middle(agents: Agents) -> None:
    """A cancel during a long streamed answer ends the run at the next stored delta, and the
    upstream's stream is closed (generation stops: the fake sees its client go away)."""
    agents.upstream.chunk_delay = 0.1  # a 200-word answer takes 20 s
    words = " ".join(f"w{i}" for i in range(200))
    with agents.http() as http:
        run = agents.run(http, words, [], background=True, stream=False)
        with http.stream("GET", f"/v1/agentic/{run['id']}/events") as events:
            # the run's stream, live, up to the first text of the answer
            assert "event: message.delta" in (line for line in events.iter_lines())
        assert http.post(f"/v1/agentic/{run['id']}/cancel").status_code == 200
        done = wait_run(http, run["id"], timeout=10)  # not the 20 s the answer takes
    assert done["status"] == "cancelled", done
    step = done["steps"][-1]
    assert step["type"] == "model_call" and step["status"] == "incomplete"
    assert agents.upstream.cancelled, "the upstream's stream was not closed"


def test_cancel_stops_a_tool_call_in_the_middle(agents: Agents) -> None:
    """A cancel while an MCP call runs ends the run within a look at the flag (0.5 s), not
    when the 30 s tool is done; the step says why, and the model is not called again."""
    with agents.http() as http:
        run = agents.run(http, 'CALL slow {"seconds": 30}', [MCP], background=True)
        with http.stream("GET", f"/v1/agentic/{run['id']}/events") as events:
            assert "event: tool_call.started" in (line for line in events.iter_lines())
        assert http.post(f"/v1/agentic/{run['id']}/cancel").status_code == 200
        done = wait_run(http, run["id"], timeout=10)
    assert done["status"] == "cancelled", done
    tool = next(s for s in done["steps"] if s["type"] == "tool_call")
    assert tool["status"] == "failed" and "cancelled while the tool ran" in tool["error"], tool
    assert agents.mcp.counts() == {"slow": 1}
    assert len(agents.chat_bodies()) == 1  # only the call that asked for the tool


@pytest.mark.parametrize("restart", ["same_executor", "take_over"])
def test_kill9_mid_run_resumes_without_repeating_finished_tool_calls(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI, mcp: RunningMcpServer, restart: str
) -> None:
    upstream.script = agent_script
    app = make_app([model_entry("gpt-test", upstream)], mcp_servers=[{"name": "facts", "url": mcp.url}])
    script = (
        'CALL add {"a": 2, "b": 3} | lookup {"city": "Paris"}\n'
        'CALL slow {"seconds": 2}\n'
        'CALL add {"a": 1, "b": 1}'
    )
    fast = {"dead_after": 2.0} if restart == "take_over" else {}
    with app.http() as http:
        with run_worker(app.settings, "agent-a", **fast) as first:
            run = http.post(
                "/v1/agentic",
                json={"model": "gpt-test", "input": script, "tools": [MCP], "background": True},
            ).json()
            deadline = time.monotonic() + 30
            while mcp.counts().get("slow", 0) < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            first.proc.kill()  # SIGKILL in the middle of the slow tool call
            first.proc.wait()
        assert http.get(f"/v1/agentic/{run['id']}").json()["status"] == "in_progress"
        executor = "agent-a" if restart == "same_executor" else "agent-b"
        with run_worker(app.settings, executor, **fast) as second:
            done = wait_run(http, run["id"], timeout=90)
    assert done["status"] == "completed", done
    assert done["output_text"] == "Answer: 5 ; Paris has 2100000 inhabitants ; slept 2 ; 2"
    counts = mcp.counts()
    # finished calls ran once; only the call in flight at the kill ran again
    assert counts["lookup"] == 1 and counts["add"] == 2 and counts["slow"] == 2, counts
    assert [s["type"] for s in done["steps"]].count("model_call") == 4
    if restart == "take_over":
        assert any("took over the work of dead worker agent-a" in line for line in second.log)


def test_a_key_may_use_only_its_mcp_servers(
    stack: Stack, upstream: FakeOpenAI, upstream_key: str, mcp: RunningMcpServer, tmp_path: Any
) -> None:
    upstream.script = agent_script
    settings = stack.gateway_settings(
        [model_entry("gpt-test", upstream)],
        state_dir=tmp_path,
        mcp_servers=[{"name": "facts", "url": mcp.url}, {"name": "other", "url": dead_url()}],
    )
    limited = stack.create_key(tenant="acme", mcp_servers=["other"])
    everything = stack.create_key(tenant="acme")
    stranger = stack.create_key(tenant="globex")
    with serve_app(settings) as app, run_worker(settings):
        body = {"model": "gpt-test", "input": 'CALL add {"a": 1, "b": 2}', "tools": [MCP]}
        with httpx.Client(base_url=app.base_url, timeout=60) as http:
            r = http.post("/v1/agentic", json=body, headers={"Authorization": f"Bearer {limited}"})
            assert r.status_code == 403, r.text
            assert r.json()["error"]["code"] == "mcp_server_not_allowed"
            r = http.post("/v1/agentic", json=body, headers={"Authorization": f"Bearer {everything}"})
            assert r.status_code == 200 and r.json()["output_text"] == "Answer: 3", r.text
            run_id = r.json()["id"]
            # another tenant's run is not found, on every route
            for method, path in (
                ("GET", f"/v1/agentic/{run_id}"),
                ("POST", f"/v1/agentic/{run_id}/cancel"),
                ("POST", f"/v1/agentic/{run_id}/submit"),
                ("GET", f"/v1/agentic/{run_id}/events"),
            ):
                r = http.request(method, path, json={}, headers={"Authorization": f"Bearer {stranger}"})
                assert r.status_code == 404, (path, r.text)
            assert http.post("/v1/agentic", json=body).status_code == 401


def test_a_tenant_may_use_only_its_mcp_servers(
    stack: Stack, upstream: FakeOpenAI, upstream_key: str, mcp: RunningMcpServer, tmp_path: Any
) -> None:
    """A tenant's list bounds every key of the tenant, even one that has no list of its own;
    lifting it reaches the gateway's cached verdict through the key event, not its 60 s TTL."""
    upstream.script = agent_script
    settings = stack.gateway_settings(
        [model_entry("gpt-test", upstream)],
        state_dir=tmp_path,
        mcp_servers=[{"name": "facts", "url": mcp.url}, {"name": "other", "url": dead_url()}],
    )

    def set_tenant_servers(tenant: str, servers: list[str]) -> None:
        req = auth_pb2.SetTenantMcpServersRequest(tenant=tenant, mcp_servers=servers)
        stack.admin_auth().SetTenantMcpServers(req, timeout=5)

    set_tenant_servers("acme", ["other"])
    acme = stack.create_key(tenant="acme")  # no list of its own
    globex = stack.create_key(tenant="globex")
    with serve_app(settings) as app, run_worker(settings):
        body = {"model": "gpt-test", "input": 'CALL add {"a": 1, "b": 2}', "tools": [MCP]}
        with httpx.Client(base_url=app.base_url, timeout=60) as http:

            def agentic(key: str) -> httpx.Response:
                return http.post("/v1/agentic", json=body, headers={"Authorization": f"Bearer {key}"})

            r = agentic(acme)
            assert r.status_code == 403, r.text
            assert (r.json()["error"]["code"], r.json()["error"]["param"]) == (
                "mcp_server_not_allowed",
                "tools[0].server",
            )
            r = agentic(globex)  # another tenant: unaffected
            assert r.status_code == 200 and r.json()["output_text"] == "Answer: 3", r.text

            set_tenant_servers("acme", [])  # every server again
            deadline = time.monotonic() + 10  # well inside the verdict's 60 s cache_ttl
            while (r := agentic(acme)).status_code == 403:
                assert time.monotonic() < deadline, "the tenant's change never reached the gateway"
                time.sleep(0.05)
            assert r.status_code == 200 and r.json()["output_text"] == "Answer: 3", r.text
    assert mcp.counts().get("add") == 2  # the two runs that were allowed, and no other


def test_a_low_tpm_key_is_throttled_across_the_steps_of_a_run(
    stack: Stack,
    upstream: FakeOpenAI,
    upstream_key: str,
    mcp: RunningMcpServer,
    redis_server: EmbeddedRedis,
    tmp_path: Any,
) -> None:
    """Every model call of a run is admitted against the key's TPM, like any request: once
    the key's budget is spent (here by another request of the key, while the run's tool
    runs), the run's next model call waits, and the run ends when its time is up."""
    upstream.script = agent_script
    settings = stack.gateway_settings(
        [model_entry("gpt-test", upstream)],
        state_dir=tmp_path,
        mcp_servers=[{"name": "facts", "url": mcp.url}],
        ratelimit={"enabled": True},
        redis={"url": redis_server.url(), "timeout": 1.0},
        agent={"max_backoff": 0.5},
    )
    key = stack.create_key(tenant="acme", limits=auth_pb2.Limits(tpm=1000))
    with serve_app(settings) as app, run_worker(settings):
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=app.base_url, timeout=60, headers=headers) as http:
            body = {
                "model": "gpt-test",
                "input": 'CALL slow {"seconds": 2}',
                "tools": [MCP],
                "max_completion_tokens": 100,
                "max_time_s": 5,
                "background": True,
            }
            run = http.post("/v1/agentic", json=body).json()
            deadline = time.monotonic() + 30
            while mcp.counts().get("slow", 0) < 1:
                assert time.monotonic() < deadline, str(http.get(f"/v1/agentic/{run['id']}").json())
                time.sleep(0.05)
            client = openai.OpenAI(base_url=app.base_url + "/v1", api_key=key, max_retries=0)
            client.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "a " * 900}], max_tokens=1
            )
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(
                    model="gpt-test", messages=[{"role": "user", "content": "b " * 100}]
                )
            done = wait_run(http, run["id"], timeout=60)
    assert done["status"] == "incomplete" and done["incomplete_details"] == {"reason": "max_time"}, done
    last = done["steps"][-1]
    assert last["type"] == "model_call" and last["status"] == "incomplete" and last["rate_limited"] >= 1
    assert done["model_calls"] == 1
    assert len([r for r in upstream.requests if r.path == "/v1/chat/completions"]) == 2


def test_a_paused_run_survives_a_worker_kill_and_submit_continues_it(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI, mcp: RunningMcpServer
) -> None:
    """A run waiting for the client holds no worker: killing every worker loses nothing,
    and a submit after the restart goes on from the stored state."""
    upstream.script = agent_script
    app = make_app([model_entry("gpt-test", upstream)], mcp_servers=[{"name": "facts", "url": mcp.url}])
    strict = {**MCP, "require_approval": "always"}
    with app.http() as http:
        with run_worker(app.settings, "agent-p") as first:
            run = http.post(
                "/v1/agentic",
                json={"model": "gpt-test", "input": 'CALL add {"a": 20, "b": 22}', "tools": [strict]},
            ).json()
            assert run["status"] == "requires_action"
            first.proc.kill()
            first.proc.wait()
        before = sse_events(http.get(f"/v1/agentic/{run['id']}/events").text)
        assert before[-1][0] == "run.requires_action"
        with run_worker(app.settings, "agent-q"):
            r = http.post(
                f"/v1/agentic/{run['id']}/submit",
                json={"approvals": [{"tool_call_id": "call_0_0", "approve": True}], "stream": True},
            )
            events = sse_events(r.text)
    kinds = [k for k, _ in events]
    assert kinds[0] == "run.submitted" and kinds[-1] == "run.completed", kinds
    assert events[0][1]["sequence_number"] == len(before) and kinds.count("tool_call.completed") == 1
    assert events[-1][1]["run"]["output_text"] == "Answer: 42"
    assert mcp.counts() == {"add": 1}
