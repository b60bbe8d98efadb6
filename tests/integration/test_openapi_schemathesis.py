"""``/openapi.json`` states what the validators enforce: a bounded schemathesis run finds nothing.

Schemathesis generates requests from the document (valid ones, and ones that break it),
sends them to the gateway with a real API key against a real auth-service, and checks
every response: no 5xx, valid data accepted, invalid data refused with a 4xx, statuses and
content types as documented, missing credentials refused. Bounded to about 50 examples per
operation, with a fixed seed so a failure reproduces. It runs through
``schemathesis_cli.py``, which keeps a CPython 3.11 bug out of the tool's way.
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
    with serve_app(settings) as app:
        proc = _schemathesis(app.base_url, key, SEED, tmp_path)
    assert proc.returncode == 0, proc.stdout[-12000:] + proc.stderr[-3000:]


#: Every check, for every operation, with exceptions where a schema-valid request is rightly
#: a 400 because of a rule OpenAPI cannot state, so "valid data is accepted" is off there:
#: an upload with ``purpose=batch`` must be named ``*.jsonl`` (schemathesis names its file
#: parts itself, ``file.png``); a usage query's ``end_time`` must be after its
#: ``start_time``, its ``limit`` depends on ``bucket_width`` and its ``page`` must be an
#: answer's ``next_page``. (Set here, not with ``--checks all``: the command line would
#: override the operation's setting.)
CONFIG = """
[checks]
enabled = true

[[operations]]
include-operation-id = "create_file"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-operation-id = "key_usage"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-operation-id = "organization_usage"
checks.positive_data_acceptance.enabled = false
"""


def _schemathesis(base_url: str, key: str, seed: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    config = cwd / "schemathesis.toml"
    config.write_text(CONFIG)
    return subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("schemathesis_cli.py")),
            "--config-file",
            str(config),
            "run",
            f"{base_url}/openapi.json",
            "--header",
            f"Authorization: Bearer {key}",
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
