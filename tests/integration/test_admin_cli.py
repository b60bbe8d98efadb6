"""The admin commands as a person runs them: `tail-service keys ...`, `tenants ...` and
`secrets ...`."""

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
    auth = args[0] in ("keys", "tenants")
    where = [
        "--auth-address" if auth else "--secrets-address",
        f"127.0.0.1:{stack.auth_port if auth else stack.secrets_port}",
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


def test_budget_commands(stack: Stack, pki_dir: Path) -> None:
    created = cli(
        stack, pki_dir, "keys", "create", "--tenant", "acme", "--budget", "5", "--budget-period", "day"
    )
    assert created.returncode == 0, created.stderr
    assert "budget $5/day" in created.stderr and len(created.stdout.strip().splitlines()) == 1
    assert cli(stack, pki_dir, "keys", "create", "--tenant", "acme", "--name", "plain").returncode == 0
    listed = json.loads(cli(stack, pki_dir, "keys", "list", "--tenant", "acme", "--json").stdout)
    # by name: two keys made in the same second may list in either order
    [plain] = [k for k in listed if k["name"] == "plain"]
    [row] = [k for k in listed if k["name"] != "plain"]
    assert (row["budget_usd"], row["budget_period"]) == (5, "day")
    assert (plain["budget_usd"], plain["budget_period"]) == (0, "none")
    table = cli(stack, pki_dir, "keys", "list", "--tenant", "acme").stdout.splitlines()
    by_id = {line.split()[0]: line.split() for line in table[1:]}
    assert "BUDGET" in table[0].split() and "$5/day" in by_id[row["id"]] and "-" in by_id[plain["id"]]

    more = cli(stack, pki_dir, "keys", "update", row["id"], "--budget", "7.5")
    assert more.returncode == 0 and "budget=$7.5/day" in more.stdout, more.stderr
    monthly = cli(stack, pki_dir, "keys", "update", row["id"], "--budget-period", "month")
    assert monthly.returncode == 0 and "budget=$7.5/month" in monthly.stdout, monthly.stderr
    added = cli(stack, pki_dir, "keys", "update", plain["id"], "--budget", "2")  # month by default
    assert added.returncode == 0 and "budget=$2/month" in added.stdout, added.stderr
    removed = cli(stack, pki_dir, "keys", "update", row["id"], "--budget", "0")
    assert removed.returncode == 0 and "budget=none" in removed.stdout, removed.stderr

    def tenant(budget: str) -> str:
        return f"tenant acme: budget {budget}, mcp_servers=*\n"

    shown = cli(stack, pki_dir, "tenants", "budget", "acme")
    assert (shown.returncode, shown.stdout) == (0, tenant("none")), shown.stderr
    set_ = cli(stack, pki_dir, "tenants", "budget", "acme", "--budget", "100", "--budget-period", "month")
    assert (set_.returncode, set_.stdout) == (0, tenant("$100/month")), set_.stderr
    assert cli(stack, pki_dir, "tenants", "budget", "acme").stdout == tenant("$100/month")
    total = cli(stack, pki_dir, "tenants", "budget", "acme", "--budget", "20", "--budget-period", "none")
    assert total.stdout == tenant("$20 total"), total.stderr
    off = cli(stack, pki_dir, "tenants", "budget", "acme", "--budget", "0")
    assert off.stdout == tenant("none"), off.stderr

    for args, says in [
        (("keys", "create", "--budget", "-1"), "budget_usd"),
        (("keys", "create", "--budget", "nan"), "budget_usd"),
        (("keys", "create", "--budget", "1", "--budget-period", "week"), "budget_period"),
        (("keys", "update", row["id"], "--budget-period", "day"), "budget_period"),  # no budget to change
        (("keys", "update", row["id"], "--budget", "inf"), "budget_usd"),
        (("tenants", "budget", "acme", "--budget", "-5"), "budget_usd"),
        (("tenants", "budget", "acme", "--budget", "5", "--budget-period", "yearly"), "budget_period"),
        (("tenants", "budget", "acme", "--budget-period", "day"), "--budget-period needs --budget"),
        (("tenants", "budget", " "), "tenant is required"),
    ]:
        res = cli(stack, pki_dir, *args)
        assert res.returncode == 2 and says in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr
    assert cli(stack, pki_dir, "tenants", "budget", "acme").stdout == tenant("none")


def test_tenant_mcp_servers_commands(stack: Stack, pki_dir: Path) -> None:
    def tenant(budget: str, servers: str, name: str = "acme") -> str:
        return f"tenant {name}: budget {budget}, mcp_servers={servers}\n"

    assert cli(stack, pki_dir, "keys", "create", "--tenant", "acme").returncode == 0
    shown = cli(stack, pki_dir, "tenants", "mcp-servers", "acme")
    assert (shown.returncode, shown.stdout) == (0, tenant("none", "*")), shown.stderr
    set_ = cli(stack, pki_dir, "tenants", "mcp-servers", "acme", "docs, search,docs")
    assert (set_.returncode, set_.stdout) == (0, tenant("none", "docs,search")), set_.stderr
    [key] = json.loads(cli(stack, pki_dir, "keys", "list", "--tenant", "acme", "--json").stdout)
    assert key["mcp_servers"] == []  # the key's own list is its own
    budget = cli(stack, pki_dir, "tenants", "budget", "acme", "--budget", "5", "--budget-period", "day")
    assert budget.stdout == tenant("$5/day", "docs,search"), budget.stderr
    assert cli(stack, pki_dir, "tenants", "mcp-servers", "acme").stdout == budget.stdout
    reset = cli(stack, pki_dir, "tenants", "mcp-servers", "acme", "")
    assert (reset.returncode, reset.stdout) == (0, tenant("$5/day", "*")), reset.stderr
    other = cli(stack, pki_dir, "tenants", "mcp-servers", "beta")  # never set: every server
    assert other.stdout == tenant("none", "*", "beta"), other.stderr

    for args, says in [
        (("tenants", "mcp-servers", " ", "docs"), "tenant is required"),
        (("tenants", "mcp-servers", "acme", "x" * 201), "mcp_servers entry is longer than 200"),
    ]:
        res = cli(stack, pki_dir, *args)
        assert res.returncode == 2 and says in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr
    assert cli(stack, pki_dir, "tenants", "mcp-servers", "acme").stdout == reset.stdout


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
