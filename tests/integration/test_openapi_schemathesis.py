"""``/openapi.json`` states what the validators enforce: a bounded schemathesis run finds nothing.

Schemathesis generates requests from the document (valid ones, and ones that break it),
sends them to the gateway with a real API key against a real auth-service, and checks
every response: no 5xx, valid data accepted, invalid data refused with a 4xx, statuses and
content types as documented, missing credentials refused. Bounded to about 50 examples per
operation, with a fixed seed so a failure reproduces.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import model_entry, serve_app
from tests.fakes.openai_upstream import FakeOpenAI
from tests.stack_fixtures import Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SEED = 20261206


def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(
    stack: Stack, upstream: FakeOpenAI, upstream_key: str, tmp_path: Path
) -> None:
    settings = stack.gateway_settings(
        [model_entry("gpt-test", upstream), model_entry("embed-test", upstream, supports_dimensions=True)]
    )
    key = stack.create_key()
    st = Path(sys.executable).with_name("st")
    with serve_app(settings) as app:
        for attempt in range(3):
            proc = _schemathesis(st, app.base_url, key, SEED + attempt, tmp_path)
            # CPython 3.11's ast.parse can fail with this SystemError when called deep in a
            # recursion (hypothesis parses lambda sources for a strategy's repr): a bug of
            # the interpreter inside the tool, not a finding about the API. Anything else
            # fails at once.
            if proc.returncode == 0 or "AST constructor recursion depth mismatch" not in proc.stdout:
                break
    assert proc.returncode == 0, proc.stdout[-12000:] + proc.stderr[-3000:]


def _schemathesis(
    st: Path, base_url: str, key: str, seed: int, cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(st),
            "run",
            f"{base_url}/openapi.json",
            "--header",
            f"Authorization: Bearer {key}",
            "--checks",
            "all",
            "--max-examples",
            "50",
            "--phases",
            "examples,coverage,fuzzing",
            "--seed",
            str(seed),
            "--generation-database",
            "none",
            "--workers",
            "2",
            "--max-failures",
            "20",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=540,
        env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"},
    )
