"""A scripted agent model for the fake upstream, and helpers to drive agent runs.

The first user message is the script: each ``CALL`` line is one model turn asking for the
tools it names (``CALL add {"a": 2, "b": 3} | calculator {"expression": "6*7"}`` asks for
two calls at once); after the last line the model answers ``Answer: `` followed by every
tool result it was given (or by the script itself, when there was none). The turn is the
number of assistant messages so far, so the model follows the conversation, whoever runs
the loop.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.fakes._sse import ChoicePlan, split_tokens, text_of

TERMINAL = {"completed", "failed", "cancelled", "incomplete"}
RESTING = TERMINAL | {"requires_action"}


def agent_script(body: dict[str, Any]) -> list[ChoicePlan]:
    messages = body["messages"]
    script = next(text_of(m.get("content")) for m in messages if m.get("role") == "user")
    lines = [line.strip() for line in script.splitlines() if line.strip().startswith("CALL ")]
    turn = sum(1 for m in messages if m.get("role") == "assistant")
    if turn < len(lines):
        calls = []
        for i, part in enumerate(lines[turn][len("CALL ") :].split(" | ")):
            name, _, args = part.strip().partition(" ")
            calls.append(
                {
                    "id": f"call_{turn}_{i}",
                    "type": "function",
                    "function": {"name": name, "arguments": args or "{}"},
                }
            )
        return [ChoicePlan(tool_calls=calls, finish_reason="tool_calls")]
    results = [text_of(m.get("content")) for m in messages if m.get("role") == "tool"]
    tokens = split_tokens("Answer: " + (" ; ".join(results) if results else script))
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(limit, int) and len(tokens) > limit:
        return [ChoicePlan(tokens[:limit], [], "length")]
    return [ChoicePlan(tokens, [], "stop")]


def wait_run(
    http: httpx.Client, run_id: str, until: set[str] = RESTING, timeout: float = 60.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        run: dict[str, Any] = http.get(f"/v1/agentic/{run_id}").json()
        if run["status"] in until:
            return run
        assert time.monotonic() < deadline, f"run still {run['status']}"
        time.sleep(0.1)


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``(event name, data)`` of each event of an SSE body."""
    import orjson

    out = []
    for block in text.split("\n\n"):
        name, data = None, None
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data = orjson.loads(line[len("data: ") :])
        if name is not None and data is not None:
            out.append((name, data))
    return out
