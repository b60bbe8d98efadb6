"""The CLI as a person first meets it: `--version`, `up --log-level`, and `keys list` as a table
(or JSON for scripts) against a real auth-service."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tail_service.cli import cli
from tests.integration.test_admin_cli import EXE
from tests.integration.test_admin_cli import cli as admin_cli
from tests.stack_fixtures import Stack


def test_version() -> None:
    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == "tail-service 0.1.0"


def test_keys_list_is_a_headed_aligned_table_and_json(stack: Stack, pki_dir: Path) -> None:
    keys = {}
    for name, extra in (("ci", ["--models", "a,b", "--rpm", "5"]), ("a much longer name", [])):
        created = admin_cli(stack, pki_dir, "keys", "create", "--name", name, "--tenant", "acme", *extra)
        assert created.returncode == 0, created.stderr
        keys[name] = created.stdout.strip().splitlines()[-1]

    listed = admin_cli(stack, pki_dir, "keys", "list", "--tenant", "acme")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.rstrip("\n").splitlines()
    header = lines[0]
    assert header.split() == [
        "ID", "PREFIX", "NAME", "TENANT", "MODELS", "RPM", "TPM", "CONCURRENCY", "BUDGET", "EXPIRES",
        "STATUS"
    ]  # fmt: skip
    assert len(lines) == 3
    # Aligned: every value starts in its header's column.
    starts = {col: header.index(col) for col in ("PREFIX", "NAME", "TENANT", "MODELS", "RPM", "STATUS")}
    rows = {}
    for line in lines[1:]:
        name = "ci" if line[starts["NAME"] :].startswith("ci ") else "a much longer name"
        rows[name] = line
        for col, at in starts.items():
            assert line[at - 2 : at] == "  " and line[at] != " ", (col, line)
    ci = rows["ci"]
    assert ci[starts["PREFIX"] :].startswith(keys["ci"][:12] + "...")
    assert ci[starts["MODELS"] :].startswith("a,b ") and ci[starts["RPM"] :].startswith("5 ")
    assert ci[starts["STATUS"] :] == "active"
    assert rows["a much longer name"][starts["MODELS"] :].startswith("* ")
    assert not any(key in listed.stdout for key in keys.values())

    as_json = admin_cli(stack, pki_dir, "keys", "list", "--tenant", "acme", "--json")
    assert as_json.returncode == 0, as_json.stderr
    records = json.loads(as_json.stdout)
    assert isinstance(records, list) and len(records) == 2
    by_name = {r["name"]: r for r in records}
    assert set(by_name["ci"]) == {
        "id", "prefix", "name", "tenant", "models", "rpm", "tpm", "max_concurrency",
        "expires_at", "created_at", "revoked", "response_cache", "mcp_servers", "budget_usd",
        "budget_period",
    }  # fmt: skip
    assert by_name["ci"]["models"] == ["a", "b"] and by_name["ci"]["rpm"] == 5
    assert by_name["ci"]["prefix"] == keys["ci"][:12] and by_name["ci"]["revoked"] is False
    assert by_name["a much longer name"]["models"] == [] and by_name["ci"]["expires_at"] is None
    # Never the key, never a hash of it.
    assert not any(key in as_json.stdout or key[8:] in as_json.stdout for key in keys.values())
    assert not re.search(r"hash|hmac|api_key", as_json.stdout, re.I)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_up_log_level(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAIL_")}
    proc = subprocess.Popen(
        [EXE, "up", "--port", "0", "--state-dir", str(tmp_path), "--log-level", "DEBUG"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        url = None
        deadline = time.monotonic() + 90
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m or time.monotonic() > deadline:
                url = m.group(1) if m else None
                break
        assert url, "".join(lines[-30:])
        threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True).start()
        assert httpx.get(url + "/livez", timeout=10).status_code == 200
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    log = "".join(lines)
    # debug: DEBUG records, and the access log line of the request above
    assert " DEBUG " in log, log[-3000:]
    assert re.search(r"tail_service\.access .*method=GET route=/livez status=200", log), log[-3000:]
    bad = subprocess.run([EXE, "up", "--log-level", "loud"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "loud" in bad.stderr
