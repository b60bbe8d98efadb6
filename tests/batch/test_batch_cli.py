"""``tail-service batch submit|status|cancel|list`` against a gateway and a worker."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from tests.batch.fixtures import chat_line, jsonl, run_worker
from tests.conftest import RunningApp, model_entry
from tests.fakes.openai_upstream import REJECT_CONTENT, FakeOpenAI
from tests.processes import EXE

pytestmark = pytest.mark.slow


def _cli(app: RunningApp, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OPENAI_BASE_URL": app.v1, "OPENAI_API_KEY": "sk-any"}
    return subprocess.run([EXE, "batch", *args], capture_output=True, text=True, env=env, timeout=120)


def test_submit_wait_downloads_output_and_errors(
    make_app: Callable[..., RunningApp], upstream: FakeOpenAI, tmp_path: Path
) -> None:
    app = make_app([model_entry("gpt-test", upstream)])
    source = tmp_path / "questions.jsonl"
    lines = [chat_line(f"q{i}", f"question {i}") for i in range(25)] + [chat_line("bad", REJECT_CONTENT)]
    source.write_bytes(jsonl(lines))
    with run_worker(app.settings):
        done = _cli(
            app, "submit", str(source), "--endpoint", "/v1/chat/completions", "--wait", "--interval", "0.2"
        )
        assert done.returncode == 0, done.stderr
        batch_id = done.stdout.splitlines()[0]
        assert batch_id.startswith("batch_")
        assert "completed" in done.stdout and "25/26 done, 1 failed" in done.stdout
        out = [orjson.loads(x) for x in (tmp_path / "questions.output.jsonl").read_bytes().splitlines()]
        assert sorted(o["custom_id"] for o in out) == sorted(f"q{i}" for i in range(25))
        errors = [orjson.loads(x) for x in (tmp_path / "questions.errors.jsonl").read_bytes().splitlines()]
        assert [e["custom_id"] for e in errors] == ["bad"]

        shown = _cli(app, "status", batch_id, "--json")
        assert shown.returncode == 0 and orjson.loads(shown.stdout)["status"] == "completed"
        listed = _cli(app, "list")
        assert listed.returncode == 0 and batch_id in listed.stdout
        refused = _cli(app, "cancel", batch_id)
        assert refused.returncode == 1 and "Cannot cancel a batch with status `completed`" in refused.stderr


def test_errors_are_clear(make_app: Callable[..., RunningApp], upstream: FakeOpenAI, tmp_path: Path) -> None:
    app = make_app([model_entry("gpt-test", upstream)])
    missing = _cli(app, "status", "batch_nope")
    assert missing.returncode == 1 and "No such Batch object: batch_nope" in missing.stderr
    source = tmp_path / "notes.txt"
    source.write_text("{}\n")
    wrong = _cli(app, "submit", str(source))
    assert wrong.returncode == 1 and "jsonl" in wrong.stderr
    env = {**os.environ, "OPENAI_API_KEY": "x"}
    down = subprocess.run(
        [EXE, "batch", "list", "--base-url", "http://127.0.0.1:9/v1"], capture_output=True, text=True, env=env
    )
    assert down.returncode == 1 and "cannot reach http://127.0.0.1:9/v1" in down.stderr
