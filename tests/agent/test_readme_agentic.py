"""The README's agent-run example, run as written: its config (with the fake upstream in
place of OpenAI) and its curl command, against a gateway and a worker. The example MCP
server is the real one (``examples/mcp_facts_server.py``, over stdio); the model is a
scripted stand-in that asks for the tools a real model would."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.batch.fixtures import run_worker
from tests.conftest import RunningApp, model_entry
from tests.fakes._sse import ChoicePlan, split_tokens, text_of
from tests.fakes.openai_upstream import FakeOpenAI

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BLOCK = re.compile(r"<!-- agentic:(\w+) -->\s*```(\w+)\n(.*?)^```", re.S | re.M)


def readme_blocks() -> dict[str, str]:
    return {name: code for name, _lang, code in BLOCK.findall((ROOT / "README.md").read_text())}


def density_model(body: dict[str, Any]) -> list[ChoicePlan]:
    """Asks for the population and the area of the city at once, then for their quotient,
    then answers with it."""
    messages = body["messages"]
    city = re.search(r"live in (\w+)", text_of(messages[0]["content"]))
    assert city is not None
    results = [text_of(m["content"]) for m in messages if m["role"] == "tool"]
    turn = sum(1 for m in messages if m["role"] == "assistant")

    def call(i: int, name: str, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": f"call_{turn}_{i}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)},
        }

    if turn == 0:
        calls = [call(0, "population", {"city": city.group(1)}), call(1, "area", {"city": city.group(1)})]
        return [ChoicePlan(tool_calls=calls, finish_reason="tool_calls")]
    if turn == 1:
        return [
            ChoicePlan(
                tool_calls=[call(0, "calculator", {"expression": f"{results[0]} / {results[1]}"})],
                finish_reason="tool_calls",
            )
        ]
    return [
        ChoicePlan(
            split_tokens(f"{city.group(1)} has about {float(results[-1]):.0f} people per km²."), [], "stop"
        )
    ]


def test_readme_agentic_example_runs_as_written(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI
) -> None:
    blocks = readme_blocks()
    assert set(blocks) == {"config", "curl"}
    config = yaml.safe_load(blocks["config"])
    assert [m["name"] for m in config["models"]] == ["gpt-4o-mini"]
    servers = json.loads(json.dumps(config["mcp_servers"]).replace(".venv/bin/", f"{BIN}/"))
    upstream.script = density_model
    app = make_app([model_entry("gpt-4o-mini", upstream)], mcp_servers=servers)
    with run_worker(app.settings):
        curl = blocks["curl"].replace("http://127.0.0.1:8080", app.base_url)
        done = subprocess.run(
            ["bash", "-c", curl],
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin", "KEY": "sk-any"},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert run["status"] == "completed", run
    assert run["output_text"] == "Paris has about 19949 people per km²."
    tools = [(s["name"], s["output"]) for s in run["steps"] if s["type"] == "tool_call"]
    assert tools == [("population", "2102650"), ("area", "105.4"), ("calculator", tools[2][1])]
    assert tools[2][1].startswith("19949.")
    assert [s["type"] for s in run["steps"]].count("model_call") == 3
