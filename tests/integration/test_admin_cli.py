"""The admin commands as a person runs them: `tail-service keys ...` and `secrets ...`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.stack_fixtures import Stack

EXE = str(Path(sys.executable).with_name("tail-service"))


def cli(
    stack: Stack, pki_dir: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    where = [
        "--auth-address" if args[0] == "keys" else "--secrets-address",
        f"127.0.0.1:{stack.auth_port if args[0] == 'keys' else stack.secrets_port}",
        "--tls-dir",
        str(pki_dir),
    ]
    return subprocess.run([EXE, *args, *where], input=stdin, capture_output=True, text=True, timeout=60)


def test_keys_commands(stack: Stack, pki_dir: Path) -> None:
    created = cli(
        stack,
        pki_dir,
        *("keys", "create", "--name", "ci", "--tenant", "acme", "--models", "a,b", "--rpm", "5"),
        *("--mcp-servers", "docs,search"),
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("sk-tail-") and len(created.stdout.strip().splitlines()) == 1  # the key alone
    listed = cli(stack, pki_dir, "keys", "list", "--tenant", "acme", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    key_id = row["id"]
    assert (row["prefix"], row["name"], row["models"], row["rpm"]) == (key[:12], "ci", ["a", "b"], 5)
    assert row["mcp_servers"] == ["docs", "search"]
    assert key not in listed.stdout
    updated = cli(
        stack, pki_dir, "keys", "update", key_id, "--rpm", "50", "--models", "", "--mcp-servers", ""
    )
    assert updated.returncode == 0, updated.stderr
    assert "rpm=50" in updated.stdout and "models=*" in updated.stdout and "mcp_servers=*" in updated.stdout
    narrowed = cli(stack, pki_dir, "keys", "update", key_id, "--mcp-servers", "docs")
    assert narrowed.returncode == 0 and "mcp_servers=docs" in narrowed.stdout
    revoked = cli(stack, pki_dir, "keys", "revoke", key)  # by the key itself
    assert revoked.returncode == 0 and key_id in revoked.stdout
    gone = cli(stack, pki_dir, "keys", "list", "--tenant", "acme")
    assert key_id not in gone.stdout
    missing = cli(stack, pki_dir, "keys", "revoke", "key_doesnotexist")
    assert missing.returncode == 1 and "not_found" in missing.stderr and "Traceback" not in missing.stderr


def test_secrets_commands_read_values_from_stdin(stack: Stack, pki_dir: Path) -> None:
    value = "sk-provider-from-stdin-123456"
    stored = cli(stack, pki_dir, "secrets", "set", "prov", stdin=value + "\n")
    assert stored.returncode == 0, stored.stderr
    assert "version 1" in stored.stdout and value not in stored.stdout + stored.stderr
    rotated = cli(stack, pki_dir, "secrets", "rotate", "prov", stdin="sk-provider-v2")
    assert rotated.returncode == 0 and "version 2" in rotated.stdout
    assert cli(stack, pki_dir, "secrets", "list").stdout.split() == ["prov"]
    assert cli(stack, pki_dir, "secrets", "rotate", "nope", stdin="x").returncode == 1
    assert cli(stack, pki_dir, "secrets", "set", "empty", stdin="").returncode == 1
    deleted = cli(stack, pki_dir, "secrets", "delete", "prov")
    assert deleted.returncode == 0 and cli(stack, pki_dir, "secrets", "list").stdout.strip() == ""


def test_no_stack_is_a_clear_error(tmp_path: Path) -> None:
    res = subprocess.run(
        [EXE, "keys", "list", "--state-dir", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert "no running stack found" in res.stderr and "Traceback" not in res.stderr
